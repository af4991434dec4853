"""Free riding under the naive scheme and accuracy shaping, on an accuracy curve measured
with the simulator (Karimireddy, Guo, Jordan, arXiv:2207.04557; ``fedjax_sim.incentives``).

1. v(m): FedAvg on an IID split over ``--clients`` clients whose training rows are shuffled
   once, ``--held-out`` of them kept out of the game and of all training; one batched
   program over the contribution levels (every client keeps ``⌈f n_k⌉`` rows) and
   ``--seeds``.
2. For each cost distribution (unit mean, times a reference cost ``c_ref``): solo optima,
   the naive scheme's Nash equilibrium reached by best responses from zero and every
   equilibrium total (the lowest and the highest bound what free riding leaves on a
   curve that is not concave), and the mechanism's targets (the largest fixed point) with
   the check that each is its agent's best response.
3. One batched program trains a global model on each distribution's targets; every agent
   gets it degraded to its shaped accuracy γ_i(m) at three contributions (its target, half
   of it, nothing), the pooled term anchored at the trained model, calibrated on the
   agent's training rows and, separately, on its held-out rows; the delivered accuracy is
   measured on its test set beside the target.

``c_ref`` scales the costs so that solo contributions are a moderate share of an agent's
data: it is the geometric mean of v's slopes left and right of the measured point nearest
half an agent's samples, so a ``constant(1)`` agent's solo amount is that point.

Prints two tables and the wall time; writes ``--json`` and two plots to ``--out``: v(m)
with the equilibria marked, and the shaping functions γ_i(m) of three agents. The
defaults take about a minute on 2 CPU cores. Results: experiments/free_riding.md.

Usage:
  python experiments/free_riding.py                      # digits
  python experiments/free_riding.py --dataset mnist1d
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedjax_sim import incentives as inc
from fedjax_sim.checks import check_float, parse_int, parse_list, parse_seed
from fedjax_sim.data import make_federated_data
from fedjax_sim.models import make_model

COSTS = ("constant(1)", "uniform(0.5, 1.5)", "lognormal(-0.5, 1)")  # each of mean 1
HPARAMS = {"local_epochs": 5, "batch_size": 16, "lr": 0.1}
HIDDEN = {"digits": (64,), "mnist1d": (128,)}
# Where the agents deliver: a fraction of their target contribution.
DEVIATIONS = (1.0, 0.5, 0.0)


def parse_fraction(text: str, label: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{label} must be a number in (0, 1], got {text!r}") from None


def reference_cost(curve: inc.ValueCurve, m0: float) -> float:
    """Geometric mean of v's slopes on both sides of the measured point nearest ``m0``."""
    inner = curve.m[1:-1]
    k = 1 + int(np.argmin(np.abs(inner - m0)))
    left = (curve.v[k] - curve.v[k - 1]) / (curve.m[k] - curve.m[k - 1])
    right = (curve.v[k + 1] - curve.v[k]) / (curve.m[k + 1] - curve.m[k])
    if left > 0 and right > 0:
        return float(np.sqrt(left * right))
    return float(max(left, right, 1e-12))


def solve(curve, costs, caps, delta) -> dict:
    alone = inc.solo(curve, costs, caps)
    naive = inc.naive_equilibrium(curve, costs, caps)
    mech = inc.shaping_mechanism(curve, costs, caps, delta)
    return {"solo": alone, "naive": naive, "mechanism": mech}


def curve_targets(curve, costs, mech) -> dict[float, np.ndarray]:
    """γ_i(d m_i^†) from the curve, per deviation fraction d, the others at their targets."""
    return {d: np.array([float(mech.shaping(curve, costs, i, d * mech.targets[i]))
                         for i in range(costs.size)]) for d in DEVIATIONS}


def deliveries(model, trained, data, calibrations, curve, costs, mech) -> dict:
    """Per calibration and deviation fraction d: γ_i(d m_i^†) anchored at the trained
    model's calibration accuracy (``Mechanism.anchored``), delivered and measured."""
    out = {}
    for name, rows in calibrations.items():
        achieved = inc.model_accuracies(model, trained.params, rows)[0]
        out[name] = {d: inc.deliver(model, trained.params, data,
                                    mech.anchored(curve, costs, d * mech.targets, achieved),
                                    seed=j, calibration=rows)
                     for j, d in enumerate(DEVIATIONS)}
    return out


def record(spec, costs, game, trained, deliveries, curve_targets) -> dict:
    alone, naive, mech = game["solo"], game["naive"], game["mechanism"]
    return {
        "costs_spec": spec, "costs": costs.tolist(),
        "solo": {"contributions": alone.contributions.tolist(),
                 "utilities": alone.utilities.tolist(),
                 "accuracies": alone.accuracies.tolist()},
        "naive": {"contributions": naive.contributions.tolist(), "total": naive.total,
                  "accuracy": naive.accuracy, "utilities": naive.utilities.tolist(),
                  "iterations": naive.iterations, "converged": naive.converged,
                  "max_gain": naive.max_gain, "totals": naive.totals.tolist(),
                  "profiles": naive.profiles.tolist(),
                  "lowest_total": naive.lowest_total, "highest_total": naive.highest_total},
        "shaping": {"targets": mech.targets.tolist(), "total": mech.total,
                    "accuracy": mech.accuracy, "utilities": mech.utilities.tolist(),
                    "residual": mech.residual,
                    "capped": mech.capped.tolist(), "gains": mech.gains.tolist(),
                    "max_gain": mech.max_gain, "delta": mech.delta},
        "trained_on_targets": {"rows": trained.counts.tolist(),
                               "accuracy": trained.accuracy},
        "curve_targets": {str(d): t.tolist() for d, t in curve_targets.items()},
        "delivered": {calib: {str(d): {
            "targets": out.targets.tolist(), "p": out.p.tolist(),
            "calibration_accuracy": out.train_accuracy.tolist(),
            "test_accuracy": out.test_accuracy.tolist(),
            "delivered": out.delivered.tolist(), "expected": out.expected.tolist(),
            "max_gap": out.max_gap,
            "max_gap_sd": float(np.max(np.abs(out.gaps) / out.noise))}
            for d, out in per_d.items()} for calib, per_d in deliveries.items()},
    }


def table(rows: list[dict], available: float, curve: inc.ValueCurve) -> str:
    """Per cost distribution: every naive equilibrium total (the one reached from zero in
    brackets), v at the lowest and the highest of them and at M†, the data under shaping
    and alone, the utilities (naive: at the equilibrium reached from zero), the checks."""
    lines = [
        "| costs | naive equilibrium totals (reached from zero) "
        "| v: naive lowest / naive highest / shaping "
        f"| total data: shaping / solo sum (of {available:.0f}) "
        "| utility mean: naive / shaping / solo "
        "| utility min: naive / shaping / solo | naive sweeps | shaping: agents at n_i "
        "| shaping: max gain from deviating "
        "| model trained on the targets: test accuracy (v(M†)) |",
        "|---" * 10 + "|",
    ]
    for r in rows:
        n, s, a = r["naive"], r["shaping"], r["solo"]
        totals = ", ".join(f"{t:.0f}" for t in n["totals"])
        low, high = float(curve(n["lowest_total"])), float(curve(n["highest_total"]))
        lines.append(
            f"| {r['costs_spec']} | {totals} ({n['total']:.0f}) | "
            f"{low:.3f} / {high:.3f} / {s['accuracy']:.3f} | {s['total']:.0f} / "
            f"{sum(a['contributions']):.0f} | "
            f"{np.mean(n['utilities']):.3f} / {np.mean(s['utilities']):.3f} / "
            f"{np.mean(a['utilities']):.3f} | {np.min(n['utilities']):.3f} / "
            f"{np.min(s['utilities']):.3f} / {np.min(a['utilities']):.3f} | "
            f"{n['iterations']} | {sum(s['capped'])} of {len(s['capped'])} | "
            f"{s['max_gain']:.1e} | "
            f"{r['trained_on_targets']['accuracy']:.3f} ({s['accuracy']:.3f}) |")
    return "\n".join(lines)


def delivery_table(rows: list[dict]) -> str:
    """Per cost distribution and calibration: at each deviation, the mean target, the
    mean delivered accuracy, the mean p, and the largest |delivered − target| (also in
    standard deviations from sampling, ``Delivery.noise``)."""
    heads = {1.0: "m_i = m†", 0.5: "m_i = m†/2", 0.0: "m_i = 0"}
    lines = ["| costs | calibration | " + " | ".join(
        f"{heads[d]}: target → delivered (p), max \\|gap\\| (SDs)" for d in DEVIATIONS)
        + " |", "|---" * (2 + len(DEVIATIONS)) + "|"]
    for r in rows:
        for calib, per_d in r["delivered"].items():
            cells = []
            for d in DEVIATIONS:
                x = per_d[str(d)]
                cells.append(f"{np.mean(x['targets']):.3f} → {np.mean(x['delivered']):.3f} "
                             f"({np.mean(x['p']):.2f}), {x['max_gap']:.3f} "
                             f"({x['max_gap_sd']:.1f})")
            lines.append(f"| {r['costs_spec']} | {calib} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(curve, rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(curve.m, curve.measured, "o", color="0.6", label="measured")
    ax.plot(curve.m, curve.v, "-", color="k", label="v(m) (running max)")
    for j, r in enumerate(rows):
        color = f"C{j}"
        totals = np.array(r["naive"]["totals"])
        ax.plot(totals, curve(totals), "v", color=color, ms=9,
                label=f"naive equilibria, {r['costs_spec']}")
        total = r["shaping"]["total"]
        ax.plot([total], [curve(total)], "^", color=color, ms=9,
                label=f"shaping (M†), {r['costs_spec']}")
        solo_sum = sum(r["solo"]["contributions"])
        ax.plot([solo_sum], [curve(solo_sum)], "s", color=color, ms=6, mfc="none",
                label=f"solo sum, {r['costs_spec']}")
    ax.set_xlabel("m: samples contributed in total")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_shaping(curve, costs, game, spec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mech, caps = game["mechanism"], game["caps"]
    order = np.argsort(costs)
    agents = sorted({int(order[0]), int(order[len(order) // 2]), int(order[-1])})
    fig, axes = plt.subplots(1, len(agents), figsize=(3.2 * len(agents), 3), sharey=True)
    for ax, i in zip(np.atleast_1d(axes), agents, strict=True):
        m = np.linspace(0, caps[i], 400)
        others = mech.total - mech.targets[i]
        ax.plot(m, mech.shaping(curve, costs, i, m), label="γ_i(m) (shaping)")
        ax.plot(m, curve(m + others), "--", label="v(m + M_−i) (naive)")
        ax.plot(m, curve(m), ":", label="v(m) (alone)")
        ax.axvline(mech.targets[i], color="k", lw=0.8)
        ax.axvline(game["solo"].contributions[i], color="0.6", lw=0.8, ls=":")
        ax.set_title(f"agent {i}, c = {costs[i]:.2e}", fontsize=8)
        ax.set_xlabel("m_i (target: solid line, solo: dotted)", fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("accuracy delivered")
    np.atleast_1d(axes)[0].legend(fontsize=6)
    fig.suptitle(f"shaping functions, costs {spec}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist1d"))
    parser.add_argument("--rounds", default="30")
    parser.add_argument("--clients", default="10")
    parser.add_argument("--levels", default=",".join(map(str, inc.DEFAULT_LEVELS)),
                        help="contribution fractions of the value curve")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds v is averaged over")
    parser.add_argument("--delta", type=float, default=inc.DEFAULT_DELTA)
    parser.add_argument("--costs", nargs="+", default=list(COSTS),
                        help="cost distributions of unit mean (times c_ref)")
    parser.add_argument("--cost-seed", default="0")
    parser.add_argument("--held-out", type=float, default=0.2,
                        help="share of each client's training rows kept out of the game "
                             "and of training, to calibrate delivered models without "
                             "bias (0: none)")
    parser.add_argument("--json", default=None,
                        help="results file (default experiments/results/"
                             "free_riding_<dataset>.json)")
    parser.add_argument("--out", default="experiments/figures", help="folder of the plots")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    # Everything is checked before anything is loaded or compiled.
    rounds = parse_int(args.rounds, "--rounds")
    clients = parse_int(args.clients, "--clients", 2)
    seeds = parse_list(args.seeds, "--seeds", parse_seed)
    levels = inc.check_levels(parse_list(args.levels, "--levels", parse_fraction))
    delta = inc.check_delta(args.delta)
    cost_seed = parse_seed(args.cost_seed, "--cost-seed")
    held_out = check_float("--held-out", args.held_out, 0.0, 1.0, high_open=True)
    unit = {spec: inc.draw_costs(spec, clients, seed=cost_seed) for spec in args.costs}

    full = make_federated_data(args.dataset, partition="iid", num_clients=clients, seed=0)[0]
    # The loaders keep the source's order within a client: make "the first rows" of a level
    # and the held-out last rows uniform random subsets.
    full = inc.shuffle_rows(full, seed=0)
    data, held = inc.hold_out(full, held_out) if held_out > 0 else (full, None)
    model = make_model("mlp", data.input_shape, data.num_classes, hidden=HIDDEN[args.dataset])
    curve = inc.value_curve(data, model, levels=levels, hparams=HPARAMS, rounds=rounds,
                            seeds=seeds)
    curve_s = time.perf_counter() - start
    caps = np.asarray(data.train_counts, np.float64)
    c_ref = reference_cost(curve, caps.mean() / 2)

    games = {}
    for spec, base in unit.items():
        costs = base * c_ref
        games[spec] = {"costs": costs, "caps": caps, **solve(curve, costs, caps, delta)}
    trained = inc.train_on_contributions(
        data, model, [g["mechanism"].targets for g in games.values()], hparams=HPARAMS,
        rounds=rounds, seed=seeds[0])
    calibrations = {"train": data} | ({"held-out": held} if held is not None else {})
    rows = []
    for (spec, game), on_targets in zip(games.items(), trained, strict=True):
        mech = game["mechanism"]
        delivered = deliveries(model, on_targets, data, calibrations, curve, game["costs"],
                               mech)
        rows.append(record(spec, game["costs"], game, on_targets, delivered,
                           curve_targets(curve, game["costs"], mech)))
    wall = time.perf_counter() - start

    print(f"{args.dataset}: {clients} clients, {int(caps.sum())} training rows in the game "
          f"(n_i {int(caps.min())}..{int(caps.max())}), FedAvg {rounds} rounds, "
          f"training seeds {seeds}, cost seed {cost_seed}, delta {delta}, "
          f"c_ref {c_ref:.3e}")
    print("v(m): " + ", ".join(f"{m:.0f}: {v:.3f}" for m, v in zip(curve.m, curve.v,
                                                                    strict=True)))
    print(table(rows, caps.sum(), curve))
    print(delivery_table(rows))
    print(f"wall time {wall:.1f} s (value curve {curve_s:.1f} s)")

    result = {
        "dataset": args.dataset, "clients": clients, "rounds": rounds, "seeds": seeds,
        "hparams": HPARAMS, "hidden": HIDDEN[args.dataset], "delta": delta,
        "held_out": held_out, "costs_seed": cost_seed,
        "c_ref": c_ref, "caps": caps.tolist(), "deviations": list(DEVIATIONS),
        "value_curve": {"levels": list(levels), "m": curve.m.tolist(),
                        "measured": curve.measured.tolist(), "v": curve.v.tolist()},
        "games": rows, "wall_s": wall, "value_curve_s": curve_s,
    }
    json_path = Path(args.json or f"experiments/results/free_riding_{args.dataset}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_curve(curve, rows, out / f"free_riding_value_curve_{args.dataset}.png")
    spread = max(games, key=lambda s: np.ptp(games[s]["costs"]))
    plot_shaping(curve, games[spread]["costs"], games[spread], spread,
                 out / f"free_riding_shaping_{args.dataset}.png")
    return result


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # a bad option, refused before anything is compiled
        raise SystemExit(f"free_riding.py: error: {error}") from None
