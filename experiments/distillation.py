"""Federated distillation on offline data: the tables of experiments/distillation.md.

Sections (each writes ``<output>/<section>.md`` with its table and ``<section>.json`` with
every run's summary and curve):

- ``dsfl``: DS-FL with ERA and with SA against FedAvg and Local under Dirichlet α; accuracy
  of the clients' own models and of DS-FL's server model, bytes up and down, and the bytes
  as a fraction of FedAvg's. Also ``accuracy_vs_bytes.png``: accuracy against cumulative
  bytes (up + down), FedAvg on the same axes.
- ``hetero``: FedMD and FCCL with heterogeneous architectures (client k runs architecture
  k mod A) against Local on the same architectures, and FedMD without collaboration
  (transfer learning and private training only).
- ``feddf``: FedDF against FedAvg.

Every algorithm of a table sees the same private data: the public set (``--public-fraction``
of the pool) and the server validation split (``--val-fraction``) are held out before the
pool is partitioned, for every method, also those that do not read them.

Usage:
  python experiments/distillation.py dsfl --alphas 0.1,0.5 --seeds 0,1,2
  python experiments/distillation.py hetero --architectures mlp:32,mlp:128,mlp:256x128
  python experiments/distillation.py feddf
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import num_params_bytes, shared_logits
from fedjax_sim.algorithms.fedmd import group_members
from fedjax_sim.core.evaluate import count_correct
from fedjax_sim.data.public import make_federated_data_with_public
from fedjax_sim.models import make_model
from fedjax_sim.models.layers import DEFAULT_INIT, INITS
from fedjax_sim.runner import Events, run, to_device

# Shared by every method: the README's digits comparison settings.
COMMON = {"local_epochs": 5, "batch_size": 32, "lr": 0.01}
# DS-FL: (distill_epochs, distill_lr) chosen on seed 0 among (1, 0.01), (5, 0.01), (2, 0.1)
# and (5, 0.1); FedMD's digest lr among 0.01 (the client lr) and 0.1. The ERA temperature
# is the paper's 0.1.
DSFL = {"public_batch": 256, "distill_epochs": 5, "distill_lr": 0.1, "dsfl_temperature": 0.1}
FEDMD = {"public_batch": 256, "distill_epochs": 1, "distill_lr": 0.1}
FCCL = {"public_batch": 256}


def load(args, alpha: float, seed: int):
    data, public, _, _ = make_federated_data_with_public(
        args.dataset, public_fraction=args.public_fraction, val_fraction=args.val_fraction,
        num_clients=args.num_clients, alpha=alpha, seed=seed,
    )
    return data, public


def accuracy_of(correct, data) -> float:
    return float(np.sum(correct) / np.sum(np.asarray(data.test_counts)))


def model_for(spec: str, data, init: str):
    name, _, widths = spec.partition(":")
    options = {"hidden": tuple(int(w) for w in widths.split("x"))} if widths else {}
    return make_model(name, data.input_shape, data.num_classes, init=init, **options)


def run_one(name, model, data, public, args, seed, *, events=None, **hp):
    extra = {"public": public} if algorithms.uses_public(name) else {}
    algorithm = algorithms.make(name, model, **extra, **COMMON, **hp)
    return run(algorithm, data, rounds=args.rounds, eval_every=args.eval_every, seed=seed,
               events=events, progress=False)


def local_correct(models, data, args, seed) -> np.ndarray:
    """Per-client correct counts of Local, client k on architecture k mod A."""
    models = models if isinstance(models, tuple) else (models,)
    correct = np.zeros(data.num_clients)
    counts = np.asarray(data.test_counts)
    for m, idx in zip(models, group_members(data.num_clients, len(models)), strict=True):
        result = run_one("local", m, data, None, args, seed)
        correct[idx] = (np.asarray(result.summary["client_accuracies"]) * counts)[idx]
    return correct


def row_stats(runs: list[dict]) -> dict:
    def ms(key):
        values = np.asarray([r[key] for r in runs], np.float64)
        return f"{100 * values.mean():.2f} ± {100 * values.std():.2f}"

    return {"accuracy": ms("accuracy"), "p10": ms("client_p10"), "ipr": ms("ipr"),
            "mb_up": np.mean([r["bytes_up"] for r in runs]) / 1e6,
            "mb_down": np.mean([r["bytes_down"] for r in runs]) / 1e6,
            "wall_s": np.mean([r["wall_s"] for r in runs])}


def ipr(correct: np.ndarray, local: np.ndarray, data) -> float:
    counts = np.maximum(np.asarray(data.test_counts), 1)
    return float(np.mean(correct / counts >= local / counts))


def summary_of(result, data, local, label) -> dict:
    counts = np.asarray(data.test_counts)
    correct = np.asarray(result.summary["client_accuracies"]) * counts
    return {
        "method": label,
        "accuracy": result.summary["accuracy"],
        "client_p10": result.summary["client_p10"],
        "ipr": ipr(correct, local, data),
        "bytes_up": result.summary["bytes_up"],
        "bytes_down": result.summary["bytes_down"],
        "wall_s": result.summary["wall_s"],
        "curve": [(h["round"], h["accuracy"], h["bytes_up"] + h["bytes_down"])
                  for h in result.history],
    }


def server_model_recorder(model, data) -> tuple[Events, list]:
    """Events that record, at every evaluation, the accuracy of DS-FL's server model on every
    client's test set: ``(round, accuracy, cumulative bytes, correct per client)``."""
    device_data = to_device(data)
    correct_fn = jax.jit(lambda params: count_correct(
        shared_logits(model), None, params, device_data)[0])
    curve: list = []

    def on_evaluate(round, state, record, **_):
        correct = np.asarray(correct_fn(state.server["params"]))
        curve.append((round, accuracy_of(correct, data),
                      record["bytes_up"] + record["bytes_down"], correct))

    return Events().on("evaluate", on_evaluate), curve


def step_recorder() -> tuple[Events, list]:
    """Events that record FedDF's server distillation steps of every round."""
    steps: list = []
    return Events().on("round_end",
                       lambda metrics, **_: steps.append(int(metrics["distill_steps"]))), steps


def section_dsfl(args) -> None:
    rows: dict[tuple[float, str], list[dict]] = {}
    for alpha in args.alphas:
        for seed in args.seeds:
            data, public = load(args, alpha, seed)
            model = make_model("mlp", data.input_shape, data.num_classes, init=args.init)
            local = local_correct(model, data, args, seed)
            local_summary = {"method": "Local", "accuracy": float(local.sum() / data.test_counts
                                                                 .sum()),
                             "client_p10": float(np.percentile(
                                 local / np.maximum(data.test_counts, 1), 10)),
                             "ipr": 1.0, "bytes_up": 0, "bytes_down": 0, "wall_s": 0.0,
                             "curve": []}
            rows.setdefault((alpha, "Local"), []).append(local_summary)
            fedavg = run_one("fedavg", model, data, public, args, seed)
            rows.setdefault((alpha, "FedAvg"), []).append(
                summary_of(fedavg, data, local, "FedAvg"))
            for aggregation in ("era", "sa"):
                events, server_curve = server_model_recorder(model, data)
                result = run_one("dsfl", model, data, public, args, seed, events=events,
                                 dsfl_aggregation=aggregation, **DSFL)
                label = f"DS-FL {aggregation.upper()}"
                rows.setdefault((alpha, f"{label} (client models)"), []).append(
                    summary_of(result, data, local, f"{label} (client models)"))
                final = server_curve[-1][3]
                per_client = final / np.maximum(data.test_counts, 1)
                rows.setdefault((alpha, f"{label} (server model)"), []).append({
                    "method": f"{label} (server model)",
                    "accuracy": accuracy_of(final, data),
                    "client_p10": float(np.percentile(per_client, 10)),
                    "ipr": ipr(final, local, data),
                    "bytes_up": result.summary["bytes_up"],
                    "bytes_down": result.summary["bytes_down"],
                    "wall_s": result.summary["wall_s"],
                    "curve": [c[:3] for c in server_curve],
                })
            print(f"dsfl alpha={alpha} seed={seed} done", flush=True)

    lines = ["| α | method | accuracy % | bottom decile % | IPR % | MB up | MB down "
             "| bytes vs FedAvg | wall s |", "|" + "---|" * 9]
    for alpha in args.alphas:
        fedavg_bytes = np.mean([r["bytes_up"] + r["bytes_down"] for r in rows[(alpha, "FedAvg")]])
        for (a, label), runs in rows.items():
            if a != alpha:
                continue
            s = row_stats(runs)
            total = s["mb_up"] + s["mb_down"]
            fraction = "—" if label == "Local" else f"{100 * total * 1e6 / fedavg_bytes:.2f}%"
            wall = "—" if label == "Local" else f"{s['wall_s']:.1f}"
            ipr_col = "—" if label == "Local" else s["ipr"]  # the reference itself
            lines.append(f"| {alpha} | {label} | {s['accuracy']} | {s['p10']} | {ipr_col} "
                         f"| {s['mb_up']:.2f} | {s['mb_down']:.2f} | {fraction} | {wall} |")
    write(args, "dsfl", lines, rows)
    plot_bytes(args, rows)


def plot_bytes(args, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.alphas), figsize=(5.5 * len(args.alphas), 4),
                             squeeze=False)
    for ax, alpha in zip(axes[0], args.alphas, strict=True):
        for (a, label), runs in rows.items():
            if a != alpha or label == "Local":
                continue
            curves = np.asarray([r["curve"] for r in runs], np.float64)  # seeds x evals x 3
            mb = curves[0, :, 2] / 1e6
            acc = curves[:, :, 1].mean(0) * 100
            ax.plot(mb, acc, marker="o", markersize=3, label=label,
                    linestyle="--" if "server" in label else "-")
        local = np.mean([r["accuracy"] for r in rows[(alpha, "Local")]]) * 100
        ax.axhline(local, color="gray", linewidth=0.8, linestyle=":", label="Local")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative MB exchanged (up + down, float32)")
        ax.set_ylabel("personalized test accuracy %")
        ax.set_title(f"{args.dataset}, Dirichlet α = {alpha}, K = {args.num_clients}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(args.output) / "accuracy_vs_bytes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def section_hetero(args) -> None:
    specs = args.architectures.split(",")
    rows: dict[tuple[float, str], list[dict]] = {}
    methods = [
        ("FedMD, no collaboration (transfer + private)", "fedmd", {**FEDMD, "distill_epochs": 0}),
        ("FedMD", "fedmd", FEDMD),
        ("FCCL (public Adam lr 1e-3)", "fccl", FCCL),
        ("FCCL (public Adam lr 1e-4)", "fccl", {**FCCL, "fccl_public_lr": 1e-4}),
    ]
    for alpha in args.alphas:
        for seed in args.seeds:
            data, public = load(args, alpha, seed)
            models = tuple(model_for(s, data, args.init) for s in specs)
            members = group_members(data.num_clients, len(models))
            counts = np.asarray(data.test_counts)
            local = local_correct(models, data, args, seed)
            per_group = [float(local[idx].sum() / counts[idx].sum()) for idx in members]
            rows.setdefault((alpha, "Local"), []).append(
                {"accuracy": float(local.sum() / counts.sum()), "groups": per_group,
                 "ipr": 1.0, "bytes": 0, "wall_s": 0.0})
            for label, name, hp in methods:
                result = run_one(name, models, data, public, args, seed, **hp)
                correct = np.asarray(result.summary["client_accuracies"]) * counts
                rows.setdefault((alpha, label), []).append({
                    "accuracy": result.summary["accuracy"],
                    "groups": [float(correct[idx].sum() / counts[idx].sum()) for idx in members],
                    "ipr": ipr(correct, local, data),
                    "bytes": result.summary["bytes_up"] + result.summary["bytes_down"],
                    "wall_s": result.summary["wall_s"],
                })
            print(f"hetero alpha={alpha} seed={seed} done", flush=True)

    sizes = [num_params_bytes(model_for(s, data, args.init)) // 4 for s in specs]
    group_cols = " | ".join(f"{s} ({n:,} params) %" for s, n in zip(specs, sizes, strict=True))
    lines = [f"| α | method | accuracy % | {group_cols} | IPR % | MB up + down | wall s |",
             "|" + "---|" * (6 + len(specs))]
    for (alpha, label), runs in rows.items():
        acc = np.asarray([r["accuracy"] for r in runs]) * 100
        groups = np.asarray([r["groups"] for r in runs]) * 100
        ipr_ = np.asarray([r["ipr"] for r in runs]) * 100
        cols = " | ".join(f"{groups[:, g].mean():.2f} ± {groups[:, g].std():.2f}"
                          for g in range(len(specs)))
        wall = "—" if label == "Local" else f"{np.mean([r['wall_s'] for r in runs]):.1f}"
        ipr_col = "—" if label == "Local" else f"{ipr_.mean():.2f} ± {ipr_.std():.2f}"
        lines.append(f"| {alpha} | {label} | {acc.mean():.2f} ± {acc.std():.2f} | {cols} "
                     f"| {ipr_col} | {np.mean([r['bytes'] for r in runs]) / 1e6:.2f} "
                     f"| {wall} |")
    write(args, "hetero", lines, rows)


def section_feddf(args) -> None:
    rows: dict[tuple[float, str], list[dict]] = {}
    for alpha in args.alphas:
        for seed in args.seeds:
            data, public = load(args, alpha, seed)
            model = make_model("mlp", data.input_shape, data.num_classes, init=args.init)
            local = local_correct(model, data, args, seed)
            fedavg = run_one("fedavg", model, data, public, args, seed)
            rows.setdefault((alpha, "FedAvg"), []).append(
                {**summary_of(fedavg, data, local, "FedAvg"), "steps": 0.0})
            for label, hp in (("FedDF (Adam lr 1e-3, the paper's)", {}),
                              ("FedDF (Adam lr 1e-4)", {"feddf_lr": 1e-4})):
                events, steps = step_recorder()
                feddf = run_one("feddf", model, data, public, args, seed, events=events, **hp)
                rows.setdefault((alpha, label), []).append(
                    {**summary_of(feddf, data, local, label), "steps": float(np.mean(steps))})
            print(f"feddf alpha={alpha} seed={seed} done", flush=True)
    lines = ["| α | method | accuracy % | bottom decile % | IPR % | server distillation steps "
             "/ round | MB up | wall s |", "|" + "---|" * 8]
    for (alpha, label), runs in rows.items():
        s = row_stats(runs)
        steps = "—" if label == "FedAvg" else f"{np.mean([r['steps'] for r in runs]):.1f}"
        lines.append(f"| {alpha} | {label} | {s['accuracy']} | {s['p10']} | {s['ipr']} "
                     f"| {steps} | {s['mb_up']:.2f} | {s['wall_s']:.1f} |")
    write(args, "feddf", lines, rows)


def write(args, section: str, lines: list[str], rows) -> None:
    out = Path(args.output)
    setting = (f"{args.dataset}, Dirichlet α in {args.alphas}, K={args.num_clients}, "
               f"{args.rounds} rounds, seeds {args.seeds}, public {args.public_fraction} + "
               f"validation {args.val_fraction} of the pool held out")
    table = "\n".join(lines)
    (out / f"{section}.md").write_text(f"{setting}\n\n{table}\n")
    (out / f"{section}.json").write_text(json.dumps(
        {f"{alpha} {label}": runs for (alpha, label), runs in rows.items()}, indent=1,
        default=lambda v: v.tolist() if isinstance(v, np.ndarray) else str(v)))
    print(setting + "\n\n" + table, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=("dsfl", "hetero", "feddf"))
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--alphas", default="0.1,0.5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--public-fraction", type=float, default=0.2)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--architectures", default="mlp:32,mlp:128,mlp:256x128")
    parser.add_argument("--output", default="runs/distillation")
    parser.add_argument("--init", default=DEFAULT_INIT, choices=INITS,
                        help="parameter initialization (the tables of distillation.md: flax)")
    args = parser.parse_args()
    args.alphas = [float(a) for a in args.alphas.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    Path(args.output).mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    {"dsfl": section_dsfl, "hetero": section_hetero, "feddf": section_feddf}[args.section](args)
    print(f"{args.section}: {time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
