"""The cost of a round against FedAvg's on the same setting, in one process.

Each configuration is ``algorithm`` or ``algorithm:key=value,key=value`` (its
hyperparameters, e.g. ``fedavg:dp=adaptive``). Every round is built, jitted and run past
its first rounds (compilation, start phases) before any timing; then, ``--repeats`` times,
each configuration runs ``--rounds`` rounds in turn, FedAvg first, so that the machine's
load reaches all of them alike. Per configuration: the fastest repeat's milliseconds per
round and the median over the repeats of its ratio to FedAvg's time in the same repeat (on
a shared machine the ratio of neighbouring timings is steadier than either).

    python experiments/round_cost.py --configs perfedavg,pfedme,moon,feddyn
    python experiments/round_cost.py --dataset mnist1d --num-samples 40000 \\
        --num-clients 1000 --join-ratio 0.05 \\
        --configs fedavg:dp=fixed,dp_sampling=fixed fedavg:dp=fixed fedavg:dp=adaptive
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np

BASELINE = "fedavg"


def parse_config(text: str) -> tuple[str, dict]:
    """``algorithm:key=value,...`` -> ``(algorithm, hyperparameters)``; values are read as
    JSON where they parse (numbers, true / false), as text otherwise."""
    name, _, rest = text.partition(":")
    hparams = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            hparams[key] = json.loads(value)
        except ValueError:
            hparams[key] = value
    return name, hparams


def round_times(configs: Sequence[tuple[str, str, dict]], data, model, *, rounds: int,
                repeats: int, warmup: int = 3) -> list[dict]:
    """``[{"config", "ms", "ratio"}]`` of ``configs``, each ``(label, algorithm,
    hyperparameters)``; the first is the baseline the ratios are against (see the module
    docstring)."""
    import jax

    from fedjax_sim import algorithms
    from fedjax_sim.runner import to_device

    data = to_device(data)
    built = {}
    for label, name, hparams in configs:
        alg = algorithms.make(name, model, **hparams)
        step = jax.jit(alg.round)
        state = alg.init(jax.random.key(0), data)
        for _ in range(warmup):
            state, _ = step(state, data)
        built[label] = (step, jax.block_until_ready(state))
    times = {label: [] for label in built}
    for _ in range(repeats):
        for label, (step, state) in built.items():
            tic = time.perf_counter()
            for _ in range(rounds):
                state, _ = step(state, data)
            jax.block_until_ready(state)
            times[label].append((time.perf_counter() - tic) / rounds)
    base = np.asarray(times[configs[0][0]])
    return [{"config": c, "ms": 1e3 * float(np.min(t)),
             "ratio": float(np.median(np.asarray(t) / base))} for c, t in times.items()]


def main(argv=None) -> list[dict]:
    from fedjax_sim.data import make_federated_data
    from fedjax_sim.models import make_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True,
                        help="algorithm or algorithm:key=value,... (comma-separated or several)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--num-samples", type=int, default=None, help="mnist1d's generator")
    parser.add_argument("--model", default="mlp", help="mlp, cnn, cnn_bn, ...")
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--join-ratio", type=float, default=1.0)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    # "a,b" and "a:k=v,k=v" both use commas: a piece with "=" belongs to the one before.
    configs: list[str] = []
    for word in args.configs:
        for piece in word.split(","):
            if ":" not in piece and "=" in piece and configs and ":" in configs[-1]:
                configs[-1] += "," + piece
            else:
                configs.append(piece)
    options = None if args.num_samples is None else {"num_samples": args.num_samples}
    data, _, _ = make_federated_data(args.dataset, num_clients=args.num_clients,
                                     alpha=args.alpha, source_options=options)
    model = make_model(args.model, data.input_shape, data.num_classes, init="torch")
    common = {"join_ratio": args.join_ratio, "local_epochs": args.local_epochs,
              "lr": args.lr}
    table = [(BASELINE, BASELINE, common)]
    for config in configs:
        name, own = parse_config(config)
        table.append((config, name, {**common, **own}))
    rows = round_times(table, data, model, rounds=args.rounds, repeats=args.repeats)
    print("| configuration | ms / round (fastest) | x FedAvg (median) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['ms']:.1f} | {row['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
