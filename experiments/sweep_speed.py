"""A seed sweep as one vmapped simulation against the same runs one after another.

Both sides use the same split (digits, Dirichlet 0.1, 20 clients by default), the same
algorithm and hyperparameters, and evaluate every ``--eval-every`` rounds; the sequential
side is what a loop over ``fedjax-sim run --seed s`` does in one process (each run builds
and compiles its own round). Wall times include compilation on both sides.

    python experiments/sweep_speed.py --seeds 0,1,2,3 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> None:
    from fedjax_sim import algorithms
    from fedjax_sim.data import make_federated_data
    from fedjax_sim.models import make_model
    from fedjax_sim.platform import configure_cpu_devices
    from fedjax_sim.runner import run, sweep

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", default="fedper")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--lrs", default=None, help="also sweep these learning rates")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--cpu-devices", default="auto",
                        help="XLA CPU devices to show, as fedjax-sim --cpu-devices")
    args = parser.parse_args(argv)
    configure_cpu_devices(args.cpu_devices)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else [0.01]
    data, _, _ = make_federated_data(args.dataset, partition="dirichlet", alpha=0.1,
                                     num_clients=args.num_clients, seed=0)
    model = make_model("mlp", data.input_shape, data.num_classes)
    hp = {"local_epochs": args.local_epochs}
    loop = dict(rounds=args.rounds, eval_every=args.eval_every)

    tic = time.perf_counter()
    sequential = []
    for lr in lrs:
        for seed in seeds:
            alg = algorithms.make(args.algorithm, model, lr=lr, **hp)
            sequential.append(run(alg, data, seed=seed, progress=False, **loop).summary)
    sequential_s = time.perf_counter() - tic
    row = {"algorithm": args.algorithm, "configs": len(sequential), "rounds": args.rounds,
           "sequential_s": sequential_s, "run_devices": sequential[0]["devices"]}
    for strategy in ("vmap", "map"):
        tic = time.perf_counter()
        swept = sweep(args.algorithm, model, data, seeds=seeds, lrs=lrs, hparams=hp,
                      config_strategy=strategy, progress=False, **loop)
        row[f"sweep_{strategy}_s"] = time.perf_counter() - tic
        row["sweep_devices"] = swept[0]["devices"]
        row[f"speedup_{strategy}"] = sequential_s / row[f"sweep_{strategy}_s"]
        row[f"max_accuracy_gap_{strategy}"] = float(np.max(np.abs(
            np.array([s["accuracy"] for s in swept]) -
            np.array([s["accuracy"] for s in sequential]))))
    print(json.dumps(row))
    print(f"\n| configs | rounds | one after another s | vmapped sweep s | speedup "
          f"| looped sweep s | speedup |\n|---|---|---|---|---|---|---|\n"
          f"| {row['configs']} | {args.rounds} | {sequential_s:.1f} | {row['sweep_vmap_s']:.1f} "
          f"| {row['speedup_vmap']:.2f}x | {row['sweep_map_s']:.1f} | {row['speedup_map']:.2f}x |")


if __name__ == "__main__":
    main()
