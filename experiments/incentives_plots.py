"""Plots of the incentive grid (experiments/incentives.md) from its sweep folder.

  fedjax-sim sweep --config experiments/incentives.toml --output runs/incentives
  python experiments/incentives_plots.py runs/incentives --out experiments/figures

Writes ``incentives_ipr.png`` (IPR, mean and bottom-decile accuracy against α, per data set
and algorithm; IncFL at its default temperature 1) and ``incentives_ipr_rounds.png``
(IPR at every evaluation, mean over seeds, on each data set at α = 0.5).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

ORDER = ("local", "fedavg", "incfl", "fedper", "fedobp")
COLORS = dict(zip(ORDER, ("0.35", "C0", "C1", "C2", "C3"), strict=True))
PANELS = (("ipr", "IPR against Local"), ("client_mean_accuracy", "client mean accuracy"),
          ("client_p10", "bottom-decile accuracy"))


def _records(folder: Path) -> list[dict]:
    lines = (folder / "results.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["status"] == "complete"]


def _best_configs(records: list[dict]) -> dict[tuple, str]:
    """Per (algorithm, dataset, alpha), its configuration (IncFL's at the default
    temperature 1)."""
    chosen: dict[tuple, str] = {}
    for r in records:
        v = r["values"]
        if float(v.get("incfl_temperature", 1.0)) != 1.0:
            continue
        chosen[(r["algorithm"], v["dataset"], float(v["alpha"]))] = r["config"]
    return chosen


def plot_grid(records: list[dict], out: Path) -> Path:
    best = _best_configs(records)
    datasets = sorted({k[1] for k in best})
    alphas = sorted({k[2] for k in best})
    fig, axes = plt.subplots(len(datasets), len(PANELS), figsize=(13, 3.4 * len(datasets)),
                             squeeze=False)
    for row, dataset in enumerate(datasets):
        for col, (field, title) in enumerate(PANELS):
            ax = axes[row][col]
            for algorithm in ORDER:
                means, stds = [], []
                for alpha in alphas:
                    config = best.get((algorithm, dataset, alpha))
                    values = [r[field] for r in records
                              if r["config"] == config and r.get(field) is not None]
                    means.append(np.mean(values) if values else np.nan)
                    stds.append(np.std(values) if values else np.nan)
                if np.all(np.isnan(means)):
                    continue
                ax.errorbar(alphas, means, yerr=stds, marker="o", capsize=3, label=algorithm,
                            color=COLORS[algorithm])
            ax.set_xscale("log")
            ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
            ax.set_xlabel("Dirichlet α")
            ax.set_title(f"{dataset}: {title}")
            ax.set_ylim(0, 1.02)
        axes[row][1].legend(fontsize=8)
    fig.tight_layout()
    path = out / "incentives_ipr.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rounds(folder: Path, records: list[dict], out: Path, alpha: float = 0.5) -> Path:
    best = _best_configs(records)
    datasets = sorted({k[1] for k in best})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 3.4),
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for algorithm in ORDER[1:]:
            config = best.get((algorithm, dataset, alpha))
            runs = []
            for r in records:
                if r["config"] != config:
                    continue
                lines = (folder / r["path"] / "metrics.jsonl").read_text().splitlines()
                runs.append([json.loads(line) for line in lines])
            if not runs:
                continue
            rounds = [h["round"] for h in runs[0]]
            ipr = np.asarray([[h["ipr"] for h in run] for run in runs])
            ax.plot(rounds, ipr.mean(axis=0), marker="o", label=algorithm,
                    color=COLORS[algorithm])
        ax.set_title(f"{dataset}, α = {alpha:g}: IPR at each evaluation")
        ax.set_xlabel("round")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "incentives_ipr_rounds.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the sweep's --output folder")
    parser.add_argument("--out", type=Path, default=Path("experiments/figures"))
    args = parser.parse_args(argv)
    if not (args.folder / "results.jsonl").is_file():
        parser.error(f"{args.folder}: no results.jsonl (run the sweep first)")
    args.out.mkdir(parents=True, exist_ok=True)
    records = _records(args.folder)
    print(plot_grid(records, args.out))
    print(plot_rounds(args.folder, records, args.out))


if __name__ == "__main__":
    main()
