"""The ``run``, ``sweep`` and ``bench`` commands, and ``run``'s Local reference (``--compare-
local``) as a run folder of its own.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from fedjax_sim.cli.planning import (
    _check_devices,
    _parse_chunks,
)
from fedjax_sim.rundir import dumps
from fedjax_sim.spec import (
    ExperimentSpec,
    build,
    run_built,
)


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
