"""``fedjax-sim``: run, compare and benchmark algorithms from the command line.

  fedjax-sim run --algorithm fedper --dataset digits --alpha 0.1 --output runs/fedper
  fedjax-sim compare                      # the default comparison on digits, 3 seeds
  fedjax-sim bench --model cnn --num-clients 50 --local-steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import COMMON, HParam, check_hparam
from fedjax_sim.checks import (
    check_choice,
    check_float,
    check_input_dir,
    check_int,
    check_output_dir,
    check_output_file,
    check_seed,
    parse_int,
    parse_list,
    parse_seed,
)
from fedjax_sim.models.layers import CONV_IMPLS, DEFAULT_INIT
from fedjax_sim.platform import (
    check_environment,
    configure_cpu_devices,
    enable_compile_cache,
    parse_cpu_devices,
)

# Federated distillation: public data held out of the pool unless --public-dataset is given.
DEFAULT_PUBLIC_FRACTION = 0.2
DEFAULT_VAL_FRACTION = 0.05
_HETEROGENEOUS = ("fedmd", "fccl")

DEFAULT_COMPARE = ("fedavg", "local", "fedavg_ft", "fedper", "fedrep", "fedbabu", "lg_fedavg",
                   "ditto", "apfl")


class _Parser(argparse.ArgumentParser):
    """Argument parser whose errors are one line, ``fedjax-sim <command>: error: ...``,
    without the usage block (sub-commands get this class too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_hparam(group, spec: HParam, seen: set[str]) -> None:
    if spec.name in seen:
        return
    seen.add(spec.name)
    kind = _parse_bool if spec.kind is bool else spec.kind
    group.add_argument(
        _flag(spec.name), dest=spec.name, type=kind, default=None, choices=spec.choices,
        help=f"{spec.help} ({spec.allowed}; default {spec.default})",
    )


def _add_platform_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu-devices", default="auto",
                        help="on a CPU host, how many XLA devices to show: auto (one per "
                        "core; the client axis is sharded over them, each core training its "
                        "own clients) or an integer >= 1 (1: one device whose operations use "
                        "every core). Ignored when XLA_FLAGS sets "
                        "--xla_force_host_platform_device_count")
    parser.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                        help="do not keep compiled programs on disk (default: kept in "
                        "$FEDJAX_SIM_COMPILE_CACHE or ~/.cache/fedjax_sim/jax, so that a "
                        "repeated run of the same shapes skips compiling)")


def _add_output_args(parser: argparse.ArgumentParser, default: str, unless: str) -> None:
    parser.add_argument("--output", default=None,
                        help=f"output folder (default: a new {default}); an existing non-empty "
                        f"folder is refused unless {unless}")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the fedjax-sim results in an existing --output folder")
    parser.add_argument("--on-divergence", default="stop", choices=("stop", "warn"),
                        help="on a NaN or infinite loss or parameter: stop that run at the "
                        "round (default; it is reported as diverged), or warn and go on")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    from fedjax_sim.data import PARTITIONS, SOURCES

    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="digits", help=f"one of {', '.join(SOURCES)}")
    group.add_argument("--data-dir", default=None, help="tfds data directory (tfds sources)")
    group.add_argument("--partition", default="dirichlet", help=f"one of {', '.join(PARTITIONS)}")
    group.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration (> 0)")
    group.add_argument("--num-clients", type=int, default=None,
                       help="number of clients K (default 20; with --partition-file, the "
                       "file's count, which a given value must equal)")
    group.add_argument("--min-samples", type=int, default=10,
                       help="minimum samples per client (dirichlet)")
    group.add_argument("--shards-per-client", type=int, default=2)
    group.add_argument("--classes-per-client", type=int, default=2)
    group.add_argument("--test-ratio", type=float, default=0.25,
                       help="share of each client's data held out for its test set")
    group.add_argument("--partition-file", default=None,
                       help="load the client split from this JSON file")
    group.add_argument("--save-partition", default=None,
                       help="write the client split to this JSON file")
    group.add_argument("--model", default="auto",
                       help="mlp, cnn, resnet or auto (mlp for flat or small inputs, else cnn)")
    group.add_argument("--init", default=DEFAULT_INIT,
                       help="parameter initialization: flax (LeCun-normal kernels, zero "
                       "biases) or torch (PyTorch's nn.Linear / nn.Conv2d defaults, "
                       "kernels and biases U(+-1/sqrt(fan_in)))")
    public = parser.add_argument_group(
        "public data (federated distillation: " + ", ".join(algorithms.DISTILLATION) + ")")
    public.add_argument("--public-fraction", type=float, default=None,
                        help="share of the pool held out as public data before partitioning, "
                        f"in (0, 1) (default {DEFAULT_PUBLIC_FRACTION} when an algorithm needs "
                        "public data and --public-dataset is not given)")
    public.add_argument("--public-dataset", default=None,
                        help="take the public data from this source instead (same input shape)")
    public.add_argument("--public-size", type=int, default=None,
                        help="with --public-dataset: use this many random examples of it")
    public.add_argument("--public-val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="share of the pool held out as the server's labeled validation "
                        "split (FedDF early stopping), in [0, 1)")
    public.add_argument("--architectures", default=None,
                        help="heterogeneous models for " + " and ".join(_HETEROGENEOUS)
                        + ": comma-separated mlp[:WIDTHS], cnn, resnet, e.g. "
                        "mlp:32,mlp:128,mlp:256x128; client k runs architecture k mod A")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--rounds", type=int, default=30, help="communication rounds")
    group.add_argument("--eval-every", type=int, default=5, help="evaluate every N rounds")
    seen: set[str] = set()
    for spec in COMMON:
        _add_hparam(group, spec, seen)
    for name in algorithms.ALGORITHMS + algorithms.DISTILLATION:
        own = algorithms.hparam_specs(name)[len(COMMON):]
        if own:
            sub = parser.add_argument_group(f"{name} hyperparameters")
            for spec in own:
                _add_hparam(sub, spec, seen)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedjax-sim", description="Personalized federated learning simulator (JAX)."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one algorithm")
    run.add_argument("--algorithm", default="fedavg",
                     help=f"one of {', '.join(algorithms.ALGORITHMS + algorithms.DISTILLATION)}")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--seeds", default=None,
                     help="comma-separated seeds run together as one batched simulation on "
                     "the split drawn with --seed (a sweep; see --sweep-lr)")
    run.add_argument("--sweep-lr", default=None,
                     help="comma-separated client learning rates, swept with --seeds")
    run.add_argument("--sweep-strategy", default="auto", choices=("auto", "vmap", "map"),
                     help="how a sweep runs its configurations: vmap, a compiled loop, or "
                     "auto (the loop on CPU, vmap on accelerators)")
    run.add_argument("--rounds-per-call", type=int, default=1,
                     help="rounds per jitted call (lax.scan over rounds)")
    run.add_argument("--devices", type=int, default=None,
                     help="devices to shard the client axis over (default: all visible)")
    run.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() first (one process per host; "
                     "cluster settings auto-detected on TPU pods, SLURM and Open MPI, or "
                     "given by --coordinator/--num-processes/--process-id)")
    run.add_argument("--coordinator", default=None, help="host:port of process 0")
    run.add_argument("--num-processes", type=int, default=None)
    run.add_argument("--process-id", type=int, default=None)
    _add_output_args(run, "runs/<algorithm>-<dataset>-<time>", "--resume or --overwrite")
    run.add_argument("--compare-local", action="store_true",
                     help="also run Local on the same split and report the hurt fraction "
                     "and the incentivized participation rate")
    run.add_argument("--checkpoint-every", type=int, default=0)
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --output from its latest checkpoint (refused "
                     "if any setting that changes results differs; --rounds may grow)")
    run.add_argument("--no-progress", action="store_true")
    _add_platform_args(run)
    _add_data_args(run)
    _add_training_args(run)

    compare = commands.add_parser(
        "compare", help="run several algorithms on the same partitions; print a table"
    )
    compare.add_argument("--algorithms", default=",".join(DEFAULT_COMPARE),
                         help="comma-separated algorithm names")
    compare.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    _add_output_args(compare, "runs/compare-<dataset>-<time>", "--overwrite")
    compare.add_argument("--no-progress", action="store_true")
    _add_platform_args(compare)
    _add_data_args(compare)
    _add_training_args(compare)

    bench = commands.add_parser("bench", help="time rounds on random 28x28x1 data")
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
    _add_platform_args(bench)
    return parser


def _hparams_for(name: str, args: argparse.Namespace, *, strict: bool) -> dict:
    """The hyperparameters set on the command line that ``name`` takes.

    With ``strict``, a flag set for a hyperparameter that ``name`` does not take is an
    error (it would otherwise be silently ignored).
    """
    own = {spec.name for spec in algorithms.hparam_specs(name)}
    every = {spec.name for spec in COMMON}
    for other in algorithms.ALGORITHMS + algorithms.DISTILLATION:
        every |= {spec.name for spec in algorithms.hparam_specs(other)}
    chosen = {}
    for key in sorted(every):
        value = getattr(args, key, None)
        if value is None:
            continue
        if key in own:
            chosen[key] = value
        elif strict:
            raise ValueError(f"{_flag(key)} does not apply to {name}")
    return chosen


def _model_for(name: str, input_shape: tuple[int, ...], num_classes: int, init: str = DEFAULT_INIT):
    from fedjax_sim.models import make_model

    if name == "auto":
        image = len(input_shape) == 3 and min(input_shape[:2]) >= 16
        name = "cnn" if image else "mlp"
    return make_model(name, input_shape, num_classes, init=init)


def _load_data(args: argparse.Namespace, seed: int, save_partition=None):
    from fedjax_sim.data import make_federated_data

    data, _, _ = make_federated_data(
        args.dataset, partition=args.partition, num_clients=args.num_clients, alpha=args.alpha,
        min_samples=args.min_samples, shards_per_client=args.shards_per_client,
        classes_per_client=args.classes_per_client, test_ratio=args.test_ratio, seed=seed,
        data_dir=args.data_dir, partition_file=args.partition_file,
        save_partition=save_partition,
    )
    return data


def _wants_public(names, args: argparse.Namespace) -> bool:
    return (any(algorithms.uses_public(n) for n in names) or args.public_fraction is not None
            or args.public_dataset is not None)


def _load_with_public(args: argparse.Namespace, seed: int, names, save_partition=None):
    """``(data, public)``: the public set (and the validation split) held out of the pool
    before partitioning when any of ``names`` needs it or a public flag is set, so that
    every algorithm of a comparison sees the same private data."""
    if not _wants_public(names, args):
        return _load_data(args, seed, save_partition), None
    from fedjax_sim.data.public import make_federated_data_with_public

    fraction = args.public_fraction
    if fraction is None and args.public_dataset is None:
        fraction = DEFAULT_PUBLIC_FRACTION
    data, public, _, _ = make_federated_data_with_public(
        args.dataset, public_fraction=fraction, public_dataset=args.public_dataset,
        public_size=args.public_size, val_fraction=args.public_val_fraction,
        partition=args.partition, num_clients=args.num_clients, alpha=args.alpha,
        min_samples=args.min_samples, shards_per_client=args.shards_per_client,
        classes_per_client=args.classes_per_client, test_ratio=args.test_ratio, seed=seed,
        data_dir=args.data_dir, partition_file=args.partition_file,
        save_partition_to=save_partition,
    )
    return data, public


def _public_kw(name: str, public) -> dict:
    return {"public": public} if algorithms.uses_public(name) else {}


def _parse_architectures(spec: str) -> list[tuple[str, dict]]:
    """``mlp:64,mlp:128x64,cnn`` -> [(name, options), ...]; checked before any data loads."""
    from fedjax_sim.models import MODELS

    def parse(item: str, _label: str) -> tuple[str, dict]:
        name, _, widths = item.partition(":")
        if name not in MODELS:
            raise ValueError(f"--architectures: unknown model {name!r} in {spec!r}; "
                             f"valid: {', '.join(MODELS)}")
        options = {}
        if widths:
            if name != "mlp" or not all(w.isdecimal() and int(w) > 0 for w in widths.split("x")):
                raise ValueError(f"--architectures: {item!r} must be mlp:W or mlp:W1xW2 with "
                                 "positive widths (only mlp takes widths)")
            options["hidden"] = tuple(int(w) for w in widths.split("x"))
        return name, options

    return parse_list(spec, "--architectures", parse)


def _models_for(args: argparse.Namespace, input_shape, num_classes):
    """The model, or with --architectures a tuple of models (FedMD, FCCL)."""
    if args.architectures is None:
        return _model_for(args.model, input_shape, num_classes, args.init)
    from fedjax_sim.models import make_model

    return tuple(make_model(name, input_shape, num_classes, init=args.init, **options)
                 for name, options in _parse_architectures(args.architectures))


def _local_reference(args: argparse.Namespace, model, data, seed: int) -> list[float]:
    """Per-client accuracies of Local on ``data``, on the run's own evaluation schedule;
    with several architectures each client uses its own (client k runs architecture k mod
    A, as in FedMD and FCCL)."""
    from fedjax_sim.algorithms.fedmd import group_members
    from fedjax_sim.runner import run

    models = model if isinstance(model, tuple) else (model,)
    accuracies = np.zeros(data.num_clients)
    for m, idx in zip(models, group_members(data.num_clients, len(models)), strict=True):
        reference = algorithms.make("local", m, **_hparams_for("local", args, strict=False))
        result = run(reference, data, rounds=args.rounds, eval_every=args.eval_every,
                     seed=seed, progress=not args.no_progress, devices=args.devices,
                     rounds_per_call=getattr(args, "rounds_per_call", 1),
                     on_divergence=args.on_divergence)
        accuracies[idx] = np.asarray(result.summary["client_accuracies"])[idx]
    return accuracies.tolist()


# Options that decide the data, the partition and the model: recorded in config.json and
# matched on --resume (with the algorithm's hyperparameters, the seed and the split itself).
_DATA_OPTIONS = ("dataset", "partition", "alpha", "num_clients", "min_samples",
                 "shards_per_client", "classes_per_client", "test_ratio", "model",
                 "init", "architectures", "public_fraction", "public_dataset", "public_size",
                 "public_val_fraction")


def _data_config(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name, None) for name in _DATA_OPTIONS}


def _options(args: argparse.Namespace) -> dict:
    """Every option as parsed (for config.json)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def _resume_command(args: argparse.Namespace, output: str) -> str:
    """The command line that resumes this run: the same words, with this --output and
    --resume instead of --overwrite."""
    words, skip = [], False
    for word in args._argv:
        if skip:
            skip = False
            continue
        if word in ("--output", "--overwrite", "--resume") or word.startswith("--output="):
            skip = word == "--output"
            continue
        words.append(word)
    return shlex.join(["fedjax-sim", *words, "--output", output, "--resume"])


def _output_for(args: argparse.Namespace, kind: str) -> str:
    """--output, or a fresh runs/<kind>-<dataset>-<time> folder; checked before anything
    loads or compiles."""
    from fedjax_sim.rundir import default_output, preflight

    if args.output is None:
        if getattr(args, "resume", False):
            raise ValueError("--resume needs --output: the folder of the run to continue")
        args.output = str(default_output(kind, args.dataset))
    preflight(args.output, resume=getattr(args, "resume", False), overwrite=args.overwrite)
    return args.output


def _model_names(model) -> str:
    return ",".join(m.name for m in model) if isinstance(model, tuple) else model.name


def _check_loop(args: argparse.Namespace) -> None:
    from fedjax_sim.runner import validate_run_options

    for flag, value in (("--rounds", args.rounds), ("--eval-every", args.eval_every)):
        if value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
    validate_run_options(rounds=args.rounds, eval_every=args.eval_every,
                         checkpoint_every=getattr(args, "checkpoint_every", 0))


def _algorithm_names() -> tuple[str, ...]:
    return algorithms.ALGORITHMS + algorithms.DISTILLATION


def _parse_seeds(text: str) -> list[int]:
    return parse_list(text, "--seeds", parse_seed, unique=True)


def _parse_lrs(text: str) -> list[float]:
    spec = next(spec for spec in COMMON if spec.name == "lr")

    def parse(entry: str, label: str) -> float:
        try:
            value = float(entry)
        except ValueError:
            raise ValueError(f"{label} must be a finite number {spec.allowed}, got {entry!r}"
                             ) from None
        return check_hparam(spec, value, label)

    return parse_list(text, "--sweep-lr", parse, unique=True)


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


def _check_hparam_flags(args: argparse.Namespace) -> None:
    """Every hyperparameter flag that is set, against its spec, named as typed."""
    seen = set()
    for name in _algorithm_names():
        for spec in algorithms.hparam_specs(name):
            value = getattr(args, spec.name, None)
            if spec.name not in seen and value is not None:
                check_hparam(spec, value, _flag(spec.name))
            seen.add(spec.name)


def _check_data_args(args: argparse.Namespace, names: list[str]) -> None:
    from fedjax_sim.data import PARTITIONS, SOURCES, check_partition_file
    from fedjax_sim.data.sources import check_prepared
    from fedjax_sim.models import INITS, MODELS

    check_choice("--dataset", args.dataset, SOURCES)
    check_choice("--partition", args.partition, PARTITIONS)
    check_float("--alpha", args.alpha, 0.0, low_open=True)
    if args.num_clients is not None:  # None: 20, or the partition file's count
        check_int("--num-clients", args.num_clients, 1)
    check_int("--min-samples", args.min_samples, 2)
    check_int("--shards-per-client", args.shards_per_client, 1)
    check_int("--classes-per-client", args.classes_per_client, 1)
    check_float("--test-ratio", args.test_ratio, 0.0, 1.0, low_open=True, high_open=True)
    check_choice("--model", args.model, ("auto", *MODELS))
    check_choice("--init", args.init, INITS)
    if args.public_fraction is not None:
        check_float("--public-fraction", args.public_fraction, 0.0, 1.0, low_open=True,
                    high_open=True)
        if args.public_dataset is not None:
            raise ValueError("give --public-fraction or --public-dataset, not both")
    if args.public_dataset is not None:
        check_choice("--public-dataset", args.public_dataset, SOURCES)
    if args.public_size is not None:
        check_int("--public-size", args.public_size, 1)
        if args.public_dataset is None:
            raise ValueError("--public-size applies only with --public-dataset")
    check_float("--public-val-fraction", args.public_val_fraction, 0.0, 1.0, high_open=True)
    if _wants_public(names, args) and args.public_dataset is None:
        fraction = args.public_fraction or DEFAULT_PUBLIC_FRACTION
        if fraction + args.public_val_fraction >= 1:
            raise ValueError(f"--public-fraction + --public-val-fraction must be < 1, got "
                             f"{fraction} + {args.public_val_fraction}")
    if args.data_dir is not None and "://" not in args.data_dir:
        check_input_dir("--data-dir", args.data_dir)
    for source in (args.dataset, args.public_dataset):
        if source is not None:
            check_prepared(source, args.data_dir)
    if args.partition_file is not None:
        check_partition_file(args.partition_file, "--partition-file")
    if args.save_partition is not None:
        check_output_file("--save-partition", args.save_partition)
    if args.architectures is not None:
        _parse_architectures(args.architectures)


def _check_run_args(args: argparse.Namespace) -> None:
    check_choice("--algorithm", args.algorithm, _algorithm_names())
    check_seed("--seed", args.seed)
    check_int("--rounds-per-call", args.rounds_per_call, 1)
    if args.devices is not None:
        check_int("--devices", args.devices, 1)
    if args.num_processes is not None:
        check_int("--num-processes", args.num_processes, 1)
    if args.process_id is not None:
        check_int("--process-id", args.process_id, 0,
                  None if args.num_processes is None else args.num_processes - 1)
    if args.coordinator is not None:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdecimal() or not 1 <= int(port) <= 65535:
            raise ValueError(f"--coordinator must be host:port with a port in [1, 65535], "
                             f"got {args.coordinator!r}")
    if not args.distributed and (args.coordinator or args.num_processes
                                 or args.process_id is not None):
        raise ValueError("--coordinator/--num-processes/--process-id need --distributed")
    if args.architectures is not None and args.algorithm not in _HETEROGENEOUS:
        raise ValueError(f"--architectures applies to {' and '.join(_HETEROGENEOUS)}, "
                         f"not {args.algorithm}")
    if args.seeds is not None or args.sweep_lr is not None:
        if algorithms.uses_public(args.algorithm) or args.compare_local or args.resume:
            raise ValueError("--seeds/--sweep-lr take no public-data algorithm, "
                             "--compare-local or --resume")
        if args.seeds is not None:
            _parse_seeds(args.seeds)
        if args.sweep_lr is not None:
            _parse_lrs(args.sweep_lr)
            if args.lr is not None:
                raise ValueError("give --lr or --sweep-lr, not both")
    _check_data_args(args, [args.algorithm])
    algorithms.resolve(args.algorithm, **_hparams_for(args.algorithm, args, strict=True))
    _check_loop(args)
    if args.output is not None:  # None: a fresh runs/... folder
        check_output_dir("--output", args.output)


def _check_compare_args(args: argparse.Namespace) -> None:
    names = _parse_algorithms(args.algorithms)
    _parse_seeds(args.seeds)
    if args.architectures is not None:
        raise ValueError("--architectures works with `fedjax-sim run`; compare uses one --model")
    _check_data_args(args, names)
    for name in names:
        algorithms.resolve(name, **_hparams_for(name, args, strict=False))
    _check_loop(args)
    if args.output is not None:  # None: a fresh runs/... folder
        check_output_dir("--output", args.output)


def _check_bench_args(args: argparse.Namespace) -> None:
    from fedjax_sim.core.cohort import STRATEGIES

    check_choice("--algorithm", args.algorithm, algorithms.ALGORITHMS)
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


def check_args(args: argparse.Namespace) -> None:
    """Checks every option of ``args`` before anything is loaded or compiled.

    Raises:
      ValueError: naming the option as typed (``--lr``) and what it allows; list options
        are checked entry by entry, paths without creating anything.
    """
    try:
        parse_cpu_devices(args.cpu_devices)
    except ValueError:
        raise ValueError(f"--cpu-devices must be 'auto' or an integer >= 1, got "
                         f"{args.cpu_devices!r}") from None
    if args.command == "bench":
        _check_bench_args(args)
        return
    _check_hparam_flags(args)
    if args.command == "run":
        _check_run_args(args)
    else:
        _check_compare_args(args)


def _check_devices(devices: int | None, *, local: bool = False) -> None:
    """``--devices`` against the devices there are (starts JAX's backends)."""
    if devices is None:
        return
    import jax

    count = jax.local_device_count() if local else jax.device_count()
    if devices > count:
        raise ValueError(f"--devices must be in [1, {count}] (the devices here), got {devices}")


def cmd_sweep(args: argparse.Namespace) -> list[dict]:
    """``run`` with ``--seeds`` / ``--sweep-lr``: the whole grid as one simulation."""
    from fedjax_sim.runner import sweep

    if algorithms.uses_public(args.algorithm) or args.compare_local or args.resume:
        raise ValueError("--seeds/--sweep-lr take no public-data algorithm, --compare-local "
                         "or --resume")
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    lrs = _parse_lrs(args.sweep_lr) if args.sweep_lr is not None else None
    hparams = _hparams_for(args.algorithm, args, strict=True)
    algorithms.resolve(args.algorithm, **hparams)
    _check_loop(args)
    _check_devices(args.devices, local=True)
    output = _output_for(args, f"{args.algorithm}-sweep")
    data = _load_data(args, args.seed, args.save_partition)
    model = _model_for(args.model, data.input_shape, data.num_classes, args.init)
    summaries = sweep(args.algorithm, model, data, seeds=seeds, lrs=lrs, rounds=args.rounds,
                      eval_every=args.eval_every, hparams=hparams, output=output,
                      rounds_per_call=args.rounds_per_call,
                      config_strategy=args.sweep_strategy, progress=not args.no_progress,
                      devices=args.devices, overwrite=args.overwrite, options=_options(args))
    for summary in summaries:
        print(json.dumps({k: summary.get(k) for k in ("status", "algorithm", "seed", "lr",
                                                      "accuracy", "client_p10", "diverged_at",
                                                      "sweep_wall_s")}))
    print(f"results in {output}", file=sys.stderr)
    return summaries


def _initialize_distributed(args: argparse.Namespace) -> None:
    if not args.distributed:
        if args.coordinator or args.num_processes or args.process_id is not None:
            raise ValueError("--coordinator/--num-processes/--process-id need --distributed")
        return
    import jax

    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)


def cmd_run(args: argparse.Namespace) -> dict:
    from fedjax_sim.runner import run

    _initialize_distributed(args)
    if args.seeds is not None or args.sweep_lr is not None:
        return cmd_sweep(args)
    hparams = _hparams_for(args.algorithm, args, strict=True)
    algorithms.resolve(args.algorithm, **hparams)  # fail before loading or compiling
    _check_loop(args)
    if args.architectures is not None:
        if args.algorithm not in _HETEROGENEOUS:
            raise ValueError(f"--architectures applies to {' and '.join(_HETEROGENEOUS)}, "
                             f"not {args.algorithm}")
        _parse_architectures(args.architectures)
    _check_devices(args.devices)
    output = _output_for(args, args.algorithm)
    data, public = _load_with_public(args, args.seed, [args.algorithm], args.save_partition)
    model = _models_for(args, data.input_shape, data.num_classes)
    local_accuracies = None
    if args.compare_local and args.algorithm != "local":
        local_accuracies = _local_reference(args, model, data, args.seed)
    algorithm = algorithms.make(args.algorithm, model, **_public_kw(args.algorithm, public),
                                **hparams)
    extra = {"model": _model_names(model), "init": args.init}
    if public is not None:
        extra.update(public=public.name, public_size=public.num_samples,
                     public_val_size=public.num_val)
    result = run(
        algorithm, data, rounds=args.rounds, eval_every=args.eval_every, seed=args.seed,
        output=output, local_accuracies=local_accuracies,
        checkpoint_every=args.checkpoint_every, resume=args.resume, overwrite=args.overwrite,
        progress=not args.no_progress, extra_summary=extra,
        rounds_per_call=args.rounds_per_call, devices=args.devices,
        config=_data_config(args), options=_options(args), on_divergence=args.on_divergence,
        resume_hint=_resume_command(args, output),
    )
    summary = result.summary
    keys = ("status", "algorithm", "dataset", "accuracy", "client_mean_accuracy",
            "client_p10", "hurt_fraction", "ipr", "bytes_up", "wall_s")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    print(f"results in {output}", file=sys.stderr)
    return summary


def _mean_std(values) -> str:
    values = np.asarray(values, np.float64)
    if np.isnan(values).all():
        return "—"
    return f"{100 * values.mean():.2f} ± {100 * values.std():.2f}"


def _compare_one(run, algorithm, data, args, seed, output, local_accuracies, model) -> dict:
    """One run of a comparison; a diverged run becomes a row marked as such."""
    from fedjax_sim.safety import DivergedError

    try:
        return run(
            algorithm, data, rounds=args.rounds, eval_every=args.eval_every, seed=seed,
            output=output, local_accuracies=local_accuracies, progress=not args.no_progress,
            extra_summary={"model": model.name, "init": args.init}, config=_data_config(args),
            options=_options(args), on_divergence=args.on_divergence, devices=None,
        ).summary
    except DivergedError as error:
        print(f"fedjax-sim compare: {algorithm.name} seed {seed}: {error}", file=sys.stderr)
        return {"status": "diverged", "algorithm": algorithm.name, "seed": seed,
                "diverged_at": error.round, "accuracy": np.nan, "wall_s": np.nan,
                "bytes_up": np.nan, "client_mean_accuracy": np.nan, "client_p10": np.nan}


def cmd_compare(args: argparse.Namespace) -> list[dict]:
    from fedjax_sim.rundir import RunDir, atomic_write_json, atomic_write_text, environment
    from fedjax_sim.runner import run

    names = _parse_algorithms(args.algorithms)
    seeds = _parse_seeds(args.seeds)
    for name in names:
        algorithms.resolve(name, **_hparams_for(name, args, strict=False))
    _check_loop(args)
    if args.architectures is not None:
        raise ValueError("--architectures works with `fedjax-sim run`; compare uses one --model")
    out = Path(_output_for(args, "compare"))
    results: dict[str, list[dict]] = {name: [] for name in names}
    order = ["local"] + [n for n in names if n != "local"]  # local first: the reference
    with RunDir(out, overwrite=args.overwrite):
        atomic_write_json(out / "config.json", {"options": _options(args),
                                                "environment": environment()})
        for seed in seeds:
            data, public = _load_with_public(args, seed, names)
            model = _model_for(args.model, data.input_shape, data.num_classes, args.init)
            local_accuracies = None
            for name in order:
                if name == "local" and name not in names and local_accuracies is not None:
                    continue
                algorithm = algorithms.make(name, model, **_public_kw(name, public),
                                            **_hparams_for(name, args, strict=False))
                summary = _compare_one(run, algorithm, data, args, seed,
                                       out / f"{name}_seed{seed}" if name in names else None,
                                       local_accuracies, model)
                if name == "local" and summary["status"] != "diverged":
                    local_accuracies = summary["client_accuracies"]
                if name in names:
                    results[name].append(summary)
                print(f"seed {seed} {name}: {summary['status']}, accuracy "
                      f"{summary['accuracy']:.4f} ({summary['wall_s']:.1f} s)", file=sys.stderr)

        header = ("| algorithm | accuracy % | client mean % | bottom decile % | hurt % | IPR % "
                  "| MB up | wall s |")
        lines = [header, "|" + "---|" * 8]
        for name in names:
            rows = [r for r in results[name] if r["status"] != "diverged"]
            failed = len(results[name]) - len(rows)
            if not rows:
                lines.append(f"| {name} | diverged in {failed} of {failed} runs |"
                             + " |" * 6)
                continue
            label = name if not failed else f"{name} ({failed} of {failed + len(rows)} diverged)"
            lines.append(
                f"| {label} | {_mean_std([r['accuracy'] for r in rows])} "
                f"| {_mean_std([r['client_mean_accuracy'] for r in rows])} "
                f"| {_mean_std([r['client_p10'] for r in rows])} "
                f"| {_mean_std([r.get('hurt_fraction', np.nan) for r in rows])} "
                f"| {_mean_std([r.get('ipr', np.nan) for r in rows])} "
                f"| {np.mean([r['bytes_up'] for r in rows]) / 1e6:.2f} "
                f"| {np.mean([r['wall_s'] for r in rows]):.1f} |"
            )
        table = "\n".join(lines)
        setting = (f"{args.dataset}, {args.partition} (alpha={args.alpha}), "
                   f"K={data.num_clients}, {args.rounds} rounds, "
                   f"seeds {','.join(map(str, seeds))}")
        atomic_write_text(out / "compare.md", f"{setting}\n\n{table}\n")
        atomic_write_json(out / "compare.json", {
            name: [{k: v for k, v in r.items() if k != "client_accuracies"} for r in rows]
            for name, rows in results.items()})
    print(setting + "\n\n" + table)
    print(f"results in {out}", file=sys.stderr)
    return [r for rows in results.values() for r in rows]


def cmd_bench(args: argparse.Namespace) -> dict | list[dict]:
    from fedjax_sim.bench import bench, matmul_peak

    chunks = _parse_chunks(args.chunk_size)
    _check_devices(args.devices)
    if args.client_strategy == "all":
        plan = [("vmap", chunks[0]), ("sequential", chunks[0])]
        plan += [("chunked", c) for c in chunks]
    else:
        plan = [(args.client_strategy, chunks[0])]
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
        print(json.dumps(result), flush=True)
        results.append(result)
    return results[0] if len(results) == 1 else results


def _within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return path == root or root in path.parents


def _error_message(error: BaseException, args: argparse.Namespace | None) -> str:
    """One line for ``error``; an OS error on a path given by an option names the option."""
    if isinstance(error, OSError) and error.filename is not None:
        reason = error.strerror or str(error)
        text = f"{error.filename}: {reason}"
        for key in ("output", "partition_file", "save_partition", "data_dir"):
            value = getattr(args, key, None)
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
    parser = build_parser()
    prog, args = parser.prog, None
    handlers = {"run": cmd_run, "compare": cmd_compare, "bench": cmd_bench}
    from fedjax_sim.core.checkpoint import CheckpointError
    from fedjax_sim.safety import RunError, StoppedError

    try:
        args = parser.parse_args(argv)
        args._argv = list(sys.argv[1:] if argv is None else argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
