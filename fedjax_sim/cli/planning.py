"""Options to specs: flags, ``--config`` files and ``--set`` merged into a grid and expanded
into checked ``ExperimentSpec`` s, before anything loads or compiles.
"""

from __future__ import annotations

import argparse

from fedjax_sim import algorithms, config
from fedjax_sim.algorithms.base import COMMON, check_hparam
from fedjax_sim.checks import (
    check_choice,
    check_int,
    check_seed,
    parse_int,
    parse_list,
    parse_seed,
)
from fedjax_sim.cli.parser import (
    DEFAULT_COMPARE,
    DEFAULT_COMPARE_SEEDS,
    _flag,
    build_parser,
)
from fedjax_sim.platform import (
    parse_cpu_devices,
)
from fedjax_sim.spec import (
    OPTIONS,
    ExperimentSpec,
    share_public_split,
)
from fedjax_sim.tuning import DEFAULT_VAL_FRACTION as DEFAULT_TUNE_VAL

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
