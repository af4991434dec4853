"""The accuracy-against-ε table and plot of experiments/privacy.md, from the two sweeps'
results.jsonl (``experiments/privacy.toml`` and ``experiments/privacy_off.toml``).

    python experiments/privacy_table.py runs/privacy runs/privacy_off \\
        --plot experiments/results/privacy_epsilon.png
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np


def load(folder: Path) -> list[dict]:
    lines = (folder / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def summarize(records: list[dict]) -> dict:
    """``{(algorithm, target ε or inf): {"accuracy": [...], "p10": [...], "sigma", "eps"}}``
    over the complete runs; a run that did not complete is listed, never averaged."""
    rows: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        target = r["values"].get("dp_target_epsilon", math.inf)
        row = rows[(r["algorithm"], target)]
        if r["status"] != "complete":
            row["incomplete"].append(f"seed {r['seed']}: {r['status']}")
            continue
        row["accuracy"].append(100 * r["accuracy"])
        row["p10"].append(100 * r["client_p10"])
        if "dp_epsilon" in r:
            row["sigma"].append(r["dp_noise_multiplier"])
            row["eps"].append(r["dp_epsilon"])
    return rows


def table(rows: dict) -> str:
    algorithms = sorted({a for a, _ in rows}, key=["fedavg", "fedper", "fedobp"].index)
    targets = sorted({t for _, t in rows})
    lines = ["| algorithm | target ε | σ | ε spent | accuracy % | bottom decile % | runs |",
             "|---|---|---|---|---|---|---|"]
    for a in algorithms:
        for t in targets:
            row = rows.get((a, t))
            if row is None:
                continue
            acc, p10 = np.asarray(row["accuracy"]), np.asarray(row["p10"])
            sigma = f"{np.mean(row['sigma']):.3f}" if row["sigma"] else "0 (no DP)"
            eps = f"{max(row['eps']):.3f}" if row["eps"] else "∞"
            note = "; ".join(row["incomplete"])
            lines.append(
                f"| {a} | {'∞' if math.isinf(t) else f'{t:g}'} | {sigma} | {eps} | "
                f"{acc.mean():.2f} ± {acc.std():.2f} | {p10.mean():.2f} ± {p10.std():.2f} | "
                f"{len(acc)}{' (' + note + ')' if note else ''} |")
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    algorithms = sorted({a for a, _ in rows})
    finite = sorted({t for _, t in rows if not math.isinf(t)})
    far = 2 * max(finite)  # where ε = ∞ is drawn
    for a in algorithms:
        xs = [t for t in finite if (a, t) in rows] + ([far] if (a, math.inf) in rows else [])
        keys = [(a, t) for t in finite if (a, t) in rows] + [(a, math.inf)] * ((a, math.inf)
                                                                               in rows)
        means = [np.mean(rows[k]["accuracy"]) for k in keys]
        stds = [np.std(rows[k]["accuracy"]) for k in keys]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=a)
    ax.set_xscale("log", base=2)
    ax.set_xticks([*finite, far], [*(f"{t:g}" for t in finite), "∞"])
    ax.set_xlabel("ε (δ = 1/N)")
    ax.set_ylabel("test accuracy %")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="sweep output folders")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = summarize([r for folder in args.folders for r in load(folder)])
    text = table(rows)
    print(text)
    if args.plot is not None:
        plot(rows, args.plot)
    return text


if __name__ == "__main__":
    main()
