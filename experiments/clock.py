"""Devices and time: synchronous rounds, a deadline, over-selection, FedAsync and FedBuff on
a virtual clock, under homogeneous and log-normal devices.

For each dataset (Dirichlet 0.1, min 5 samples per client; mnist1d 100 clients at join ratio
0.1, digits 40 clients at join ratio 0.25, as its 1797 samples admit no Dirichlet-0.1 draw
over 100 clients: a cohort of N = 10 either way), each
algorithm and each system model it runs every condition for the same number of
*dispatched jobs' worth of aggregation slots*: ``--rounds`` synchronous rounds, and N / B
times as many asynchronous server steps of B updates (FedAsync: B = 1; FedBuff: its
default, a tenth of the 10 clients in flight, 1, or each B of ``--buffers``), and reports

* ``time_to_target``: virtual seconds until the accuracy first reaches the target (90% of
  the best final accuracy among the conditions of the same dataset, algorithm and system
  model), ``None`` when never;
* final accuracy, bottom decile (``client_p10``), ``wasted_work`` (share of trained
  samples whose update was not aggregated) and the final virtual time;
* ``slow_q`` / ``fast_q``: mean accuracy of the slowest and the fastest quartile of clients
  by compute speed (under homogeneous devices the quartiles are by client index).

The deadline is the median job duration of the clients on that system model; first_m
aggregates the first M = 7 of the N = 10 sampled. ``--dropout P`` gives every client that
dropout probability (``core.clock``'s dropout model).

A speed check follows (or runs alone, ``--speed-only``): the round time with the system
model (wait_all, homogeneous) against the same algorithm without it, in one process,
alternating, median of several calls; the ratio's target is <= 1.10.

    python experiments/clock.py                # the defaults of experiments/clock.md
    python experiments/clock.py --quick        # digits, FedAvg, fewer rounds
    python experiments/clock.py --buffers 1,2,5,9 --conditions wait_all,fedbuff ...
    python experiments/clock.py --speed-only --repeats 41
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedjax_sim.algorithms.base import clocked  # noqa: E402
from fedjax_sim.core import system as system_lib  # noqa: E402
from fedjax_sim.core.clock import Clock, default_buffer, job_samples  # noqa: E402
from fedjax_sim.core.cohort import cohort_size  # noqa: E402
from fedjax_sim.spec import (  # noqa: E402
    ExperimentSpec,
    build,
    build_clock,
    build_data,
    check_spec,
    run_built,
)

CONDITIONS = ("wait_all", "deadline", "first_m", "fedasync", "fedbuff")
# Clients and join ratio per dataset (a cohort of 10).
CLIENTS = {"digits": (40, 0.25), "mnist1d": (100, 0.1)}
FIRST_M = 7


def base_spec(args, dataset: str, algorithm: str, **clock) -> ExperimentSpec:
    clients, join = CLIENTS.get(dataset, (100, 0.1))
    return check_spec(ExperimentSpec(
        algorithm=algorithm, dataset=dataset, partition="dirichlet", alpha=0.1,
        num_clients=clients, min_samples=5, seed=args.seed, progress=False, **clock,
        hparams={"local_epochs": 2, "join_ratio": join, "lr": 0.1, "batch_size": 32}))


def median_duration(spec: ExperimentSpec, built) -> float:
    """The median job duration of the clients (the deadline of the comparison)."""
    clock = build_clock(spec, built.data.num_clients)
    hp = built.algorithm.hparams
    up, down = built.algorithm.comm_bytes(built.data)
    size = cohort_size(built.data.num_clients, hp["join_ratio"])
    samples = np.asarray(job_samples(np.asarray(built.data.train_counts),
                                     (hp["local_epochs"], hp["local_steps"],
                                      hp["batch_size"])))
    durations = np.asarray(system_lib.job_durations(
        jax.tree.map(np.asarray, clock.system), samples, down / size, up / size))
    return float(np.median(durations))


def one_run(args, data, dataset, algorithm, system, condition, deadline,
            buffer=None) -> dict:
    """One run of ``condition``; FedBuff with ``buffer`` updates per step (``None``: its
    default)."""
    extra = {"system": system, "condition": condition}
    if args.dropout is not None:
        extra["dropout"] = args.dropout
    clients, join = CLIENTS.get(dataset, (100, 0.1))
    cohort = cohort_size(clients, join)
    rounds, per_step = args.rounds, None
    if condition == "deadline":
        extra["deadline"] = deadline
    elif condition == "first_m":
        extra["first_m"] = FIRST_M
    elif condition == "fedbuff":
        per_step = default_buffer(cohort) if buffer is None else buffer
        if buffer is not None:
            extra["buffer_size"] = buffer
    elif condition == "fedasync":
        per_step = 1
    if per_step is not None:  # the same number of updates as the synchronous rounds
        rounds = rounds * cohort // per_step
    every = max(1, rounds // args.evals)
    spec = base_spec(args, dataset, algorithm, **extra).replace(
        rounds=rounds, eval_every=every, rounds_per_call=every)
    built = build(spec, data=data)
    tic = time.perf_counter()
    result = run_built(built, output=None)
    speeds = np.asarray(built.algorithm.clock.system.speed)
    acc = np.asarray(result.history[-1]["client_accuracies"])
    order = np.argsort(speeds, kind="stable")
    quarter = len(order) // 4
    return {
        "dataset": dataset, "algorithm": algorithm, "system": system,
        "condition": condition, "buffer": per_step, "dropout": args.dropout,
        "steps": rounds,
        "history": [(h["virtual_time"], h["accuracy"]) for h in result.history],
        "accuracy": result.history[-1]["accuracy"],
        "client_p10": result.history[-1]["client_p10"],
        "wasted_work": result.history[-1]["wasted_work"],
        "virtual_time": result.history[-1]["virtual_time"],
        "slow_q": float(acc[order[:quarter]].mean()),
        "fast_q": float(acc[order[-quarter:]].mean()),
        "participation_gini": result.summary["participation_gini"],
        "wall_s": time.perf_counter() - tic,
    }


def time_to(history, target):
    for t, acc in history:
        if acc >= target:
            return t
    return None


def speed_check(args) -> dict:
    """Round time with the system model (wait_all, homogeneous) over without, alternating."""
    spec = base_spec(args, "digits", "fedavg")
    data, _ = build_data(spec)
    built = build(spec, data=data)
    plain = built.algorithm
    timed = clocked(plain, Clock(system_lib.homogeneous(data.num_clients)), data.num_clients)
    from fedjax_sim.runner import to_device

    data = to_device(data)
    length = 10

    def block(alg):
        def rounds(state, data):
            return jax.lax.scan(lambda s, _: (alg.round(s, data)[0], None), state, None,
                                length=length)[0]
        return jax.jit(rounds)

    calls = {}
    for name, alg in (("plain", plain), ("clock", timed)):
        fn = block(alg)
        state = jax.block_until_ready(fn(alg.init(jax.random.key(0), data), data))
        calls[name] = (fn, state)
    times = {"plain": [], "clock": []}
    for _ in range(args.repeats):
        for name in ("plain", "clock"):
            fn, state = calls[name]
            tic = time.perf_counter()
            state = jax.block_until_ready(fn(state, data))
            times[name].append((time.perf_counter() - tic) / length)
            calls[name] = (fn, state)
    plain_s, clock_s = statistics.median(times["plain"]), statistics.median(times["clock"])
    return {"plain_round_s": plain_s, "clock_round_s": clock_s, "ratio": clock_s / plain_s,
            "repeats": args.repeats, "rounds_per_call": length}


def plot_time(rows: list[dict], path: Path) -> Path:
    """Accuracy against virtual time, one panel per (dataset, algorithm, devices), one line
    per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["dataset"], r["algorithm"], r["system"]) for r in rows))
    columns = min(4, len(panels))
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3 * lines),
                             squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for r in rows:
            if (r["dataset"], r["algorithm"], r["system"]) == panel:
                t, acc = zip(*r["history"], strict=True)
                ax.plot(t, acc, marker="o", label=label(r))
        ax.set_title(" / ".join(panel), fontsize=9)
        ax.set_xlabel("virtual time (s)")
        ax.set_ylim(0, 1)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def label(row: dict) -> str:
    """A row's condition, FedBuff with its buffer size."""
    if row["condition"] == "fedbuff":
        return f"fedbuff B={row.get('buffer')}"
    return row["condition"]


def run_group(args, data, dataset, algorithm, system) -> list[dict]:
    """Every condition (FedBuff once per buffer size) on one dataset, algorithm and system
    model; time to target against 90% of the group's best final accuracy."""
    spec = base_spec(args, dataset, algorithm, system=system)
    deadline = median_duration(spec, build(spec, data=data))
    buffers = [None] if args.buffers is None else [int(b) for b in args.buffers.split(",")]
    group = []
    for c in args.conditions.split(","):
        for buffer in buffers if c == "fedbuff" else [None]:
            group.append(one_run(args, data, dataset, algorithm, system, c, deadline,
                                 buffer))
    target = 0.9 * max(r["accuracy"] for r in group)
    for r in group:
        r["target"] = target
        r["time_to_target"] = time_to(r["history"], target)
        r["deadline"] = deadline
    return group


def print_table(rows: list[dict], speed: dict | None) -> None:
    if rows:
        _print_rows(rows)
    if speed is not None:
        print(f"\nspeed check (digits, fedavg, 40 clients, join 0.25, wait_all homogeneous): "
              f"{speed['clock_round_s'] * 1e3:.2f} ms / round with the system model, "
              f"{speed['plain_round_s'] * 1e3:.2f} ms without: ratio {speed['ratio']:.3f}")


def _print_rows(rows: list[dict]) -> None:
    print("| dataset | algorithm | system | condition | time to target (s) | accuracy "
          "| bottom decile | wasted | virtual time (s) | slow q | fast q | gini |")
    print("|" + "---|" * 12)
    for r in rows:
        ttt = "never" if r["time_to_target"] is None else f"{r['time_to_target']:.0f}"
        print(f"| {r['dataset']} | {r['algorithm']} | {r['system']} | {label(r)} | "
              f"{ttt} | {r['accuracy']:.3f} | {r['client_p10']:.3f} | "
              f"{r['wasted_work']:.2f} | {r['virtual_time']:.0f} | {r['slow_q']:.3f} | "
              f"{r['fast_q']:.3f} | {r['participation_gini']:.2f} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,mnist1d")
    parser.add_argument("--algorithms", default="fedavg,fedper")
    parser.add_argument("--systems", default="homogeneous,lognormal")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--buffers", default=None,
                        help="FedBuff buffer sizes B, one run each (default: FedBuff's "
                        "default, a tenth of the clients in flight)")
    parser.add_argument("--dropout", type=float, default=None,
                        help="every client's dropout probability (default: none)")
    parser.add_argument("--rounds", type=int, default=20,
                        help="synchronous rounds (asynchronous: x N / B server steps)")
    parser.add_argument("--evals", type=int, default=4, help="evaluations per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=7, help="speed check calls per side")
    parser.add_argument("--no-speed-check", action="store_true",
                        help="skip the speed check")
    parser.add_argument("--speed-only", action="store_true",
                        help="run the speed check alone")
    parser.add_argument("--quick", action="store_true",
                        help="digits, fedavg, 10 rounds")
    parser.add_argument("--output", default=str(ROOT / "experiments/results/clock.json"))
    parser.add_argument("--plot", default=str(ROOT / "experiments/figures/clock_time.png"),
                        help="accuracy against virtual time")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw --plot from the JSON in --output")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.replot:
        print(plot_time(json.loads(Path(args.output).read_text())["rows"], Path(args.plot)))
        return
    if args.speed_only:
        print_table([], speed_check(args))
        return
    if args.quick:
        args.datasets, args.algorithms, args.rounds = "digits", "fedavg", 10
    rows = []
    start = time.perf_counter()
    for dataset in args.datasets.split(","):
        data, _ = build_data(base_spec(args, dataset, "fedavg"))
        for algorithm in args.algorithms.split(","):
            for system in args.systems.split(","):
                rows.extend(run_group(args, data, dataset, algorithm, system))
                print(f"{dataset} {algorithm} {system}: done "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    speed = None if args.no_speed_check else speed_check(args)
    print_table(rows, speed)
    print(f"total {time.perf_counter() - start:.0f} s")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "rows": rows, "speed": speed},
                              indent=1))
    print(plot_time(rows, Path(args.plot)))


if __name__ == "__main__":
    main()
