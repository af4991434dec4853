"""Figures and the paired differences with FedAvg of the incentive grid
(experiments/incentives.md) from its sweep folders.

  fedjax-sim sweep --config experiments/incentives.toml --output runs/incentives
  fedjax-sim sweep --config experiments/incentives.toml --set algorithm=incfl \\
      --set incfl.incfl_local_epochs=10 --output runs/incentives_rho10
  python experiments/incentives_plots.py runs/incentives --epochs10 runs/incentives_rho10 \\
      --out experiments/figures

Writes ``incentives_ipr.png`` (strict IPR, ties, client mean and bottom-decile accuracy
against α, per data set and algorithm; IncFL at temperature 1, with each setting of its
thresholds) and ``incentives_ipr_rounds.png`` (strict IPR at every evaluation, mean over
seeds, on each data set at α = 0.5), and prints, per data set and α, IncFL − FedAvg paired
by seed (both runs of a seed share its partition): the mean difference ± the standard
deviation of the per-seed differences, and the seeds where IncFL is above, tied, below.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

# IncFL's thresholds: from the Local reference (the default) or from 10 epochs in one pass.
MATCHED, EPOCHS10 = "incfl", "incfl (ρ: 10 epochs)"
ORDER = ("local", "fedavg", MATCHED, EPOCHS10, "fedper", "fedobp")
COLORS = dict(zip(ORDER, ("0.35", "C0", "C1", "C4", "C2", "C3"), strict=True))
PANELS = (("ipr_strict", "strict IPR (above Local)"), ("tie_fraction", "ties with Local"),
          ("client_mean_accuracy", "client mean accuracy"),
          ("client_p10", "bottom-decile accuracy"))
# The differences the table reports, IncFL − FedAvg.
FIELDS = (("ipr_strict", "strict IPR"), ("tie_fraction", "ties"), ("ipr", "IPR with ties"),
          ("accuracy", "accuracy"), ("client_mean_accuracy", "client mean"))


def _records(folder: Path, incfl_label: str) -> list[dict]:
    """The complete records of a sweep folder, each with its ``folder`` and ``series``
    (the algorithm; IncFL named by its thresholds)."""
    lines = (folder / "results.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["status"] == "complete"]
    for r in records:
        r["folder"] = folder
        r["series"] = incfl_label if r["algorithm"] == "incfl" else r["algorithm"]
    return records


def _setting(record: dict) -> tuple[str, float]:
    return record["values"]["dataset"], float(record["values"]["alpha"])


def _chosen(records: list[dict]) -> dict[tuple, list[dict]]:
    """Per (series, dataset, alpha), its records at IncFL's default temperature 1."""
    chosen: dict[tuple, list[dict]] = {}
    for r in records:
        if float(r["values"].get("incfl_temperature", 1.0)) != 1.0:
            continue
        chosen.setdefault((r["series"], *_setting(r)), []).append(r)
    return chosen


def plot_grid(records: list[dict], out: Path) -> Path:
    chosen = _chosen(records)
    datasets = sorted({k[1] for k in chosen})
    alphas = sorted({k[2] for k in chosen})
    fig, axes = plt.subplots(len(datasets), len(PANELS), figsize=(17, 3.4 * len(datasets)),
                             squeeze=False)
    for row, dataset in enumerate(datasets):
        for col, (field, title) in enumerate(PANELS):
            ax = axes[row][col]
            for series in ORDER:
                if field in ("ipr_strict", "tie_fraction") and series == "local":
                    continue
                runs = [chosen.get((series, dataset, alpha), []) for alpha in alphas]
                values = [[r[field] for r in rs if r.get(field) is not None] for rs in runs]
                means = [np.mean(v) if v else np.nan for v in values]
                stds = [np.std(v) if v else np.nan for v in values]
                if np.all(np.isnan(means)):
                    continue
                ax.errorbar(alphas, means, yerr=stds, marker="o", capsize=3, label=series,
                            color=COLORS[series])
            ax.set_xscale("log")
            ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
            ax.set_xlabel("Dirichlet α")
            ax.set_title(f"{dataset}: {title}")
            ax.set_ylim(0, 1.02)
        axes[row][2].legend(fontsize=8)
    fig.tight_layout()
    path = out / "incentives_ipr.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rounds(records: list[dict], out: Path, alpha: float = 0.5) -> Path:
    chosen = _chosen(records)
    datasets = sorted({k[1] for k in chosen})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 3.4),
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for series in ORDER[1:]:
            runs = []
            for r in chosen.get((series, dataset, alpha), []):
                lines = (r["folder"] / r["path"] / "metrics.jsonl").read_text().splitlines()
                runs.append([json.loads(line) for line in lines])
            if not runs:
                continue
            rounds = [h["round"] for h in runs[0]]
            strict = np.asarray([[h["ipr_strict"] for h in run] for run in runs])
            ax.plot(rounds, strict.mean(axis=0), marker="o", label=series,
                    color=COLORS[series])
        ax.set_title(f"{dataset}, α = {alpha:g}: strict IPR at each evaluation")
        ax.set_xlabel("round")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "incentives_ipr_rounds.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def paired_table(records: list[dict]) -> str:
    """Each method − FedAvg per seed, in percentage points, per data setting."""
    chosen = _chosen(records)
    settings = sorted({k[1:] for k in chosen if k[0] == "fedavg"})
    lines = ["| data set | α | method | seeds | "
             + " | ".join(f"Δ {label}" for _, label in FIELDS)
             + " | strict IPR above / tied / below FedAvg |",
             "|" + "---|" * (5 + len(FIELDS))]
    for dataset, alpha in settings:
        fedavg = {r["seed"]: r for r in chosen[("fedavg", dataset, alpha)]}
        for series in ORDER[2:]:
            other = {r["seed"]: r for r in chosen.get((series, dataset, alpha), [])}
            seeds = sorted(set(fedavg) & set(other))
            if not seeds:
                continue
            cells = []
            for field, _ in FIELDS:
                diff = 100 * np.array([other[s][field] - fedavg[s][field] for s in seeds])
                mean = round(float(diff.mean()), 1) + 0.0  # no "-0.0"
                cells.append(f"{mean:+.1f} ± {diff.std():.1f}")
            strict = np.array([other[s]["ipr_strict"] - fedavg[s]["ipr_strict"]
                               for s in seeds])
            counts = (f"{int(np.sum(strict > 0))} / {int(np.sum(strict == 0))} / "
                      f"{int(np.sum(strict < 0))}")
            lines.append(f"| {dataset} | {alpha:g} | {series} | {len(seeds)} | "
                         + " | ".join(cells) + f" | {counts} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the main sweep's --output folder")
    parser.add_argument("--epochs10", type=Path, default=None,
                        help="the sweep folder of IncFL with --set incfl.incfl_local_epochs=10")
    parser.add_argument("--out", type=Path, default=Path("experiments/figures"))
    args = parser.parse_args(argv)
    folders = [(args.folder, MATCHED)]
    if args.epochs10 is not None:
        folders.append((args.epochs10, EPOCHS10))
    for folder, _ in folders:
        if not (folder / "results.jsonl").is_file():
            parser.error(f"{folder}: no results.jsonl (run the sweep first)")
    args.out.mkdir(parents=True, exist_ok=True)
    records = [r for folder, label in folders for r in _records(folder, label)]
    print(plot_grid(records, args.out))
    print(plot_rounds(records, args.out))
    print(paired_table(records))


if __name__ == "__main__":
    main()
