"""The command-line parser: every flag, generated from the option schema where the option is a
spec field (``fedjax_sim.options``), and the plug-ins loaded before it is built.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path

from fedjax_sim import algorithms, config
from fedjax_sim.algorithms.base import COMMON, HParam
from fedjax_sim.models.layers import CONV_IMPLS
from fedjax_sim.options import fill_help
from fedjax_sim.spec import (
    DEFAULT_PUBLIC_FRACTION,
    HETEROGENEOUS,
    KINDS,
    OPTIONS,
    ExperimentSpec,
)
from fedjax_sim.tuning import DEFAULT_LRS, STATISTICS
from fedjax_sim.tuning import DEFAULT_VAL_FRACTION as DEFAULT_TUNE_VAL

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
