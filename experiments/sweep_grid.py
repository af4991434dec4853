"""A grid as one `fedjax-sim sweep` against the same configurations as separate runs.

The grid: fedavg, fedper and fedobp × Dirichlet α ∈ {0.1, 0.5} × lr ∈ {0.01, 0.05}
(× ig_ratio ∈ {0.99, 0.999, 0.9999} for fedobp) × seeds 0, 1, 2 on digits, 30 rounds:
60 runs. The sweep runs it as one process (one compiled program per algorithm: every
seed, split and traced hyperparameter of it together). The other side is what a shell
loop over `fedjax-sim run` costs: a sample of the configurations (``--sample`` per
algorithm) runs as separate processes, each timed, and the mean per algorithm is scaled
to the algorithm's number of runs. Both sides are whole commands (process start, data,
compilation, training, writing), run one after the other on the same machine, with the
persistent compilation cache off so that neither side reuses the other's programs. Each
sampled run's final accuracy is compared with its configuration in the sweep.

    python experiments/sweep_grid.py --output runs/sweep_grid

prints a markdown table and writes it, with the sweep's and the runs' folders, to
``--output``. With ``--compare`` it times the README's main job instead: ``fedjax-sim
compare`` (nine algorithms × three seeds, each algorithm's seeds one program) against one
``fedjax-sim run`` per algorithm (seed 0) scaled to the three seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GRID = """\
dataset = "digits"
rounds = {rounds}
eval_every = {rounds}
algorithm = ["fedavg", "fedper", "fedobp"]
alpha = [0.1, 0.5]
lr = [0.01, 0.05]
seed = [0, 1, 2]
no_progress = true

[fedobp]
ig_ratio = [0.99, 0.999, 0.9999]
"""


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedjax_sim.cli", *args]


def _timed(argv: list[str]) -> float:
    tic = time.perf_counter()
    done = subprocess.run([*argv, "--no-compile-cache"], capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return wall


def _sample(records: list[dict], per_algorithm: int) -> list[dict]:
    """``per_algorithm`` records of each algorithm, spread over its configurations."""
    chosen = []
    for name in dict.fromkeys(r["algorithm"] for r in records):
        own = [r for r in records if r["algorithm"] == name]
        step = max(1, len(own) // per_algorithm)
        chosen += own[::step][:per_algorithm]
    return chosen


def compare(out: Path) -> str:
    """``fedjax-sim compare`` against its runs one by one; the table."""
    from fedjax_sim.cli import DEFAULT_COMPARE, DEFAULT_COMPARE_SEEDS

    compare_s = _timed(_command("compare", "--no-progress", "--output", str(out / "compare")))
    rows = json.loads((out / "compare" / "compare.json").read_text())
    times = {name: _timed(_command("run", "--algorithm", name, "--seed", "0", "--no-progress",
                                   "--output", str(out / "runs" / name)))
             for name in DEFAULT_COMPARE}
    for name in DEFAULT_COMPARE:
        alone = json.loads((out / "runs" / name / "summary.json").read_text())["accuracy"]
        if rows[name][0]["accuracy"] != alone:
            print(f"{name} seed 0: compare {rows[name][0]['accuracy']}, run {alone}",
                  file=sys.stderr)
    seeds = len(DEFAULT_COMPARE_SEEDS)
    separate_s = seeds * sum(times.values())
    return "\n".join([
        f"`fedjax-sim compare` (defaults: {len(DEFAULT_COMPARE)} algorithms × {seeds} seeds), "
        "compile cache off",
        "",
        "| | wall s |",
        "|---|---|",
        f"| `fedjax-sim compare` | {compare_s:.1f} |",
        f"| its {len(DEFAULT_COMPARE) * seeds} runs one by one (one `fedjax-sim run` per "
        f"algorithm timed, × {seeds}: mean {sum(times.values()) / len(times):.1f} s) | "
        f"{separate_s:.1f} |",
        f"| ratio | {compare_s / separate_s:.2f} |",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/sweep_grid")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sample", type=int, default=2,
                        help="separate runs timed per algorithm (default 2)")
    parser.add_argument("--compare", action="store_true",
                        help="time `fedjax-sim compare` against its runs one by one instead")
    args = parser.parse_args(argv)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--output {out} is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    if args.compare:
        table = compare(out)
        (out / "compare_speed.md").write_text(table + "\n")
        print(table)
        return
    grid = out / "grid.toml"
    grid.write_text(GRID.format(rounds=args.rounds))

    sweep_s = _timed(_command("sweep", "--config", str(grid), "--output", str(out / "sweep")))
    records = [json.loads(line) for line in
               (out / "sweep" / "results.jsonl").read_text().splitlines()]
    if any(r["status"] != "complete" for r in records):
        raise SystemExit("a configuration of the sweep did not complete; no figures")
    counts: dict[str, int] = {}
    for record in records:
        counts[record["algorithm"]] = counts.get(record["algorithm"], 0) + 1

    times: dict[str, list[float]] = {}
    checks = []
    for i, record in enumerate(_sample(records, args.sample)):
        values = record["values"]
        flags = ["--algorithm", record["algorithm"], "--dataset", "digits",
                 "--rounds", str(args.rounds), "--eval-every", str(args.rounds),
                 "--alpha", str(values["alpha"]), "--lr", str(record["lr"]),
                 "--seed", str(record["seed"]), "--no-progress",
                 "--output", str(out / "runs" / f"{i}")]
        if "ig_ratio" in values:
            flags += ["--ig-ratio", str(values["ig_ratio"])]
        times.setdefault(record["algorithm"], []).append(_timed(_command("run", *flags)))
        alone = json.loads((out / "runs" / f"{i}" / "summary.json").read_text())
        checks.append((record["config"], record["seed"], record["accuracy"],
                       alone["accuracy"]))

    separate_s = sum(counts[name] * sum(t) / len(t) for name, t in times.items())
    lines = [
        f"digits, {len(records)} runs ({', '.join(f'{n} {c}' for n, c in counts.items())}), "
        f"{args.rounds} rounds, compile cache off",
        "",
        "| | wall s |",
        "|---|---|",
        f"| one `fedjax-sim sweep` | {sweep_s:.1f} |",
        f"| {len(records)} `fedjax-sim run` (scaled from {sum(map(len, times.values()))} "
        f"timed: " + ", ".join(f"{n} {sum(t) / len(t):.1f} s each" for n, t in times.items())
        + f") | {separate_s:.1f} |",
        f"| speed-up | {separate_s / sweep_s:.1f}x |",
        "",
        "| configuration | seed | sweep accuracy | separate run | equal |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {c} | {s} | {a:.4f} | {b:.4f} | {'yes' if a == b else f'no ({b - a:+.4f})'} |"
              for c, s, a, b in checks]
    table = "\n".join(lines)
    (out / "sweep_grid.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
