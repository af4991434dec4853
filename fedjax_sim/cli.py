"""``fedjax-sim``: run, compare, sweep and benchmark algorithms from the command line.

  fedjax-sim run --algorithm fedper --dataset digits --alpha 0.1 --output runs/fedper
  fedjax-sim compare                      # the default comparison on digits, 3 seeds
  fedjax-sim sweep --config grid.toml     # a grid of configurations x seeds, resumable
  fedjax-sim bench --model cnn --num-clients 50 --local-steps 10

``run``, ``compare`` and ``sweep`` only parse their options (flags, ``--config`` files,
``--set`` overrides) into ``fedjax_sim.spec.ExperimentSpec`` s; ``spec.build`` makes the
data, models and algorithms and ``fedjax_sim.sweep`` runs grids.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedjax_sim import algorithms, config
from fedjax_sim.algorithms.base import COMMON, HParam, check_hparam
from fedjax_sim.checks import (
    check_choice,
    check_int,
    check_seed,
    parse_int,
    parse_list,
    parse_seed,
)
from fedjax_sim.models.layers import CONV_IMPLS
from fedjax_sim.options import fill_help
from fedjax_sim.platform import (
    check_environment,
    configure_cpu_devices,
    enable_compile_cache,
    parse_cpu_devices,
)
from fedjax_sim.rundir import dumps
from fedjax_sim.spec import (
    DEFAULT_PUBLIC_FRACTION,
    DEFAULT_VAL_FRACTION,
    HETEROGENEOUS,
    KINDS,
    OPTIONS,
    ExperimentSpec,
    build,
    run_built,
    share_public_split,
)
from fedjax_sim.tuning import DEFAULT_LRS, STATISTICS, describe
from fedjax_sim.tuning import DEFAULT_VAL_FRACTION as DEFAULT_TUNE_VAL

__all__ = ["DEFAULT_COMPARE", "DEFAULT_PUBLIC_FRACTION", "DEFAULT_VAL_FRACTION",
           "build_parser", "check_args", "main"]

DEFAULT_COMPARE = ("fedavg", "local", "fedavg_ft", "fedper", "fedrep", "fedbabu", "lg_fedavg",
                   "ditto", "apfl")
DEFAULT_COMPARE_SEEDS = (0, 1, 2)
_DEFAULTS = ExperimentSpec()

SEEDS_HELP = """\
seeds: each seed draws its own partition and train/test split, and its own
initialization, cohorts and batch orders; --partition-seed S draws the split once, from
S, for every seed (a --partition-file fixes it too). run, compare and sweep follow this
same rule, so `run --seed 1`, `compare --seeds 1` and `sweep --seeds 1` agree."""

CONFIG_HELP = """\
config files: --config FILE.toml takes the options above as keys with underscores
(num_clients = 10). A list is a grid axis (lr = [0.01, 0.05]); a table named after an
algorithm ([fedobp]) holds that algorithm's own grid. --set key=value[,value...]
overrides the file (a comma list is an axis; --set fedobp.ig_ratio=0.5,0.9 for a table).
Flags given on the command line win over the file. plugin = "MODULE" (or a list) imports
plug-ins as --plugin does. Every key and value is checked before anything loads or
compiles; an option given that would have no effect in the chosen setting (alpha without
the dirichlet partition, local_epochs with local_steps, ...) is refused, never ignored."""


COMMANDS = ("run", "compare", "sweep", "bench")


class _Parser(argparse.ArgumentParser):
    """Argument parser whose errors are one line, ``fedjax-sim <command>: error: ...``,
    without the usage block (sub-commands get this class too); an unknown option says what
    to do about it."""

    commands: dict[str, argparse.ArgumentParser] | None = None

    def error(self, message: str):
        if message.startswith("the following arguments are required: command"):
            message += (f" (one of {', '.join(COMMANDS)}; `{self.prog} --help` describes "
                        "them, `--version` prints the version)")
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(namespace, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            self.exit(2, f"{prog}: error: {self._unrecognized(command, extras)}\n")
        return namespace

    def _unrecognized(self, command: str | None, extras: list[str]) -> str:
        """``unrecognized arguments: ...`` and a hint about the first unknown option."""
        text = f"unrecognized arguments: {' '.join(extras)}"
        option = next((w.split("=", 1)[0] for w in extras if w.startswith("--")), None)
        if option is None or not self.commands or command not in self.commands:
            return text
        strings = {name: [s for a in sub._actions for s in a.option_strings]
                   for name, sub in self.commands.items()}
        owners = [name for name in COMMANDS if name != command and option in strings[name]]
        if owners:
            hint = (f"{option} is an option of {' and '.join(owners)}, not of {command}")
            if option == "--algorithms" and "--algorithm" in strings[command]:
                hint += f"; {command} takes --algorithm (one name)"
            return f"{text} ({hint})"
        close = difflib.get_close_matches(option, strings[command], n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}? " if close else ""
        if "--plugin" in strings[command]:
            hint += "if a plug-in defines it, pass --plugin MODULE first; "
        return f"{text} ({hint}`fedjax-sim {command} --help` lists the options)"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_hparam(group, spec: HParam, seen: set[str], owner: str | None = None) -> None:
    if spec.name in seen:
        return
    seen.add(spec.name)
    kind = _parse_bool if spec.kind is bool else spec.kind
    try:
        group.add_argument(
            _flag(spec.name), dest=spec.name, type=kind, default=None, choices=spec.choices,
            help=f"{spec.help} ({spec.allowed}; default {spec.default})",
        )
    except argparse.ArgumentError:
        # Only a registered algorithm can get here: the built-in names are distinct.
        raise ValueError(f"algorithm {owner}: hyperparameter {spec.name!r} has the name of "
                         f"the option {_flag(spec.name)}; register it under another name"
                         ) from None


def load_plugin(entry: str, *, label: str = "--plugin") -> None:
    """Imports a plug-in for ``--plugin``: ``MODULE`` (on ``sys.path`` or in the current
    directory), or a ``FILE.py``, which registers its algorithms or data sources when
    imported; with ``:FUNCTION`` appended, that function of it is then called to register
    them.

    Args:
      entry: ``MODULE``, ``FILE.py``, or either with ``:FUNCTION``.
      label: how messages name where the entry came from (``--plugin``, or the config
        file's ``plugin`` key).

    Raises:
      ValueError: naming ``label`` and the entry when the module cannot be found or
        imported, has no such function, or its registration fails.
    """
    import importlib
    import importlib.util

    target, _, function = entry.rpartition(":") if _has_function(entry) else (entry, "", "")
    if not target:
        raise ValueError(f"{label} takes MODULE, FILE.py or either with :FUNCTION, got "
                         f"{entry!r}")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ValueError(f"{label} {entry}: no file {target}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            # As `python -m` does: a module in the current directory is found, also from
            # the installed `fedjax-sim` script.
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(target)
    except ModuleNotFoundError as error:
        if error.name and target.startswith(error.name):
            raise ValueError(f"{label} {entry}: no module named {error.name!r} (is it "
                             "installed, on PYTHONPATH, or in this directory?)") from None
        raise ValueError(f"{label} {entry}: importing {target} failed: {error}") from None
    except ValueError as error:
        text = str(error)
        raise ValueError(text if text.startswith(label) else
                         f"{label} {entry}: {text}") from None
    if function:
        register = getattr(module, function, None)
        if not callable(register):
            raise ValueError(f"{label} {entry}: {target} has no function {function!r}")
        try:
            register()
        except ValueError as error:
            raise ValueError(f"{label} {entry}: {error}") from None


def _has_function(entry: str) -> bool:
    """Whether ``entry`` ends in ``:FUNCTION`` (not a Windows drive letter's colon)."""
    head, sep, tail = entry.rpartition(":")
    return bool(sep) and tail.isidentifier() and len(head) > 1


class _FirstPassError(Exception):
    """The first pass could not read the line: the full parser reports it."""


class _FirstPass(argparse.ArgumentParser):
    def error(self, message: str):
        raise _FirstPassError(message)


def _load_plugins(argv: list[str]) -> list[str]:
    """The first pass over the command line: imports every ``--plugin``, and every entry
    of the ``plugin`` key of a ``--config`` file, before the parser is built, so that the
    algorithms (and their hyperparameter flags) and data sources they register are known
    to it.

    Returns:
      The entries imported, in order.
    """
    first = _FirstPass(add_help=False, allow_abbrev=False)
    first.add_argument("--plugin", action="append", default=[])
    first.add_argument("--config", default=None)
    # Only `--plugin X` and `--plugin=X` count (no abbreviation: the full parser refuses
    # those); the rest of the line is parsed after.
    try:
        known, _ = first.parse_known_args(argv)
    except _FirstPassError:
        return []
    entries = [(entry, "--plugin") for entry in known.plugin]
    if known.config is not None and argv and argv[0] in ("run", "compare", "sweep"):
        source = str(known.config)
        entries += [(entry, f"{source}: {config.PLUGIN_KEY}") for entry in
                    config.plugin_entries(config.read_toml(source), source=source)]
    loaded: list[str] = []
    for entry, label in entries:
        if entry not in loaded:
            load_plugin(entry, label=label)
            loaded.append(entry)
    return loaded


def _add_plugin_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=None,
                        metavar="MODULE[:FUNCTION]",
                        help="import MODULE (or FILE.py) first, repeatable: it registers "
                        "algorithms (fedjax_sim.algorithms.register) or data sources "
                        "(fedjax_sim.data.register_source) when imported; with :FUNCTION, "
                        "that function of it is called to register them")


def _add_platform_args(parser: argparse.ArgumentParser) -> None:
    _add_option(parser, "cpu_devices", {})
    parser.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                        help="do not keep compiled programs on disk (default: kept in "
                        "$FEDJAX_SIM_COMPILE_CACHE or ~/.cache/fedjax_sim/jax, so that a "
                        "repeated run of the same shapes skips compiling)")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE.toml",
                        help="read options from this TOML file (see 'config files' below)")
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE[,...]",
                        help="set an option, over the config file (repeatable; a comma list "
                        "is a grid axis; ALGORITHM.KEY for that algorithm's own value)")


def _add_option(parser, name: str, context: dict[str, str]) -> None:
    """The flag of the spec field ``name``, from its schema (``fedjax_sim.options``)."""
    described = OPTIONS[name]
    text = fill_help(described, context)
    if described.negated:
        parser.add_argument(described.negated, action="store_true", help=text)
        return
    flags = (_flag(name), *described.aliases)
    kind = KINDS[name]
    if kind is bool:
        parser.add_argument(*flags, dest=name, action="store_true", help=text)
        return
    choices = described.choices if isinstance(described.choices, tuple) else None
    parser.add_argument(*flags, dest=name, type=None if kind is str else kind,
                        default=getattr(_DEFAULTS, name), choices=choices, help=text)


def _help_context(command: str) -> dict[str, str]:
    """The values the options' help texts name (``{sources}``, ...), read when the parser
    is built so that plug-ins count."""
    from fedjax_sim.data import PARTITIONS, SOURCES
    from fedjax_sim.data.natural import NATURAL_DATASETS

    default_output, unless = _OUTPUT_HELP[command]
    return {"sources": ", ".join(SOURCES), "natural": ", ".join(NATURAL_DATASETS),
            "partitions": ", ".join(PARTITIONS), "heterogeneous": " and ".join(HETEROGENEOUS),
            "public_fraction": str(DEFAULT_PUBLIC_FRACTION),
            "default_output": default_output, "unless": unless}


# Per command: the folder a run writes by default, and what lets it reuse a folder.
_OUTPUT_HELP = {
    "run": ("runs/<algorithm>-<dataset>-<time>", "--resume or --overwrite"),
    "compare": ("runs/compare-<dataset>-<time>", "--overwrite"),
    "sweep": ("runs/sweep-<dataset>-<time>",
              "it holds this sweep (which then continues) or --overwrite"),
}
# The help group of each section's flags (execution and output: the command's own list).
_SECTION_GROUPS = {
    "data": ("data", None), "model": ("data", None),
    "public": ("public data (federated distillation: "
               + ", ".join(algorithms.DISTILLATION) + ")", None),
    "clock": ("devices and time", "a per-client system model and a server condition on a "
              "virtual clock (default: none, the synchronous round without time)"),
    "loop": ("training", None),
    "execution": ("how it runs (never changes the numbers)", None),
    "output": ("output", None),
}


def _add_spec_flags(parser: argparse.ArgumentParser, command: str) -> dict[str, object]:
    """Every spec option ``command`` takes as a flag, generated from the schema, in help
    groups by section; returns the groups by title (the training group also lists the
    hyperparameters)."""
    context = _help_context(command)
    groups: dict[str, object] = {}
    for name, described in OPTIONS.items():
        if command not in described.commands:
            continue
        title, description = _SECTION_GROUPS.get(described.section, (None, None))
        if title is None:
            target = parser
        else:
            if title not in groups:
                groups[title] = parser.add_argument_group(title, description)
            target = groups[title]
        _add_option(target, name, context)
    return groups


def _add_training_args(parser: argparse.ArgumentParser, group) -> None:
    seen: set[str] = set()
    for spec in COMMON:
        _add_hparam(group, spec, seen)
    for name in algorithms.ALGORITHMS + algorithms.DISTILLATION:
        own = algorithms.hparam_specs(name)[len(COMMON):]
        if own:
            sub = parser.add_argument_group(f"{name} hyperparameters")
            for spec in own:
                _add_hparam(sub, spec, seen, name)


def _add_sweep_args(parser: argparse.ArgumentParser, *, seeds_help: str) -> None:
    parser.add_argument("--seeds", default=None, help=seeds_help)
    parser.add_argument("--sweep-lr", default=None,
                        help="comma-separated client learning rates, a grid axis")


def _add_common(parser: argparse.ArgumentParser, command: str) -> None:
    """The options run, compare and sweep share: config, plug-ins, platform, and every spec
    option the command takes."""
    _add_config_args(parser)
    _add_plugin_args(parser)
    _add_platform_args(parser)
    groups = _add_spec_flags(parser, command)
    _add_training_args(parser, groups["training"])


def _subparser(commands, name: str, help_text: str, description: str):
    return commands.add_parser(name, help=help_text, description=description,
                               epilog=SEEDS_HELP + "\n\n" + CONFIG_HELP,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_compare_parser(commands) -> argparse.ArgumentParser:
    compare = _subparser(
        commands, "compare", "run several algorithms on the same partitions; print a table",
        "Run several algorithms on the same partitions, Local first as the reference; "
        "print a table of mean ± std over the seeds.")
    compare.add_argument("--algorithms", default=",".join(DEFAULT_COMPARE),
                         help="comma-separated algorithm names")
    compare.add_argument("--seeds", default=",".join(map(str, DEFAULT_COMPARE_SEEDS)),
                         help="comma-separated seeds")
    compare.add_argument(
        "--tune", action="store_true",
        help="choose each method's learning rate on validation rows first (--tune-lrs on "
             "--tune-seeds, scored on --val-fraction of each client's training rows, "
             f"default {DEFAULT_TUNE_VAL}); the table then reports the test rows of the "
             "chosen values")
    compare.add_argument("--tune-lrs", default=",".join(map(str, DEFAULT_LRS)),
                         help="comma-separated learning rates tried by --tune")
    compare.add_argument("--tune-seeds", default=None,
                         help="comma-separated seeds --tune scores on (default: the first "
                              "of --seeds)")
    compare.add_argument("--tune-statistic", default="final", choices=STATISTICS,
                         help="what --tune scores a run by: its final round's validation "
                              "accuracy (default) or its best evaluation round's")
    compare.add_argument("--tune-own", action="store_true",
                         help="--tune also chooses each method's own key hyperparameter "
                              "(FedOBP's ig_ratio, Ditto's ditto_lambda, FedProx's mu: "
                              "HParam.tune_values), with the learning rate")
    _add_common(compare, "compare")
    return compare


def _add_bench_parser(commands) -> argparse.ArgumentParser:
    bench = commands.add_parser(
        "bench", help="time rounds on random 28x28x1 data",
        description="Time rounds of one algorithm on random 28x28x1 data: says what it "
        "measures first (stderr), then prints one JSON line per client strategy as each "
        "finishes (stdout; --client-strategy all times vmap, sequential and chunked in "
        "turn).")
    bench.add_argument("--algorithm", default="fedavg")
    bench.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    bench.add_argument("--num-clients", type=int, default=50)
    bench.add_argument("--local-steps", type=int, default=10)
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--rounds", type=int, default=5)
    bench.add_argument("--samples-per-client", type=int, default=320)
    bench.add_argument("--client-strategy", default="auto",
                       help="auto, vmap, sequential, chunked, or all (time each in turn)")
    bench.add_argument("--chunk-size", default="8",
                       help="clients per chunk for chunked; a comma list with --client-strategy "
                       "all")
    bench.add_argument("--rounds-per-call", type=int, default=1,
                       help="rounds per jitted call (lax.scan over rounds)")
    bench.add_argument("--conv-impl", default="auto", choices=CONV_IMPLS,
                       help="cnn convolutions (default: auto, winograd on CPU, xla elsewhere)")
    bench.add_argument("--peak", action="store_true",
                       help="also measure 2048x2048 float32 matmuls (one on one device, and one "
                       "per device at once; the faster counts) and report the fraction of it "
                       "reached")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--devices", type=int, default=None,
                       help="devices to shard the client axis over (default: all visible)")
    _add_plugin_args(bench)
    _add_platform_args(bench)
    return bench


def build_parser(*, suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The command-line parser.

    Args:
      suppress_defaults: leave every option that is not given off the namespace (how the
        command line tells the flags given explicitly, which win over a config file).
    """
    from fedjax_sim import __version__

    parser = _Parser(
        prog="fedjax-sim", description="Personalized federated learning simulator (JAX)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = _subparser(commands, "run", "run one algorithm",
                     "Run one algorithm; with --seeds or --sweep-lr (or lists in --config), "
                     "the seeds x learning rates grid as a sweep (see `fedjax-sim sweep`).")
    run.add_argument("--algorithm", default=_DEFAULTS.algorithm,
                     help=f"one of {', '.join(algorithms.ALGORITHMS + algorithms.DISTILLATION)}")
    _add_sweep_args(run, seeds_help="comma-separated seeds: a sweep of one run per seed "
                    "(and per --sweep-lr), written and resumed as `fedjax-sim sweep` does")
    _add_common(run, "run")

    compare = _add_compare_parser(commands)

    sweep = _subparser(
        commands, "sweep", "run a grid of configurations x seeds; resumable",
        "Run a grid (the product of every list in --config, --set and --seeds / "
        "--algorithms / --sweep-lr) in one process. Configurations of one algorithm that "
        "differ only in seed, data split (partition settings) and numeric hyperparameters "
        "share one compiled program. Writes "
        "grid.json, results.jsonl (one line per finished configuration and seed), "
        "results.md (mean ± std over seeds, the best configuration of each algorithm on "
        "each data setting marked), curves.png and "
        "<config>/seed<s>/{summary.json,metrics.jsonl}. Rerun the same command with the "
        "same --output to skip what is finished: an interrupted "
        "sweep resumes; a diverged configuration is marked and the others go on.")
    sweep.add_argument("--algorithm", default=_DEFAULTS.algorithm,
                       help="the algorithm (one; see --algorithms)")
    sweep.add_argument("--algorithms", default=None,
                       help="comma-separated algorithms: a grid axis")
    _add_sweep_args(sweep, seeds_help="comma-separated seeds: a grid axis")
    _add_common(sweep, "sweep")

    bench = _add_bench_parser(commands)
    parser.commands = {"run": run, "compare": compare, "sweep": sweep, "bench": bench}
    if suppress_defaults:
        for sub in (run, compare, sweep, bench):
            for action in sub._actions:
                action.default = argparse.SUPPRESS
    return parser


# ---- options -> specs ---------------------------------------------------------------------

# Namespace entries that are not spec keys.
_NOT_KEYS = frozenset({"command", "config", "set", "help", "plugin", "tune", "tune_lrs",
                       "tune_seeds", "tune_statistic", "tune_own"})
# Per command, the keys it refuses (from a config file or --set), and why.
_RUN_ONLY = "works with `fedjax-sim run` only"
_RUN_ONLY_KEYS = {name: _RUN_ONLY for name, o in OPTIONS.items() if o.run_only}
_REFUSED = {
    "compare": {
        **_RUN_ONLY_KEYS,
        "resume": "is not taken by `fedjax-sim compare`: a comparison starts fresh runs",
        "compare_local": "is not taken by `fedjax-sim compare`: it always runs Local as the "
                         "reference",
        "architectures": "works with `fedjax-sim run`; compare uses one --model",
    },
    "sweep": {
        **_RUN_ONLY_KEYS,
        "resume": "is not taken by `fedjax-sim sweep`: a sweep resumes by itself (rerun it "
                  "with the same --output)",
    },
}


def _explicit(args: argparse.Namespace) -> set[str]:
    """The options given on the command line (a value equal to the default counts)."""
    argv = getattr(args, "_argv", None)
    if argv is None:  # parsed elsewhere: whatever differs from the defaults
        defaults = vars(build_parser().parse_args([args.command]))
        return {k for k, v in vars(args).items() if not k.startswith("_")
                and v != defaults.get(k)}
    return set(vars(build_parser(suppress_defaults=True).parse_args(argv)))


def _algorithm_names() -> tuple[str, ...]:
    return algorithms.ALGORITHMS + algorithms.DISTILLATION


def _parse_seeds(text: str) -> list[int]:
    return parse_list(text, "--seeds", parse_seed, unique=True)


def _parse_lrs(text: str, label: str = "--sweep-lr") -> list[float]:
    spec = next(spec for spec in COMMON if spec.name == "lr")

    def parse(entry: str, label: str) -> float:
        try:
            value = float(entry)
        except ValueError:
            raise ValueError(f"{label} must be a finite number {spec.allowed}, got {entry!r}"
                             ) from None
        return check_hparam(spec, value, label)

    return parse_list(text, label, parse, unique=True)


def _parse_algorithms(text: str) -> list[str]:
    names = parse_list(text, "--algorithms", lambda entry, _: entry, unique=True)
    unknown = [n for n in names if n not in _algorithm_names()]
    if unknown:
        raise ValueError(f"--algorithms: unknown {', '.join(map(repr, unknown))}; valid: "
                         f"{', '.join(_algorithm_names())}")
    return names


def _parse_chunks(text: str) -> list[int]:
    spec = next(spec for spec in COMMON if spec.name == "chunk_size")
    return parse_list(
        text, "--chunk-size", lambda entry, label: check_hparam(spec, parse_int(entry, label),
                                                                label))


# The list flags: the axis each names, and how its text is read.
_LIST_FLAGS = {"seeds": ("seed", _parse_seeds), "sweep_lr": ("lr", _parse_lrs),
               "algorithms": ("algorithm", _parse_algorithms)}


def _flag_grid(args: argparse.Namespace, explicit: set[str]) -> config.Grid:
    """The options given on the command line as a grid (their values win)."""
    settings: dict[str, config.Setting] = {}
    for dest in sorted(explicit - _NOT_KEYS):
        value = getattr(args, dest)
        if dest in _LIST_FLAGS:
            key, parse = _LIST_FLAGS[dest]
            entry = config.Setting(tuple(parse(value)), True, _flag(dest), "flag")
        elif dest == "no_progress":
            key, entry = "progress", config.Setting((not value,), False, _flag(dest), "flag")
        else:
            key, entry = dest, config.Setting((value,), False, _flag(dest), "flag")
        if key in settings:
            other = settings[key].label
            first, second = sorted((other, entry.label), key=len)
            hint = (" (--partition-seed keeps one split for every seed)" if key == "seed"
                    else "")
            raise ValueError(f"give {first} or {second}, not both{hint}")
        settings[key] = entry
    return config.Grid(settings)


def _base_grid(command: str) -> config.Grid:
    if command == "compare":
        return config.defaults_grid({"algorithms": list(DEFAULT_COMPARE),
                                     "seeds": list(DEFAULT_COMPARE_SEEDS)}, _flag)
    return config.Grid()


def _grid(args: argparse.Namespace) -> config.Grid:
    """Defaults < --config file < --set < flags given explicitly."""
    explicit = _explicit(args)
    grids = [_base_grid(args.command)]
    if getattr(args, "config", None) is not None:
        grids.append(config.load_config(args.config))
    overrides = config.parse_set(args.set or [])
    flags = _flag_grid(args, explicit)
    for key in overrides.settings.keys() & flags.settings.keys():
        raise ValueError(f"{overrides.settings[key].label} and {flags.settings[key].label} "
                         "set the same option; give one")
    return config.merge(*grids, overrides, flags)


def _is_sweep(grid: config.Grid) -> bool:
    """``run`` with several seeds or learning rates (or --seeds / --sweep-lr)."""
    entries = list(grid.settings.items()) + [
        (k, s) for table in grid.tables.values() for k, s in table.items()]
    return any(key in ("seed", "lr") and entry.axis for key, entry in entries)


def _tune_options(args: argparse.Namespace) -> dict[str, tuple] | None:
    """The tuning options as ``key -> (value, label)``: the config file's ``[tune]`` table,
    overridden by the --tune-* flags given; None when tuning is off (no --tune, no
    table)."""
    explicit = _explicit(args)
    table = {}
    if getattr(args, "config", None) is not None:
        table = config.tune_table(config.read_toml(args.config), source=args.config)
    flags = {key: (getattr(args, f"tune_{key}"), _flag(f"tune_{key}"))
             for key in config.TUNE_KEYS if f"tune_{key}" in explicit}
    if not getattr(args, "tune", False) and not table:
        if flags:
            raise ValueError(f"{sorted(v[1] for v in flags.values())[0]} has no effect "
                             "without --tune (or a [tune] table)")
        return None
    return {**table, **flags}


def _tuning_plan(args: argparse.Namespace, grid: config.Grid,
                 specs: list[ExperimentSpec]) -> list[ExperimentSpec]:
    """``compare --tune``: its grid checked (``args._tune``), and validation rows held out
    of every run (``--val-fraction``, default ``tuning.DEFAULT_VAL_FRACTION``)."""
    from fedjax_sim.tuning import check_tuning, own_grid

    args._tune = None
    given = _tune_options(args)
    if given is None:
        return specs
    if any(spec.eval_split != "test" for spec in specs):
        raise ValueError("--tune scores the test rows of the chosen values; drop "
                         "--eval-split")
    chosen_keys = ["lr"]
    own = given.get("own", (False, ""))[0]
    if own:
        chosen_keys += [found[0] for spec in specs if (found := own_grid(spec.algorithm))]
    entries = {**grid.settings, **{k: e for table in grid.tables.values()
                                    for k, e in table.items()}}
    for key in dict.fromkeys(chosen_keys):
        if key in entries and entries[key].origin != "default":
            what = "learning rate" if key == "lr" else f"{key} (--tune-own)"
            raise ValueError(f"--tune chooses each method's {what}; drop "
                             f"{entries[key].label}")
    lrs_value, lrs_label = given.get("lrs", (args.tune_lrs, "--tune-lrs"))
    lrs = (_parse_lrs(lrs_value, lrs_label) if isinstance(lrs_value, str)
           else list(lrs_value))
    seeds_value, seeds_label = given.get("seeds", (args.tune_seeds, "--tune-seeds"))
    if seeds_value is None:
        seeds = [specs[0].seed]
    elif isinstance(seeds_value, str):
        seeds = parse_list(seeds_value, seeds_label, parse_seed, unique=True)
    else:
        seeds = [check_seed(f"{seeds_label}[{i}]", s) for i, s in enumerate(seeds_value)]
    statistic = given.get("statistic", (args.tune_statistic, ""))[0]
    check_tuning(lrs, seeds, statistic)
    args._tune = {"lrs": lrs, "seeds": seeds, "statistic": statistic, "own": bool(own)}
    if all(spec.val_fraction == 0 for spec in specs):
        specs = [spec.replace(val_fraction=DEFAULT_TUNE_VAL) for spec in specs]
    return specs


def plan(args: argparse.Namespace) -> list[ExperimentSpec]:
    """The checked specs of a ``run``, ``compare`` or ``sweep`` command line.

    Raises:
      ValueError: any bad option, key or value, named as it was given (``--lr``,
        ``grid.toml: lr``, ``--set lr``) with what it allows; nothing is loaded.
    """
    command = args.command
    grid = _grid(args)
    if command != "compare" and getattr(args, "config", None) is not None and \
            config.tune_table(config.read_toml(args.config), source=args.config):
        raise ValueError(f"{args.config}: [{config.TUNE_TABLE}] works with `fedjax-sim "
                         "compare` only")
    if command == "run":
        config.check_axes(grid, ("seed", "lr"), "run")
        args._sweep = _is_sweep(grid)
    elif command == "compare":
        config.check_axes(grid, ("seed", "algorithm"), "compare")
    else:
        config.check_axes(grid, None, "sweep")
    config.refuse_keys(grid, _REFUSED.get(command, {}))
    names = grid.settings["algorithm"].values if "algorithm" in grid.settings else None
    if command == "compare" and "local" not in names:
        # Local always runs first as the reference, with the options Local takes.
        algorithm = grid.settings["algorithm"]
        grid = config.merge(grid, config.Grid({"algorithm": config.Setting(
            ("local", *names), True, algorithm.label, algorithm.origin)}))
    specs = config.expand(grid, default_label=_flag,
                          unclocked=("local",) if command == "compare" else ())
    if command == "compare":
        specs = _tuning_plan(args, grid, specs)
    if command in ("compare", "sweep"):
        specs = share_public_split(specs)
    # An option given explicitly that acts in no configuration: refused, not ignored.
    config.refuse_without_effect(grid, specs, default_label=_flag)
    strategy = grid.settings.get("sweep_strategy")
    if command == "run" and not args._sweep and strategy and strategy.origin != "default":
        raise ValueError(f"{strategy.label} has no effect on a single run: it sets how the "
                         "configurations of a sweep (--seeds, --sweep-lr) run together; drop "
                         f"{strategy.label}")
    if command == "compare":
        args._names = list(names)
    if command == "run" and args._sweep:
        spec = specs[0]
        if algorithms.uses_public(spec.algorithm) or spec.resume:
            raise ValueError("--seeds/--sweep-lr take no public-data algorithm or --resume "
                             "(use `fedjax-sim sweep`)")
    return specs


def check_args(args: argparse.Namespace) -> None:
    """Checks every option of ``args`` before anything is loaded or compiled; for ``run``,
    ``compare`` and ``sweep`` the checked specs are kept as ``args._specs``.

    Raises:
      ValueError: naming the option as typed (``--lr``) or as the config file names it,
        and what it allows; list options are checked entry by entry, paths without
        creating anything.
    """
    if args.command == "bench":
        try:
            parse_cpu_devices(args.cpu_devices)
        except ValueError:
            raise ValueError(f"--cpu-devices must be 'auto' or an integer >= 1, got "
                             f"{args.cpu_devices!r}") from None
        _check_bench_args(args)
        return
    args._specs = plan(args)
    args.cpu_devices = args._specs[0].cpu_devices


def _check_bench_args(args: argparse.Namespace) -> None:
    from fedjax_sim.core.cohort import STRATEGIES

    if args.algorithm not in algorithms.ALGORITHMS:
        hint = (config.plugin_hint(args.algorithm)
                if args.algorithm not in algorithms.DISTILLATION else
                ": bench times algorithms without public data")
        raise ValueError(f"--algorithm must be one of {', '.join(algorithms.ALGORITHMS)}; "
                         f"got {args.algorithm!r}{hint}")
    for name in ("num_clients", "local_steps", "batch_size", "rounds", "samples_per_client",
                 "rounds_per_call"):
        check_int(_flag(name), getattr(args, name), 1)
    check_seed("--seed", args.seed)
    if args.devices is not None:
        check_int("--devices", args.devices, 1)
    check_choice("--client-strategy", args.client_strategy, (*STRATEGIES, "all"))
    chunks = _parse_chunks(args.chunk_size)
    if len(chunks) > 1 and args.client_strategy != "all":
        raise ValueError("--chunk-size takes several sizes only with --client-strategy all")
    specs = {spec.name: spec for spec in COMMON}
    for name in ("local_steps", "batch_size"):
        check_hparam(specs[name], getattr(args, name), _flag(name))
    explicit = _explicit(args)
    if "chunk_size" in explicit and args.client_strategy not in ("chunked", "all"):
        raise ValueError(f"--chunk-size has no effect with --client-strategy "
                         f"{args.client_strategy}: only chunked runs the clients in chunks; "
                         "drop --chunk-size or use --client-strategy chunked (or all)")
    if "conv_impl" in explicit and args.model != "cnn":
        raise ValueError(f"--conv-impl has no effect with --model {args.model}: only the cnn "
                         "has convolutions; drop --conv-impl or use --model cnn")


def _check_devices(devices: int | None, *, local: bool = False) -> None:
    """``--devices`` against the devices there are (starts JAX's backends)."""
    if devices is None:
        return
    import jax

    count = jax.local_device_count() if local else jax.device_count()
    if devices > count:
        raise ValueError(f"--devices must be in [1, {count}] (the devices here), got {devices}")


# ---- commands -----------------------------------------------------------------------------


def _options(args: argparse.Namespace, spec: ExperimentSpec) -> dict:
    """Every resolved option (for config.json), and how they were given."""
    return {**spec.values(), "command": args.command, "config": getattr(args, "config", None),
            "set": getattr(args, "set", None), "plugin": getattr(args, "_plugins", None) or None}


def _resume_command(args: argparse.Namespace, output: str, *, flag: str = "--resume") -> str:
    """The command line that resumes this run: the same words, with this --output and
    ``flag`` (none for a sweep) instead of --overwrite."""
    words, skip = [], False
    for word in args._argv:
        if skip:
            skip = False
            continue
        if word in ("--output", "--overwrite", "--resume") or word.startswith("--output="):
            skip = word == "--output"
            continue
        words.append(word)
    return shlex.join(["fedjax-sim", *words, "--output", output, *([flag] if flag else [])])


def _output(spec: ExperimentSpec, kind: str) -> str:
    """The output folder: the spec's, or a fresh runs/<kind>-<dataset>-<time>; checked
    before anything loads or compiles."""
    from fedjax_sim.rundir import default_output, preflight

    output = spec.output
    if output is None:
        if spec.resume:
            raise ValueError("--resume needs --output: the folder of the run to continue")
        output = str(default_output(kind, spec.dataset))
    preflight(output, resume=spec.resume, overwrite=spec.overwrite)
    return output


def _initialize_distributed(spec: ExperimentSpec) -> None:
    if not spec.distributed:
        return
    import jax

    jax.distributed.initialize(coordinator_address=spec.coordinator,
                               num_processes=spec.num_processes, process_id=spec.process_id)


def _sweep_output(spec: ExperimentSpec, kind: str) -> str:
    from fedjax_sim.rundir import default_output

    return spec.output or str(default_output(kind, spec.dataset))


def _run_grid(args: argparse.Namespace, kind: str, on_result):
    from fedjax_sim.sweep import print_line, run_sweep

    specs = args._specs
    first = specs[0]
    _check_devices(first.devices, local=True)
    output = _sweep_output(first, kind)
    return run_sweep(specs, output=output, overwrite=first.overwrite, on_result=on_result,
                     log=print_line, resume_hint=_resume_command(args, output, flag=""),
                     options=_options(args, first))


def cmd_sweep(args: argparse.Namespace):
    """``sweep``: the grid, written as it goes; prints results.md at the end."""

    def report(record: dict) -> None:
        accuracy = record.get("accuracy")
        text = f"{accuracy:.4f}" if accuracy is not None else "—"
        print(f"{record['config']} seed {record['seed']}: {record['status']}, accuracy "
              f"{text}", file=sys.stderr, flush=True)

    result = _run_grid(args, "sweep", report)
    print((result.output / "results.md").read_text(), end="")
    print(f"results in {result.output} ({result.ran} run, {result.skipped} skipped)",
          file=sys.stderr)
    return result


def _run_seeds(args: argparse.Namespace) -> list[dict]:
    """``run`` with several seeds or learning rates: a sweep printing one JSON line per
    finished (configuration, seed)."""
    keys = ("status", "algorithm", "config", "seed", "lr", "accuracy", "client_p10",
            "diverged_at", "wall_s")
    result = _run_grid(args, f"{args._specs[0].algorithm}-sweep",
                       lambda record: print(dumps({k: record.get(k) for k in keys}),
                                            flush=True))
    print(f"results in {result.output} ({result.ran} run, {result.skipped} skipped)",
          file=sys.stderr)
    return result.records


def cmd_run(args: argparse.Namespace) -> dict | list[dict]:
    spec = args._specs[0]
    _initialize_distributed(spec)
    if args._sweep:
        return _run_seeds(args)
    _check_devices(spec.devices)
    output = _output(spec, spec.algorithm)
    spec = spec.replace(output=output)
    built = build(spec)
    hint = _resume_command(args, output)
    if built.local is None:
        summary = run_built(built, options=_options(args, spec), resume_hint=hint).summary
    else:
        summary = _run_with_reference(args, built, hint)
    keys = ("status", "algorithm", "dataset", "accuracy", "client_mean_accuracy",
            "client_p10", "hurt_fraction", "ipr", "tie_fraction", "bytes_up", "wall_s")
    print(dumps({k: summary[k] for k in keys if k in summary}))
    print(f"results in {output}", file=sys.stderr)
    return summary


# The subfolder of a run's output folder that holds its Local reference (--compare-local).
LOCAL_DIR = "local"


def _run_with_reference(args: argparse.Namespace, built, hint: str) -> dict:
    """``run --compare-local``: the run in ``--output``, then its Local reference in
    ``--output``/local (a run folder of its own: config, metrics, summary, checkpoints),
    then the incentive fields against Local's final accuracies added to the run's records
    and summary. Each part stops, diverges and resumes as a run does; ``--resume`` skips
    a part that is finished.

    Returns:
      The run's summary, with the incentive fields.

    Raises:
      fedjax_sim.safety.DivergedError, StoppedError: of the run, or of the Local reference
        (the message then says so).
    """
    spec = built.spec
    out = Path(spec.output)
    options = _options(args, spec)
    run = built._replace(local=None)
    summary = _finished(out, run.algorithm, run) if spec.resume else None
    if summary is None:
        summary = run_built(run, options=options, resume_hint=hint).summary
    local = _local_reference(built, out, options, hint, summary)
    return _add_incentives(out, summary, local)


def _finished(folder: Path, algorithm, built) -> dict | None:
    """The summary of the finished run of ``algorithm`` in ``folder`` (this spec's rounds
    and identity), or None: it is then run, or resumed from its checkpoint."""
    from fedjax_sim import runner

    try:
        summary = json.loads((folder / "summary.json").read_text())
        saved = json.loads((folder / "config.json").read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    spec = built.spec
    done = (isinstance(summary, dict) and summary.get("status") in ("complete", "diverged")
            and summary.get("rounds_done", summary.get("rounds")) == spec.rounds)
    if not done or saved != runner.run_identity(algorithm, built.data, spec.seed,
                                                built.config):
        return None
    if "client_accuracies" not in summary:
        records = _records(folder)
        if records and "client_accuracies" in records[-1]:
            summary["final_client_accuracies"] = records[-1]["client_accuracies"]
    return summary


def _records(folder: Path) -> list[dict]:
    from fedjax_sim.rundir import read_jsonl

    path = folder / "metrics.jsonl"
    return read_jsonl(path) if path.is_file() else []


def _local_reference(built, out: Path, options: dict, hint: str, summary: dict) -> list:
    """Runs (or resumes, or reads back) the Local reference of ``built`` in
    ``out``/local (``local/arch<g>`` per architecture when there are several); returns
    its final per-client accuracies."""
    from fedjax_sim import runner
    from fedjax_sim.safety import DivergedError, StoppedError

    spec = built.spec
    reference = built.local
    several = len(reference.algorithms) > 1
    accuracies = np.full(built.data.num_clients, np.nan)
    for g, (algorithm, members) in enumerate(zip(reference.algorithms, reference.members,
                                                 strict=True)):
        folder = out / LOCAL_DIR / (f"arch{g}" if several else "")
        done = _finished(folder, algorithm, built) if spec.resume else None
        if done is None:
            resume = spec.resume and (folder / runner.CHECKPOINT_DIR).is_dir()
            extra = {**built.extra_summary, "reference_for": spec.algorithm}
            if several:
                extra.update(model=algorithm.models[0].name, architecture=g)
            try:
                result = runner.run(
                    algorithm, built.data, rounds=spec.rounds, eval_every=spec.eval_every,
                    seed=spec.seed, output=folder, checkpoint_every=spec.checkpoint_every,
                    resume=resume, overwrite=folder.exists() and not resume,
                    progress=spec.progress, extra_summary=extra,
                    rounds_per_call=spec.rounds_per_call, devices=spec.devices,
                    config=built.config, options={**options, "reference_for": spec.algorithm},
                    on_divergence=spec.on_divergence, resume_hint=hint)
            except DivergedError as error:
                _mark_reference(out, summary, "diverged")
                raise DivergedError(
                    f"the Local reference diverged: {error} (Local's records: {folder}; the "
                    f"{spec.algorithm} run itself finished in {out}, without the incentive "
                    "fields)", round=error.round, clients=error.clients) from None
            except StoppedError as error:
                _mark_reference(out, summary, "stopped")
                saved = f"; resume with: {hint}" if error.checkpoint else ""
                raise StoppedError(
                    f"stopped in the Local reference at round {error.round} of {spec.rounds} "
                    f"(its checkpoint is in {folder}; the {spec.algorithm} run itself "
                    f"finished in {out}){saved}", round=error.round, signum=error.signum,
                    checkpoint=error.checkpoint) from None
            done = dict(result.summary)
            if "client_accuracies" not in done and result.history:  # diverged, warn
                done["final_client_accuracies"] = result.history[-1]["client_accuracies"]
        final = done.get("client_accuracies", done.get("final_client_accuracies"))
        if final is not None:
            accuracies[members] = np.asarray(final, np.float64)[members]
    return accuracies.tolist()


def _mark_reference(out: Path, summary: dict, status: str) -> None:
    """Records in the run's summary.json where its Local reference is and how it ended."""
    import jax

    from fedjax_sim.rundir import atomic_write_json

    summary["local_reference"] = {"folder": LOCAL_DIR, "status": status}
    if jax.process_index() == 0 and (out / "summary.json").is_file():
        atomic_write_json(out / "summary.json", summary)


def _add_incentives(out: Path, summary: dict, local: list) -> dict:
    """The run's records and summary with the incentive fields against ``local``."""
    import jax

    from fedjax_sim.core.evaluate import federation_incentives
    from fedjax_sim.rundir import write_jsonl

    if jax.process_index() == 0:
        records = _records(out)
        for record in records:
            if "client_accuracies" in record:
                record.update(federation_incentives(record["client_accuracies"], local))
        write_jsonl(out / "metrics.jsonl", records)
    if "client_accuracies" in summary:
        summary.update(federation_incentives(summary["client_accuracies"], local))
    summary.pop("final_client_accuracies", None)
    _mark_reference(out, summary, "complete")
    return summary


def _mean_std(values) -> str:
    values = np.asarray([np.nan if v is None else v for v in values], np.float64)
    if np.isnan(values).all():
        return "—"
    return f"{100 * values.mean():.2f} ± {100 * values.std():.2f}"


def _compare_line(record: dict) -> None:
    accuracy = record.get("accuracy")
    wall = record.get("wall_s")
    print(f"seed {record['seed']} {record['algorithm']}: {record['status']}, accuracy "
          f"{np.nan if accuracy is None else accuracy:.4f} "
          f"({np.nan if wall is None else wall:.1f} s)", file=sys.stderr, flush=True)


def _tune_compare(args: argparse.Namespace, specs: list[ExperimentSpec], out: Path):
    """``compare --tune``: the tuning sweep in ``out/tune``; the specs with the chosen
    learning rates, and the tuning."""
    from fedjax_sim.sweep import print_line
    from fedjax_sim.tuning import own_grid, tune, tuned

    options = args._tune
    lrs = options["lrs"]
    tuning = tune(specs, lrs=lrs, seeds=options["seeds"], output=out, own=options["own"],
                  statistic=options["statistic"], log=print_line)
    for name, values in tuning.chosen.items():
        grids = {"lr": lrs}
        if options["own"] and own_grid(name):
            grids[own_grid(name)[0]] = own_grid(name)[1]
        edges = [key for key, value in values.items()
                 if len(grids[key]) > 1 and value in (min(grids[key]), max(grids[key]))]
        edge = (f" (the edge of its grid in {', '.join(edges)}: the best may lie beyond)"
                if edges else "")
        print(f"tuned {name}: {describe(values)} ({options['statistic']} validation "
              f"accuracy {tuning.scores[name][describe(values)]:.4f}){edge}",
              file=sys.stderr)
    return tuned(specs, tuning.chosen), tuning


def _compare_table(names: list[str], rows_of: dict[str, list[dict]], tuning) -> str:
    """compare.md's table: mean ± std over the seeds, one row per algorithm."""
    # IPR leads with its strict rate (accuracy above Local's), the ties beside it.
    header = ("| algorithm | accuracy % | client mean % | bottom decile % | strict IPR % "
              "| ties % | IPR with ties % | hurt % | MB up | wall s |")
    if tuning is not None:
        header = "| algorithm | tuned | " + header[len("| algorithm | "):]
    lines = [header, "|" + "---|" * (10 + (tuning is not None))]
    for name in names:
        rows = [r for r in rows_of[name] if r["status"] == "complete"]
        failed = len(rows_of[name]) - len(rows)
        if not rows:
            lines.append(f"| {name} | diverged in {failed} of {failed} runs |" + " |" * 8)
            continue
        label = name if not failed else f"{name} ({failed} of {failed + len(rows)} diverged)"
        if tuning is not None:
            label += f" | {describe(tuning.chosen[name])}"
        lines.append(
            f"| {label} | {_mean_std([r['accuracy'] for r in rows])} "
            f"| {_mean_std([r['client_mean_accuracy'] for r in rows])} "
            f"| {_mean_std([r['client_p10'] for r in rows])} "
            f"| {_mean_std([r.get('ipr_strict') for r in rows])} "
            f"| {_mean_std([r.get('tie_fraction') for r in rows])} "
            f"| {_mean_std([r.get('ipr') for r in rows])} "
            f"| {_mean_std([r.get('hurt_fraction') for r in rows])} "
            f"| {np.mean([r.get('bytes_up', np.nan) for r in rows]) / 1e6:.2f} "
            f"| {np.mean([r['wall_s'] for r in rows]):.1f} |"
        )
    return "\n".join(lines)


def _compare_setting(args: argparse.Namespace, specs: list[ExperimentSpec], num_clients: int,
                     tuning) -> str:
    """compare.md's first line: the data setting, seeds, clock and tuning."""
    first = specs[0]
    seeds = list(dict.fromkeys(spec.seed for spec in specs))
    split = ("" if first.partition_seed is None
             else f", split of partition seed {first.partition_seed}")
    timed = next((spec for spec in specs if spec.system is not None), None)
    clock = ("" if timed is None else f"; virtual clock: system {timed.system}, condition "
             f"{timed.condition or 'wait_all'} (Local without it)")
    tuned_note = ""
    if tuning is not None:
        options = args._tune
        what = "lr and each method's own key hyperparameter" if options["own"] else "lr"
        tuned_note = (f"; {what} tuned per method on validation rows ({first.val_fraction:g} "
                      f"of each client's training rows, held out of every run), lr over "
                      f"{', '.join(f'{lr:g}' for lr in options['lrs'])}, seeds "
                      f"{','.join(map(str, options['seeds']))}: best mean "
                      f"{options['statistic']} validation accuracy")
    return (f"{first.dataset}, {first.partition} (alpha={first.alpha}), "
            f"K={num_clients}, {first.rounds} rounds, "
            f"seeds {','.join(map(str, seeds))}{split}{clock}{tuned_note}")


def _num_clients(out: Path, records: list[dict]) -> int | None:
    """The client count the runs recorded (the first summary that says)."""
    for record in records:
        try:
            return json.loads((out / record["path"] / "summary.json").read_text())["num_clients"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def cmd_compare(args: argparse.Namespace) -> list[dict]:
    """``compare``: the plan → group → execute → report pipeline of a sweep
    (``fedjax_sim.sweep``), Local first as every other run's reference, one folder per
    algorithm and seed (``<algorithm>/seed<s>/``), and the table."""
    from fedjax_sim import sweep
    from fedjax_sim.rundir import RunDir, atomic_write_json, atomic_write_text, preflight

    specs = args._specs
    names = args._names
    first = specs[0]
    out = Path(_output(first, "compare"))
    preflight(out, overwrite=first.overwrite)
    with RunDir(out, overwrite=first.overwrite):
        tuning = None
        if getattr(args, "_tune", None) is not None:
            specs, tuning = _tune_compare(args, specs, out)
        grid = sweep.plan(specs, by_algorithm=True, reference="local")
        result = sweep.execute(grid, out, on_result=_compare_line, log=sweep.print_line,
                               options=_options(args, first))
        rows_of = {name: [r for r in result.records if r["algorithm"] == name]
                   for name in names}
        table = _compare_table(names, rows_of, tuning)
        setting = _compare_setting(args, specs, _num_clients(out, result.records), tuning)
        atomic_write_text(out / "compare.md", f"{setting}\n\n{table}\n")
        atomic_write_json(out / "compare.json", {
            **rows_of,
            **({} if tuning is None else {"tuning": {
                "chosen": tuning.chosen, "folder": tuning.folder.name,
                "statistic": tuning.statistic,
                "validation_accuracy": tuning.scores}})})
    print(setting + "\n\n" + table)
    print(f"results in {out}", file=sys.stderr)
    return [r for rows in rows_of.values() for r in rows]


def cmd_bench(args: argparse.Namespace) -> dict | list[dict]:
    from fedjax_sim.bench import bench, matmul_peak

    chunks = _parse_chunks(args.chunk_size)
    _check_devices(args.devices)
    if args.client_strategy == "all":
        plan = [("vmap", chunks[0]), ("sequential", chunks[0])]
        plan += [("chunked", c) for c in chunks]
    else:
        plan = [(args.client_strategy, chunks[0])]
    print(_bench_header(args, plan), file=sys.stderr, flush=True)
    # The machine's peak: the better of one matmul on one device and one per device at once.
    peak = max(matmul_peak(), matmul_peak(all_devices=True)) if args.peak else None
    results = []
    for strategy, chunk in plan:
        result = bench(
            algorithm=args.algorithm, model=args.model, num_clients=args.num_clients,
            local_steps=args.local_steps, batch_size=args.batch_size, rounds=args.rounds,
            rounds_per_call=args.rounds_per_call, samples_per_client=args.samples_per_client,
            client_strategy=strategy, chunk_size=chunk, conv_impl=args.conv_impl,
            seed=args.seed, devices=args.devices,
        )
        if peak is not None:
            result["matmul_peak_gflops"] = peak
            result["peak_fraction"] = result["gflops"] / peak
        print(dumps(result), flush=True)
        results.append(result)
    return results[0] if len(results) == 1 else results


def _bench_header(args: argparse.Namespace, plan: list[tuple[str, int]]) -> str:
    """The first line of ``bench``: what it times, and what it prints as it goes."""
    import jax

    from fedjax_sim.core.cohort import resolve

    def name(strategy: str, chunk: int) -> str:
        if strategy == "auto":
            concrete, size = resolve(strategy, chunk)
            return f"auto ({name(concrete, size)} here)"
        return f"chunked:{chunk}" if strategy == "chunked" else strategy

    strategies = [name(strategy, chunk) for strategy, chunk in plan]
    peak = ("; first the matmul peak (--peak)" if args.peak else "")
    return (f"fedjax-sim bench: timing {args.algorithm} rounds of {args.num_clients} clients "
            f"x {args.local_steps} local steps x batch {args.batch_size} ({args.model} on "
            f"random 28x28x1 data, {jax.default_backend()}), {len(strategies)} client "
            f"strateg{'y' if len(strategies) == 1 else 'ies'}: {', '.join(strategies)}; "
            f"each compiles, then times {args.rounds} rounds and prints one JSON line{peak}")


def _within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return path == root or root in path.parents


def _error_message(error: BaseException, args: argparse.Namespace | None) -> str:
    """One line for ``error``; an OS error on a path given by an option names the option."""
    if isinstance(error, OSError) and error.filename is not None:
        reason = error.strerror or str(error)
        text = f"{error.filename}: {reason}"
        specs = getattr(args, "_specs", None)
        for key in ("output", "partition_file", "save_partition", "data_dir"):
            value = getattr(args, key, None)
            if value is None and specs:  # set by a config file
                value = getattr(specs[0], key, None)
            if value is not None and _within(error.filename, value):
                where = f"{_flag(key)} {value}"
                same = _within(value, error.filename)
                text = f"{where}: {reason}" if same else f"{where}: {error.filename}: {reason}"
                break
    elif isinstance(error, MemoryError):
        text = f"out of memory: {error}" if str(error) else "out of memory"
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Runs one command.

    Bad input (a ValueError, an OS error on a file, an unreadable JSON file, a JAX backend
    that cannot start) ends the process with one line ``fedjax-sim <command>: error: ...``
    on stderr and exit status 2, and Ctrl-C with ``fedjax-sim <command>: interrupted`` and
    status 130; only an unexpected error type, a bug, shows a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = _Parser(prog="fedjax-sim")  # until the full parser is built
    prog, args = parser.prog + (f" {command}" if command else ""), None
    handlers = {"run": cmd_run, "compare": cmd_compare, "sweep": cmd_sweep,
                "bench": cmd_bench}
    from fedjax_sim.core.checkpoint import CheckpointError
    from fedjax_sim.safety import RunError, StoppedError

    restore = _one_line_warnings(lambda: prog)
    try:
        plugins = _load_plugins(argv)
        parser = build_parser()
        args = parser.parse_args(argv)
        args._argv = argv
        args._plugins = plugins
        prog = f"{parser.prog} {args.command}"
        check_environment()
        check_args(args)  # everything, before any data loads or anything compiles
        # Before anything starts JAX's backends: the device count is fixed from then on.
        configure_cpu_devices(args.cpu_devices)
        if args.compile_cache:
            enable_compile_cache()
        handlers[args.command](args)
    except StoppedError as error:
        parser.exit(error.exit_code, f"{prog}: {error}\n")
    except RunError as error:
        parser.exit(error.exit_code, f"{prog}: error: {error}\n")
    except CheckpointError as error:
        parser.exit(2, f"{prog}: error: checkpoint {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{prog}: interrupted\n")
    except (ValueError, OSError, MemoryError) as error:
        parser.exit(2, f"{prog}: error: {_error_message(error, args)}\n")
    except RuntimeError as error:
        # JAX_PLATFORMS naming a backend that is not there.
        if not str(error).startswith("Unable to initialize backend"):
            raise
        parser.exit(2, f"{prog}: error: {_error_message(error, args)}\n")
    finally:
        restore()
    return 0


def _one_line_warnings(prog: Callable[[], str]) -> Callable[[], None]:
    """Warnings as one line ``fedjax-sim <command>: warning: ...`` (no source line), and
    the libraries' own error logs (orbax on a torn checkpoint, which the run handles and
    reports itself) kept off the terminal; returns what restores both."""
    import logging
    import warnings

    shown = warnings.formatwarning
    warnings.formatwarning = (lambda message, category, filename, lineno, line=None:
                              f"{prog()}: warning: {message}\n")
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)

    def restore() -> None:
        warnings.formatwarning = shown
        absl.setLevel(level)

    return restore


if __name__ == "__main__":
    sys.exit(main())
