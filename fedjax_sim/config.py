"""Experiment grids: TOML config files, ``--set`` overrides and command-line flags.

A config file's keys are the options of ``fedjax-sim run`` with underscores. A list is a
grid axis (the grid is the Cartesian product of the axes); a table named after an
algorithm holds that algorithm's own grid, and applies to it alone::

    dataset = "digits"
    num_clients = 10
    rounds = 30
    algorithm = ["fedavg", "fedobp"]
    lr = [0.01, 0.05]
    seed = [0, 1, 2]

    [fedobp]
    ig_ratio = [0.5, 0.9]          # fedobp runs 2 lr x 2 ig_ratio configurations

``seeds``, ``sweep_lr`` and ``algorithms`` (the list options of the command line) name the
``seed``, ``lr`` and ``algorithm`` axes, as a list or as comma-separated text;
``architectures`` is one comma-separated text, never an axis. Paths are relative to the
working directory. A hyperparameter at the top level applies to the algorithms that take
it. ``--set key=value[,value...]`` (``--set fedobp.ig_ratio=0.5,0.9`` for a table) and
flags given on the command line replace the file's values of that key, in its tables too.

Every key and value is checked before anything loads or compiles; a message names the key
as it was given (``grid.toml: lr must be > 0, got -1.0``, ``--set lr ...``, ``--lr ...``)
and what it allows.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from fedjax_sim import algorithms
from fedjax_sim.checks import check_input_file, check_seed
from fedjax_sim.spec import (
    CLOCK_FIELDS,
    EXECUTION,
    FIELDS,
    KINDS,
    OPTIONAL,
    ExperimentSpec,
    check_spec,
    hparam_names,
    no_effect,
    takes,
)

# The list options of the command line, as config keys: the axis each one names.
ALIASES = {"seeds": "seed", "sweep_lr": "lr", "algorithms": "algorithm"}
# ``no_progress`` (the flag) is ``progress`` inverted.
INVERTED = {"no_progress": "progress"}
# Text values that mean "unset" in ``--set`` for an option whose default is unset.
_UNSET = ("none", "null")
# The config-file key of ``--plugin``: modules imported before the options are parsed.
PLUGIN_KEY = "plugin"
# The config-file table of ``compare --tune``'s options, and its keys (the flags
# --tune-lrs, --tune-seeds, --tune-statistic, --tune-own without the prefix).
TUNE_TABLE = "tune"
TUNE_KEYS = {"lrs": list, "seeds": list, "statistic": str, "own": bool}


@dataclasses.dataclass(frozen=True)
class Setting:
    """The value(s) of one key and where they came from.

    Attributes:
      values: the value, or the values of an axis.
      axis: whether it is a grid axis (one configuration per value).
      label: how messages name it (``grid.toml: lr``, ``--set lr``, ``--lr``).
      origin: ``file``, ``set``, ``flag`` or ``default``.
    """

    values: tuple
    axis: bool
    label: str
    origin: str = "file"


@dataclasses.dataclass(frozen=True)
class Grid:
    """Top-level settings and per-algorithm tables, in the order given.

    Attributes:
      settings: key -> Setting; keys are spec fields and hyperparameter names.
      tables: algorithm -> (hyperparameter -> Setting): that algorithm's own grid.
      table_labels: algorithm -> how messages name its table (``grid.toml: [fedobp]``).
    """

    settings: Mapping[str, Setting] = dataclasses.field(default_factory=dict)
    tables: Mapping[str, Mapping[str, Setting]] = dataclasses.field(default_factory=dict)
    table_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def label_for(self, algorithm: str,
                  default: Callable[[str], str] | None = None) -> Callable[[str], str]:
        """How messages name each key of ``algorithm``'s configurations."""
        default = default or (lambda name: name)
        table = self.tables.get(algorithm, {})

        def label(key: str) -> str:
            if key in table:
                return table[key].label
            if key in self.settings:
                return self.settings[key].label
            return default(key)

        return label

    def axes(self) -> dict[str, tuple]:
        """Every axis of the grid (top level and tables) with its values."""
        found = {k: s.values for k, s in self.settings.items() if s.axis}
        for table in self.tables.values():
            for key, setting in table.items():
                if setting.axis:
                    found[key] = tuple(dict.fromkeys(found.get(key, ()) + setting.values))
        return found


def _all_algorithms() -> tuple[str, ...]:
    return algorithms.ALGORITHMS + algorithms.DISTILLATION


def key_kind(key: str) -> tuple[type, bool]:
    """``(type, may be unset)`` of a config key (a field or a hyperparameter).

    Raises:
      KeyError: an unknown key.
    """
    if key in KINDS:
        return KINDS[key], key in OPTIONAL
    spec = hparam_names()[key]
    return spec.kind, spec.default is None


def known_keys() -> list[str]:
    """Every key a config file may hold at its top level (``plugin`` aside: it is read
    before the others, see :func:`plugin_entries`)."""
    return [*FIELDS, *hparam_names(), *ALIASES, *INVERTED]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the choice closest to ``name`` (case and ``-``/``_``
    aside), or an empty string."""
    if not isinstance(name, str):
        return ""
    choices = list(choices)
    folded = {c.lower().replace("-", "_"): c for c in choices}
    key = name.strip().lower().replace("-", "_")
    if key in folded and folded[key] != name:
        return f" (did you mean {folded[key]}?)"
    close = difflib.get_close_matches(key, list(folded), n=3)
    if not close:
        return ""

    def score(choice: str) -> float:
        return difflib.SequenceMatcher(None, key, choice).ratio()

    best = [folded[c] for c in close if score(c) == score(close[0])]  # ties: all of them
    return f" (did you mean {' or '.join(best)}?)"


def plugin_hint(name: Any) -> str:
    """What to do about an unknown algorithm name that a plug-in may register."""
    if not isinstance(name, str):
        return ""
    return (f"{did_you_mean(name, _all_algorithms())}; an algorithm of a plug-in needs "
            "--plugin MODULE (or plugin = \"MODULE\" in the config file)")


def _unknown(key: str, label: str) -> ValueError:
    hint = did_you_mean(key, [*known_keys(), PLUGIN_KEY])
    return ValueError(f"{label}: unknown key{hint}; the keys are the options of "
                      "`fedjax-sim run --help` with underscores, and a table per algorithm")


def _not_an_algorithm(name: str, label: str) -> ValueError:
    return ValueError(f"{label} is not an algorithm{plugin_hint(name)}; a table "
                      f"holds one algorithm's own grid ({', '.join(_all_algorithms())})")


def _no_hyperparameter(algorithm: str, key: str, label: str) -> ValueError:
    own = [s.name for s in algorithms.hparam_specs(algorithm)]
    where = (f"; {key} is an option for every algorithm: give it outside the table"
             if key in FIELDS else "")
    return ValueError(f"{label}: {algorithm} has no hyperparameter {key}"
                      f"{did_you_mean(key, own) if not where else ''}{where}; valid: "
                      f"{', '.join(own)}")


def _scalar(label: str, value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        raise ValueError(f"{label} must be a single value, got {value!r}")
    return value


def _repeated(label: str, values: Sequence) -> None:
    for i, value in enumerate(values):
        if any(v == value and type(v) is type(value) for v in values[:i]):
            raise ValueError(f"{label} lists {value!r} twice")


def setting(key: str, value: Any, label: str, origin: str = "file") -> tuple[str, Setting]:
    """``(canonical key, Setting)`` of one config entry: a list is an axis.

    Raises:
      ValueError: naming ``label``: an empty list, a nested list or table, a repeated
        value.
    """
    if key in INVERTED:
        if not isinstance(value, bool):
            raise ValueError(f"{label} must be true or false, got {value!r}")
        return INVERTED[key], Setting((not value,), False, label, origin)
    canonical = ALIASES.get(key, key)
    if key in ALIASES and isinstance(value, str):
        value = _split(value, label, canonical)
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError(f"{label} is an empty list; give at least one value")
        values = tuple(_scalar(f"{label} entry {i}", v) for i, v in enumerate(value, 1))
        _repeated(label, values)
        return canonical, Setting(values, True, label, origin)
    if isinstance(value, dict):
        raise ValueError(f"{label}: a table is allowed only for an algorithm's own grid")
    return canonical, Setting((value,), False, label, origin)


def _split(text: str, label: str, key: str) -> list:
    """Comma-separated text as a list of values typed for ``key``."""
    entries = [entry.strip() for entry in text.split(",")]
    if not text.strip() or "" in entries:
        raise ValueError(f"{label} must be comma-separated values without empty entries, "
                         f"got {text!r}")
    return [parse_text(key, entry, f"{label} entry {i}") for i, entry in enumerate(entries, 1)]


def parse_text(key: str, text: str, label: str) -> Any:
    """Command-line text as a value of ``key``'s type (ranges are checked later, with the
    whole spec).

    Raises:
      ValueError: naming ``label``: text that is not of the key's type.
    """
    kind, optional = key_kind(key)
    if optional and text.strip().lower() in _UNSET:
        return None
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{label} must be true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{label} must be an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{label} must be a number, got {text!r}") from None
    return text


def _table(algorithm: str, mapping: Mapping, label: str, origin: str) -> dict[str, Setting]:
    """An algorithm's own grid: its hyperparameters only."""
    own = [s.name for s in algorithms.hparam_specs(algorithm)]
    table = {}
    for key, value in mapping.items():
        entry_label = f"{label} {key}"
        if key not in own:
            raise _no_hyperparameter(algorithm, key, entry_label)
        name, entry = setting(key, value, entry_label, origin)
        table[name] = entry
    return table


def grid_from_mapping(mapping: Mapping[str, Any], *, source: str,
                      origin: str = "file") -> Grid:
    """A grid from parsed TOML (or any mapping of the same form).

    Args:
      mapping: key -> value, list (an axis) or, for an algorithm's name, a table.
      source: how messages name where it came from (the file's path).
      origin: recorded on every setting.

    Raises:
      ValueError: an unknown key or table, a key given twice (``seed`` and ``seeds``), an
        empty list; each message names the key and ``source``.
    """
    settings: dict[str, Setting] = {}
    tables: dict[str, dict[str, Setting]] = {}
    table_labels: dict[str, str] = {}
    known = set(known_keys())
    for key, value in mapping.items():
        label = f"{source}: {key}"
        if key == PLUGIN_KEY:
            plugin_entries(mapping, source=source)  # checked; imported before parsing
            continue
        if key == TUNE_TABLE:
            tune_table(mapping, source=source)  # checked; read by compare --tune
            continue
        if isinstance(value, dict):
            if key not in _all_algorithms():
                if key in known:
                    raise ValueError(f"{label} must be a single value or a list, not a "
                                     "table")
                raise _not_an_algorithm(key, f"{source}: [{key}]")
            table_labels[key] = f"{source}: [{key}]"
            tables[key] = _table(key, value, table_labels[key], origin)
            continue
        if key not in known:
            raise _unknown(key, label)
        name, entry = setting(key, value, label, origin)
        if name in settings:
            raise ValueError(f"{settings[name].label} and {label} name the same setting; "
                             "give one")
        settings[name] = entry
    return Grid(settings, tables, table_labels)


def tune_table(mapping: Mapping[str, Any], *, source: str) -> dict[str, tuple[Any, str]]:
    """The ``[tune]`` table of a config file: key -> (value, label), each key of
    :data:`TUNE_KEYS` with its type (the values' ranges are checked by the tuner).

    Raises:
      ValueError: ``tune`` that is not a table, an unknown key, a value of the wrong type.
    """
    table = mapping.get(TUNE_TABLE, {})
    label = f"{source}: [{TUNE_TABLE}]"
    if not isinstance(table, Mapping):
        raise ValueError(f"{source}: {TUNE_TABLE} must be a table ([{TUNE_TABLE}]) of "
                         f"{', '.join(TUNE_KEYS)}")
    found = {}
    for key, value in table.items():
        if key not in TUNE_KEYS:
            raise ValueError(f"{label}: unknown key {key!r}"
                             f"{did_you_mean(key, TUNE_KEYS)}; valid: {', '.join(TUNE_KEYS)}")
        kind = TUNE_KEYS[key]
        if not isinstance(value, kind) or (kind is list and not value):
            what = {list: "a non-empty list", str: "text", bool: "true or false"}[kind]
            raise ValueError(f"{label} {key} must be {what}, got {value!r}")
        found[key] = (value, f"{label} {key}")
    return found


def plugin_entries(mapping: Mapping[str, Any], *, source: str) -> list[str]:
    """The plug-ins a config file names (``plugin = "MODULE"`` or a list of them; each
    entry as ``--plugin`` takes it), imported before the command line is parsed.

    Raises:
      ValueError: naming ``source``: a value that is not text or a list of texts.
    """
    value = mapping.get(PLUGIN_KEY)
    if value is None:
        return []
    entries = [value] if isinstance(value, str) else value
    if (not isinstance(entries, list) or not entries
            or not all(isinstance(e, str) and e.strip() for e in entries)):
        raise ValueError(f"{source}: {PLUGIN_KEY} must be \"MODULE[:FUNCTION]\" (or FILE.py) "
                         f"or a list of them, got {value!r}")
    return [e.strip() for e in entries]


def read_toml(path: str | os.PathLike, label: str = "--config") -> dict:
    """The parsed TOML file ``path``.

    Raises:
      ValueError: naming ``label`` and the file: missing, unreadable or not valid TOML.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError(f"{label}: reading TOML needs Python 3.11 or the tomli "
                             "package") from None
    path = check_input_file(label, path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{label} {path}: not valid TOML: {error}") from None


def load_config(path: str | os.PathLike, label: str = "--config") -> Grid:
    """The grid of a TOML config file (see the module docstring).

    Raises:
      ValueError: a missing or malformed file, an unknown key or table, a bad list; the
        message names the file and the key. Values are checked by :func:`expand`.
    """
    return grid_from_mapping(read_toml(path, label), source=str(path))


def parse_set(items: Iterable[str], label: str = "--set") -> Grid:
    """The grid of ``--set key=value[,value...]`` items (``algorithm.key=...`` for an
    algorithm's own grid); a comma list is an axis (``architectures`` is one value).

    Raises:
      ValueError: naming the item: no ``=``, an unknown key, text not of the key's type.
    """
    settings: dict[str, Setting] = {}
    tables: dict[str, dict[str, Setting]] = {}
    table_labels: dict[str, str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"{label} takes key=value[,value...], got {item!r}")
        algorithm, dot, name = key.rpartition(".")
        entry_label = f"{label} {key}"
        if key == PLUGIN_KEY:
            raise ValueError(f"{entry_label}: plug-ins are imported before the options are "
                             "read: give --plugin MODULE, or plugin = \"MODULE\" in the "
                             "config file")
        if dot:
            if algorithm not in _all_algorithms():
                raise ValueError(f"{entry_label}: {algorithm} is not an algorithm"
                                 f"{plugin_hint(algorithm)}; valid: "
                                 f"{', '.join(_all_algorithms())}")
            if not takes(algorithm, name):
                raise _no_hyperparameter(algorithm, name, entry_label)
            values = _split(text, entry_label, name)
            table_labels.setdefault(algorithm, f"{label} {algorithm}.*")
            tables.setdefault(algorithm, {})[name] = Setting(
                tuple(values), len(values) > 1, entry_label, "set")
            _repeated(entry_label, values)
            continue
        if key not in known_keys():
            raise _unknown(key, entry_label)
        canonical = INVERTED.get(key, ALIASES.get(key, key))
        if key == "architectures":
            values = [text]
        else:
            values = _split(text, entry_label, canonical)
        if key in INVERTED:
            values = [not v if isinstance(v, bool) else v for v in values]
        _repeated(entry_label, values)
        settings[canonical] = Setting(tuple(values), len(values) > 1 or key in ALIASES,
                                      entry_label, "set")
    return Grid(settings, tables, table_labels)


def merge(*grids: Grid) -> Grid:
    """Later grids win: a top-level key replaces the earlier value of that key at the top
    and in every table; a table key replaces that table's."""
    settings: dict[str, Setting] = {}
    tables: dict[str, dict[str, Setting]] = {}
    table_labels: dict[str, str] = {}
    for grid in grids:
        for key, entry in grid.settings.items():
            settings.pop(key, None)  # keep the order of the latest source
            settings[key] = entry
            for table in tables.values():
                table.pop(key, None)
        for algorithm, table in grid.tables.items():
            tables.setdefault(algorithm, {}).update(table)
            table_labels[algorithm] = grid.table_labels.get(algorithm, algorithm)
    return Grid(settings, {a: t for a, t in tables.items() if t}, table_labels)


def check_axes(grid: Grid, allowed: Iterable[str] | None, command: str) -> None:
    """Refuses axes that ``command`` cannot take (``allowed``; None: any but the execution
    and output options, which always take one value)."""
    allowed = None if allowed is None else set(allowed)
    entries = list(grid.settings.items()) + [
        (k, s) for table in grid.tables.values() for k, s in table.items()]
    for key, entry in entries:
        if not entry.axis or len(entry.values) == 1:
            continue
        if key in EXECUTION:
            raise ValueError(f"{entry.label} takes one value, got {list(entry.values)}")
        if allowed is not None and key not in allowed:
            raise ValueError(f"{entry.label} is a list (a grid axis); `fedjax-sim {command}` "
                             f"takes one value, or a list only for "
                             f"{', '.join(sorted(allowed))}: use `fedjax-sim sweep`")


def refuse_keys(grid: Grid, refused: Mapping[str, str]) -> None:
    """Refuses the keys a command does not take: ``refused`` maps each to what the message
    says after the key (``"works with `fedjax-sim run` only"``)."""
    for key, entry in grid.settings.items():
        if key in refused and entry.origin != "default":
            raise ValueError(f"{entry.label} {refused[key]}")


def refuse_without_effect(grid: Grid, specs: Sequence[ExperimentSpec], *,
                          default_label: Callable[[str], str] | None = None) -> None:
    """Refuses a key given explicitly (a file, ``--set`` or a flag; never a default) that
    acts in none of the configurations ``specs`` of ``grid`` (``spec.no_effect``), so that
    no run records a value it silently ignored.

    Raises:
      ValueError: one line naming the key as given, why it has no effect, what to do.
    """
    labels: dict[str, Callable[[str], str]] = {}
    given = [(key, None) for key, entry in grid.settings.items() if entry.origin != "default"]
    given += [(key, algorithm) for algorithm, table in grid.tables.items()
              for key, entry in table.items() if entry.origin != "default"]
    for key, table in given:
        if key == "algorithm":
            continue
        reason = None
        for spec in specs:
            if table is not None and spec.algorithm != table:
                continue
            if table is None and key in grid.tables.get(spec.algorithm, {}):
                continue  # the algorithm's own value replaces this one
            if key not in FIELDS and not takes(spec.algorithm, key):
                continue
            if spec.algorithm not in labels:
                labels[spec.algorithm] = grid.label_for(spec.algorithm, default_label)
            reason = no_effect(spec, key, labels[spec.algorithm])
            if reason is None:
                break
        if reason is not None:
            raise ValueError(reason)


def expand(grid: Grid, *, check: bool = True,
           default_label: Callable[[str], str] | None = None,
           unclocked: Sequence[str] = ()) -> list[ExperimentSpec]:
    """The specs of ``grid``: per algorithm, the product of its axes (seeds fastest).

    A top-level hyperparameter applies to the algorithms that take it; a table's keys
    replace the top-level ones for its algorithm.

    Args:
      grid: the grid.
      check: check every spec (``spec.check_spec``), naming each key as the grid names it.
      default_label: how messages name keys the grid does not set (default: the name).
      unclocked: algorithms that run without the virtual clock's options (a comparison's
        Local reference: training alone, it waits for no server).

    Returns:
      The specs in order: algorithm, then the axes in the order given, seed last; checked
      specs come back normalized.

    Raises:
      ValueError: an unknown algorithm, a table of an algorithm the grid does not run
        (when the algorithms come from the file), a hyperparameter that no algorithm of the
        grid takes, a bad value (with ``check``), two entries that are the same
        configuration.
    """
    names = grid.settings.get("algorithm")
    algorithm_label = names.label if names else (default_label or str)("algorithm")
    names_values = names.values if names else (ExperimentSpec.algorithm,)
    for name in names_values:
        if name not in _all_algorithms():
            raise ValueError(f"{algorithm_label} must be one of "
                             f"{', '.join(_all_algorithms())}; got {name!r}{plugin_hint(name)}")
    for name in grid.tables:
        if name in names_values:
            continue
        if names is not None and names.origin in ("set", "flag"):
            continue  # the command line narrowed the algorithms: other tables rest
        label = grid.table_labels.get(name, name)
        raise ValueError(f"{label}: {name} is not among the algorithms of the grid "
                         f"({', '.join(names_values)}); add it to algorithm")
    known = hparam_names()
    for key, entry in grid.settings.items():
        if key in known and key not in FIELDS and not any(takes(a, key) for a in names_values):
            if len(names_values) == 1:
                raise ValueError(f"{entry.label} does not apply to {names_values[0]}")
            owners = [a for a in _all_algorithms() if takes(a, key)]
            raise ValueError(f"{entry.label} applies to none of {', '.join(names_values)} "
                             f"(it is a hyperparameter of {', '.join(owners)})")

    specs: list[ExperimentSpec] = []
    checked: dict[str, ExperimentSpec] = {}
    seen: dict[tuple, int] = {}
    for name in names_values:
        own = {k: s for k, s in grid.settings.items()
               if k != "algorithm" and (k in FIELDS or takes(name, k))}
        own.update(grid.tables.get(name, {}))
        keys = sorted(own, key=lambda k: k == "seed")  # stable: seed moves last
        label = grid.label_for(name, default_label)
        for combo in itertools.product(*(own[k].values for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            fields = {k: v for k, v in values.items() if k in FIELDS
                      and not (name in unclocked and k in CLOCK_FIELDS)}
            hparams = {k: v for k, v in values.items() if k not in FIELDS}
            spec = ExperimentSpec(algorithm=name, hparams=hparams, **fields)
            if check:
                template = spec.replace(seed=0)  # checked once per configuration
                key = json.dumps(template.to_dict(), sort_keys=True, default=repr)
                if key not in checked:
                    checked[key] = check_spec(template, label=label)
                spec = checked[key].replace(seed=check_seed(label("seed"), spec.seed))
                identity = (spec.config_hash(), spec.seed)
                if identity in seen:
                    raise ValueError(f"two entries of the grid are the same configuration "
                                     f"({name}, {_describe(values)}); give each value once")
                seen[identity] = len(specs)
            specs.append(spec)
    return specs


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def defaults_grid(values: Mapping[str, Any], label: Callable[[str], str],
                  origin: str = "default") -> Grid:
    """A grid of fixed values (a list is an axis), e.g. a command's own defaults."""
    settings = {}
    for key, value in values.items():
        name, entry = setting(key, value, label(key), origin)
        settings[name] = entry
    return Grid(settings)


__all__ = [
    "ALIASES",
    "INVERTED",
    "Grid",
    "Setting",
    "check_axes",
    "defaults_grid",
    "expand",
    "grid_from_mapping",
    "key_kind",
    "known_keys",
    "load_config",
    "merge",
    "parse_set",
    "parse_text",
    "plugin_entries",
    "read_toml",
    "refuse_keys",
    "refuse_without_effect",
    "setting",
]
