"""``fedjax-sim``: run, compare and benchmark algorithms from the command line.

  fedjax-sim run --algorithm fedper --dataset digits --alpha 0.1 --output runs/fedper
  fedjax-sim compare                      # the default comparison on digits, 3 seeds
  fedjax-sim bench --model cnn --num-clients 50 --local-steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import COMMON, HParam
from fedjax_sim.models.layers import CONV_IMPLS
from fedjax_sim.platform import configure_cpu_devices

# Federated distillation: public data held out of the pool unless --public-dataset is given.
DEFAULT_PUBLIC_FRACTION = 0.2
DEFAULT_VAL_FRACTION = 0.05
_HETEROGENEOUS = ("fedmd", "fccl")

DEFAULT_COMPARE = ("fedavg", "local", "fedavg_ft", "fedper", "fedrep", "fedbabu", "lg_fedavg",
                   "ditto", "apfl")


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


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    from fedjax_sim.data import PARTITIONS, SOURCES

    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="digits", help=f"one of {', '.join(SOURCES)}")
    group.add_argument("--data-dir", default=None, help="tfds data directory (tfds sources)")
    group.add_argument("--partition", default="dirichlet", help=f"one of {', '.join(PARTITIONS)}")
    group.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration (> 0)")
    group.add_argument("--num-clients", type=int, default=20, help="number of clients K")
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
    parser = argparse.ArgumentParser(
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
    run.add_argument("--output", default="runs/latest", help="output directory")
    run.add_argument("--compare-local", action="store_true",
                     help="also run Local on the same split and report the hurt fraction "
                     "and the incentivized participation rate")
    run.add_argument("--checkpoint-every", type=int, default=0)
    run.add_argument("--resume", action="store_true",
                     help="continue from the latest checkpoint in OUTPUT/checkpoints")
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
    compare.add_argument("--output", default="runs/compare", help="output directory")
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


def _model_for(name: str, input_shape: tuple[int, ...], num_classes: int):
    from fedjax_sim.models import make_model

    if name == "auto":
        image = len(input_shape) == 3 and min(input_shape[:2]) >= 16
        name = "cnn" if image else "mlp"
    return make_model(name, input_shape, num_classes)


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

    parsed = []
    for item in spec.split(","):
        name, _, widths = item.strip().partition(":")
        if name not in MODELS:
            raise ValueError(f"--architectures: unknown model {name!r} in {spec!r}; "
                             f"valid: {', '.join(MODELS)}")
        options = {}
        if widths:
            if name != "mlp" or not all(w.isdigit() and int(w) > 0 for w in widths.split("x")):
                raise ValueError(f"--architectures: {item!r} must be mlp:W or mlp:W1xW2 with "
                                 "positive widths (only mlp takes widths)")
            options["hidden"] = tuple(int(w) for w in widths.split("x"))
        parsed.append((name, options))
    return parsed


def _models_for(args: argparse.Namespace, input_shape, num_classes):
    """The model, or with --architectures a tuple of models (FedMD, FCCL)."""
    if args.architectures is None:
        return _model_for(args.model, input_shape, num_classes)
    from fedjax_sim.models import make_model

    return tuple(make_model(name, input_shape, num_classes, **options)
                 for name, options in _parse_architectures(args.architectures))


def _local_reference(args: argparse.Namespace, model, data, seed: int) -> list[float]:
    """Per-client accuracies of Local on ``data``; with several architectures each client
    uses its own (client k runs architecture k mod A, as in FedMD and FCCL)."""
    from fedjax_sim.algorithms.fedmd import group_members
    from fedjax_sim.runner import run

    models = model if isinstance(model, tuple) else (model,)
    accuracies = np.zeros(data.num_clients)
    for m, idx in zip(models, group_members(data.num_clients, len(models)), strict=True):
        reference = algorithms.make("local", m, **_hparams_for("local", args, strict=False))
        result = run(reference, data, rounds=args.rounds, eval_every=args.rounds, seed=seed,
                     progress=not args.no_progress)
        accuracies[idx] = np.asarray(result.summary["client_accuracies"])[idx]
    return accuracies.tolist()


def _model_names(model) -> str:
    return ",".join(m.name for m in model) if isinstance(model, tuple) else model.name


def _check_loop(args: argparse.Namespace) -> None:
    from fedjax_sim.runner import validate_run_options

    validate_run_options(rounds=args.rounds, eval_every=args.eval_every,
                         checkpoint_every=getattr(args, "checkpoint_every", 0))


def _csv(text: str, kind: type, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None
    if not values:
        raise ValueError(f"{flag} must name at least one value")
    return values


def cmd_sweep(args: argparse.Namespace) -> list[dict]:
    """``run`` with ``--seeds`` / ``--sweep-lr``: the whole grid as one simulation."""
    from fedjax_sim.runner import sweep

    if algorithms.uses_public(args.algorithm) or args.compare_local or args.resume:
        raise ValueError("--seeds/--sweep-lr take no public-data algorithm, --compare-local "
                         "or --resume")
    seeds = _csv(args.seeds, int, "--seeds") if args.seeds else [args.seed]
    lrs = _csv(args.sweep_lr, float, "--sweep-lr") if args.sweep_lr else None
    hparams = _hparams_for(args.algorithm, args, strict=True)
    algorithms.resolve(args.algorithm, **hparams)
    _check_loop(args)
    data = _load_data(args, args.seed, args.save_partition)
    model = _model_for(args.model, data.input_shape, data.num_classes)
    summaries = sweep(args.algorithm, model, data, seeds=seeds, lrs=lrs, rounds=args.rounds,
                      eval_every=args.eval_every, hparams=hparams, output=args.output,
                      rounds_per_call=args.rounds_per_call,
                      config_strategy=args.sweep_strategy, progress=not args.no_progress,
                      devices=args.devices)
    for summary in summaries:
        print(json.dumps({k: summary[k] for k in ("algorithm", "seed", "lr", "accuracy",
                                                  "client_p10", "sweep_wall_s")}))
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
    if args.seeds or args.sweep_lr:
        return cmd_sweep(args)
    hparams = _hparams_for(args.algorithm, args, strict=True)
    algorithms.resolve(args.algorithm, **hparams)  # fail before loading or compiling
    _check_loop(args)
    if args.architectures is not None:
        if args.algorithm not in _HETEROGENEOUS:
            raise ValueError(f"--architectures applies to {' and '.join(_HETEROGENEOUS)}, "
                             f"not {args.algorithm}")
        _parse_architectures(args.architectures)
    data, public = _load_with_public(args, args.seed, [args.algorithm], args.save_partition)
    model = _models_for(args, data.input_shape, data.num_classes)
    local_accuracies = None
    if args.compare_local and args.algorithm != "local":
        local_accuracies = _local_reference(args, model, data, args.seed)
    algorithm = algorithms.make(args.algorithm, model, **_public_kw(args.algorithm, public),
                                **hparams)
    extra = {"model": _model_names(model)}
    if public is not None:
        extra.update(public=public.name, public_size=public.num_samples,
                     public_val_size=public.num_val)
    result = run(
        algorithm, data, rounds=args.rounds, eval_every=args.eval_every, seed=args.seed,
        output=args.output, local_accuracies=local_accuracies,
        checkpoint_every=args.checkpoint_every, resume=args.resume,
        progress=not args.no_progress, extra_summary=extra,
        rounds_per_call=args.rounds_per_call, devices=args.devices,
    )
    summary = result.summary
    keys = ("algorithm", "dataset", "accuracy", "client_mean_accuracy", "client_p10",
            "hurt_fraction", "ipr", "bytes_up", "wall_s")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return summary


def _mean_std(values) -> str:
    values = np.asarray(values, np.float64)
    if np.isnan(values).all():
        return "—"
    return f"{100 * values.mean():.2f} ± {100 * values.std():.2f}"


def cmd_compare(args: argparse.Namespace) -> list[dict]:
    from fedjax_sim.runner import run

    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not names or not seeds:
        raise ValueError("--algorithms and --seeds must each name at least one value")
    for name in names:
        algorithms.resolve(name, **_hparams_for(name, args, strict=False))
    _check_loop(args)
    if args.architectures is not None:
        raise ValueError("--architectures works with `fedjax-sim run`; compare uses one --model")
    out = Path(args.output)
    results: dict[str, list[dict]] = {name: [] for name in names}
    order = ["local"] + [n for n in names if n != "local"]  # local first: the reference
    for seed in seeds:
        data, public = _load_with_public(args, seed, names)
        model = _model_for(args.model, data.input_shape, data.num_classes)
        local_accuracies = None
        for name in order:
            if name == "local" and name not in names and local_accuracies is not None:
                continue
            algorithm = algorithms.make(name, model, **_public_kw(name, public),
                                        **_hparams_for(name, args, strict=False))
            summary = run(
                algorithm, data, rounds=args.rounds, eval_every=args.eval_every, seed=seed,
                output=out / f"{name}_seed{seed}" if name in names else None,
                local_accuracies=local_accuracies, progress=not args.no_progress,
                extra_summary={"model": model.name},
            ).summary
            if name == "local":
                local_accuracies = summary["client_accuracies"]
            if name in names:
                results[name].append(summary)
            print(f"seed {seed} {name}: accuracy {summary['accuracy']:.4f} "
                  f"({summary['wall_s']:.1f} s)", file=sys.stderr)

    header = ("| algorithm | accuracy % | client mean % | bottom decile % | hurt % | IPR % "
              "| MB up | wall s |")
    lines = [header, "|" + "---|" * 8]
    for name in names:
        rows = results[name]
        lines.append(
            f"| {name} | {_mean_std([r['accuracy'] for r in rows])} "
            f"| {_mean_std([r['client_mean_accuracy'] for r in rows])} "
            f"| {_mean_std([r['client_p10'] for r in rows])} "
            f"| {_mean_std([r.get('hurt_fraction', np.nan) for r in rows])} "
            f"| {_mean_std([r.get('ipr', np.nan) for r in rows])} "
            f"| {np.mean([r['bytes_up'] for r in rows]) / 1e6:.2f} "
            f"| {np.mean([r['wall_s'] for r in rows]):.1f} |"
        )
    table = "\n".join(lines)
    setting = (f"{args.dataset}, {args.partition} (alpha={args.alpha}), K={args.num_clients}, "
               f"{args.rounds} rounds, seeds {','.join(map(str, seeds))}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(f"{setting}\n\n{table}\n")
    (out / "compare.json").write_text(json.dumps(
        {name: [{k: v for k, v in r.items() if k != "client_accuracies"} for r in rows]
         for name, rows in results.items()}, indent=2, default=str))
    print(setting + "\n\n" + table)
    return [r for rows in results.values() for r in rows]


def cmd_bench(args: argparse.Namespace) -> dict | list[dict]:
    from fedjax_sim.bench import bench, matmul_peak

    chunks = [int(c) for c in str(args.chunk_size).split(",") if c.strip()]
    if not chunks or min(chunks) < 1:
        raise ValueError("--chunk-size must hold positive integers")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"run": cmd_run, "compare": cmd_compare, "bench": cmd_bench}
    try:
        # Before anything starts JAX's backends: the device count is fixed from then on.
        configure_cpu_devices(args.cpu_devices)
        handlers[args.command](args)
    except ValueError as error:
        parser.exit(2, f"fedjax-sim {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
