"""FedOBP experiments on the offline data sets (digits, mnist1d): comparison, ig_ratio sweep,
score variants against a random mask, and where the personalized elements sit.

Every run: K = 20 clients, Dirichlet(α) label skew (min 10 samples, test ratio 0.25, the
partition drawn from the seed), the FedAvg 2NN MLP (``--model cnn`` for the CNN), 30 rounds,
5 local epochs, batch 32, SGD lr 0.01, full participation: the settings of
``fedjax-sim compare``. Local runs first on each partition, so every other row also gets
the share of clients hurt by federating and the participation rate (IPR).

    python experiments/fedobp_experiments.py compare --dataset digits --alpha 0.1
    python experiments/fedobp_experiments.py sweep --dataset digits --alpha 0.1
    python experiments/fedobp_experiments.py variants --dataset mnist1d --alpha 0.1
    python experiments/fedobp_experiments.py layers          # the figure, from a CNN run
    python experiments/fedobp_experiments.py table \
        experiments/results/fedobp/compare_digits_a0.1.json
    python experiments/fedobp_experiments.py figure experiments/results/fedobp/sweep_*.json \
        --ig-ratios 0.9999,0.999,0.99,0.9 --figure experiments/figures/fedobp_layers.png

Results go to ``experiments/results/fedobp/<kind>_<dataset>_a<alpha>.{json,md}``; the tables
are in experiments/fedobp.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fedjax_sim import algorithms
from fedjax_sim.data import make_federated_data
from fedjax_sim.models import make_model
from fedjax_sim.models.layers import DEFAULT_INIT, INITS
from fedjax_sim.runner import run

RESULTS = Path(__file__).resolve().parent / "results" / "fedobp"
FIGURES = Path(__file__).resolve().parent / "figures"
COMMON = {"local_epochs": 5, "batch_size": 32, "lr": 0.01, "join_ratio": 1.0}
COMPARED = ("fedper", "fedrep", "lg_fedavg", "local", "apfl", "fedavg")
SWEEP = (1.0, 0.9999, 0.999, 0.99, 0.95, 0.9, 0.8, 0.5, 0.0)
VARIANTS = (
    ("drift_param", {"obp_variant": "drift_param"}),
    ("drift_sq", {"obp_variant": "drift_sq"}),
    ("fisher (client side)", {"obp_variant": "fisher"}),
    ("random (control)", {"obp_variant": "random"}),
    ("drift_param, layer norm", {"obp_variant": "drift_param", "obp_norm": "layer"}),
    ("drift_param, EMA 0.5", {"obp_variant": "drift_param", "ema_alpha": 0.5}),
    ("drift_param, head only", {"obp_variant": "drift_param", "obp_scope": "head"}),
)
KEPT = ("accuracy", "client_mean_accuracy", "client_p10", "hurt_fraction", "ipr", "wall_s",
        "bytes_up", "personalized_fraction", "personalized_elements", "num_params",
        "personalized_by_layer")


def configs(kind: str, ig_ratios: list[float]) -> list[tuple[str, str, dict]]:
    """(row label, algorithm, its own hyperparameters) for one experiment."""
    if kind == "compare":
        rows = [(f"fedobp (q={q:g})", "fedobp", {"ig_ratio": q}) for q in ig_ratios]
        return rows + [(name, name, {}) for name in COMPARED]
    if kind == "sweep":
        return [(f"q={q:g}", "fedobp", {"ig_ratio": q}) for q in ig_ratios]
    if kind == "variants":
        return [(f"{label}, q={q:g}", "fedobp", {"ig_ratio": q, **hp})
                for q in ig_ratios for label, hp in VARIANTS]
    raise ValueError(kind)


def run_experiment(kind: str, dataset: str, alpha: float, seeds: list[int], rounds: int,
                   model_name: str, ig_ratios: list[float], num_clients: int,
                   init: str = DEFAULT_INIT) -> dict:
    rows = configs(kind, ig_ratios)
    results: dict[str, list[dict]] = {label: [] for label, _, _ in rows}
    for seed in seeds:
        data, _, _ = make_federated_data(dataset, partition="dirichlet", alpha=alpha,
                                         num_clients=num_clients, seed=seed)
        model = make_model(model_name, data.input_shape, data.num_classes, init=init,
                           **({"padding": "SAME"} if model_name == "cnn" else {}))
        reference = run(algorithms.make("local", model, **COMMON), data, rounds=rounds,
                        eval_every=rounds, seed=seed, progress=False)
        local_acc = reference.summary["client_accuracies"]
        for label, name, own in rows:
            if name == "local":
                summary = reference.summary
            else:
                alg = algorithms.make(name, model, **COMMON, **own)
                summary = run(alg, data, rounds=rounds, eval_every=rounds, seed=seed,
                              local_accuracies=local_acc, progress=False).summary
            results[label].append({k: summary[k] for k in KEPT if k in summary})
            print(f"{kind} {dataset} a={alpha} seed {seed} {label}: "
                  f"{100 * summary['accuracy']:.2f}% ({summary['wall_s']:.1f} s)",
                  file=sys.stderr, flush=True)
    return {
        "kind": kind, "dataset": dataset, "alpha": alpha, "seeds": seeds, "rounds": rounds,
        "num_clients": num_clients, "model": model_name, "common": COMMON,
        "rows": [{"label": label, "algorithm": name, "hparams": own,
                  "runs": results[label]} for label, name, own in rows],
    }


def _pct(values) -> str:
    values = np.asarray([v for v in values if v is not None], np.float64)
    if values.size == 0:
        return "—"
    return f"{100 * values.mean():.2f} ± {100 * values.std():.2f}"


def table(result: dict) -> str:
    """Markdown table: mean ± std over seeds."""
    lines = [
        f"{result['dataset']}, Dirichlet α = {result['alpha']}, K = {result['num_clients']}, "
        f"{result['model']}, {result['rounds']} rounds, seeds "
        f"{','.join(map(str, result['seeds']))}",
        "",
        "| method | accuracy % | client mean % | bottom decile % | hurt % | IPR % "
        "| personalized elements / client |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        runs = row["runs"]
        personal = [r.get("personalized_elements") for r in runs]
        if personal[0] is None:
            personal_text = "—"
        else:
            frac = np.mean([r["personalized_fraction"] for r in runs])
            personal_text = f"{np.mean(personal):,.0f} ({100 * frac:.3g}%)"
        lines.append(
            f"| {row['label']} | {_pct(r['accuracy'] for r in runs)} "
            f"| {_pct(r['client_mean_accuracy'] for r in runs)} "
            f"| {_pct(r['client_p10'] for r in runs)} "
            f"| {_pct(r.get('hurt_fraction') for r in runs)} "
            f"| {_pct(r.get('ipr') for r in runs)} | {personal_text} |")
    if result["kind"] == "compare":
        lines += ["", paired(result)]
    return "\n".join(lines) + "\n"


def paired(result: dict, against: tuple[str, ...] = ("fedper", "fedavg", "local")) -> str:
    """FedOBP minus each baseline on the same partition and seed, in accuracy points:
    mean, and the per-seed differences."""
    acc = {row["label"]: 100 * np.array([r["accuracy"] for r in row["runs"]])
           for row in result["rows"]}
    lines = ["| FedOBP − baseline (points, same seed) | "
             + " | ".join(against) + " |", "|---" * (len(against) + 1) + "|"]
    for label in (row["label"] for row in result["rows"] if row["algorithm"] == "fedobp"):
        cells = []
        for other in against:
            d = acc[label] - acc[other]
            cells.append(f"{d.mean():+.2f} ({', '.join(f'{x:+.1f}' for x in d)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layers_figure(results: list[dict], out: Path, ig_ratios: list[float] | None = None) -> None:
    """Per-layer fraction of elements personalized, one panel per result, a bar per q
    (those in ``ig_ratios`` if given, else every q strictly between 0 and 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        rows = [r for r in result["rows"] if 0 < r["hparams"].get("ig_ratio", 1) < 1
                and (ig_ratios is None or r["hparams"]["ig_ratio"] in ig_ratios)]
        names = list(rows[0]["runs"][0]["personalized_by_layer"])
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            frac = [np.mean([run_["personalized_by_layer"][n]["fraction"]
                             for run_ in row["runs"]]) for n in names]
            share = [np.mean([run_["personalized_by_layer"][n]["share"]
                              for run_ in row["runs"]]) for n in names]
            bars = ax.bar(np.arange(len(names)) + i * width, frac, width, label=row["label"])
            for bar, s in zip(bars, share, strict=True):
                if s >= 0.01:
                    ax.annotate(f"{100 * s:.0f}%", (bar.get_x() + bar.get_width() / 2,
                                                    bar.get_height()),
                                ha="center", va="bottom", fontsize=6)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("fraction of the layer's elements personalized")
        ax.set_title(f"FedOBP {result['model']} on {result['dataset']}, α = {result['alpha']}"
                     f"\n(labels: share of all personalized elements)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("compare", "sweep", "variants", "layers", "table",
                                         "figure"))
    parser.add_argument("paths", nargs="*", help="table, figure: result JSON files (sweeps)")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--figure", default=str(FIGURES / "fedobp_layers.png"),
                        help="figure: output PNG")
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist1d"))
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--init", default=DEFAULT_INIT, choices=INITS,
                        help="parameter initialization (the tables of fedobp.md: flax)")
    parser.add_argument("--ig-ratios", default=None,
                        help="comma-separated q values (defaults: compare 0.9999,0.9; sweep "
                        f"{','.join(map(str, SWEEP))}; variants 0.99,0.9; layers "
                        "0.9999,0.999,0.99,0.9)")
    args = parser.parse_args(argv)
    if args.kind == "table":
        for path in args.paths:
            print(table(json.loads(Path(path).read_text())))
        return 0
    if args.kind == "figure":
        qs = [float(q) for q in args.ig_ratios.split(",")] if args.ig_ratios else None
        layers_figure([json.loads(Path(p).read_text()) for p in args.paths],
                      Path(args.figure), qs)
        return 0
    if args.alpha <= 0 or args.rounds < 1:
        parser.error("--alpha must be > 0 and --rounds >= 1")
    seeds = [int(s) for s in args.seeds.split(",")]
    defaults = {"compare": "0.9999,0.9", "sweep": ",".join(map(str, SWEEP)),
                "variants": "0.99,0.9", "layers": "0.9999,0.999,0.99,0.9"}
    ig_ratios = [float(q) for q in (args.ig_ratios or defaults[args.kind]).split(",")]
    if not all(0 <= q <= 1 for q in ig_ratios):
        parser.error("--ig-ratios must lie in [0, 1]")
    kind = "sweep" if args.kind == "layers" else args.kind
    tic = time.perf_counter()
    result = run_experiment(kind, args.dataset, args.alpha, seeds, args.rounds, args.model,
                            ig_ratios, args.num_clients, args.init)
    result["wall_s"] = time.perf_counter() - tic
    stem = f"{args.kind}_{args.dataset}_a{args.alpha:g}" + (
        f"_{args.model}" if args.model != "mlp" else "") + (
        f"_{args.init}" if args.init != "flax" else "") + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    if args.kind == "layers":
        layers_figure([result], FIGURES / f"fedobp_layers_{args.dataset}_{args.model}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
