"""Cost of FedOBP's server step against one FedAvg round on the same workload.

Times (a) the scores + per-client quantile masks + mix for ALL K clients at once (what an
evaluation computes, and an upper bound of what a round computes: a round only does it for
its cohort), (b) one FedAvg round, and (c) one FedOBP round, on random 28x28x1 data with
the FedAvg CNN (582,026 parameters). Every function is jitted and run once to compile;
the timed runs alternate between the three so that load from other processes hits them
alike, and the best of ``--repeats`` is kept. Prints one JSON line per setting with the
ratios (a)/(b) and (c)/(b) - 1.

    python experiments/bench_fedobp.py                      # the paper's workload, K=100
    python experiments/bench_fedobp.py --join-ratio 1.0 --local-steps 10   # fedjax-sim bench's
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from fedjax_sim import algorithms
from fedjax_sim.algorithms import fedobp
from fedjax_sim.core.cohort import resolve_strategy
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.models import count_params, make_model
from fedjax_sim.runner import to_device


def random_data(clients: int, samples: int, seed: int) -> FederatedData:
    """Random 28x28x1 images with 10 labels, ``samples`` training rows per client."""
    rng = np.random.default_rng(seed)
    return FederatedData(
        train_x=rng.random((clients, samples, 28, 28, 1), dtype=np.float32),
        train_y=rng.integers(0, 10, (clients, samples)).astype(np.int32),
        train_counts=np.full((clients,), samples, np.int32),
        test_x=rng.random((clients, 8, 28, 28, 1), dtype=np.float32),
        test_y=rng.integers(0, 10, (clients, 8)).astype(np.int32),
        test_counts=np.full((clients,), 8, np.int32),
        num_classes=10, name="random28",
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--join-ratio", type=float, default=0.1)
    parser.add_argument("--samples-per-client", type=int, default=450,
                        help="training rows per client (CIFAR-10 pooled 60,000 / 100 "
                        "clients x 0.75 train = 450)")
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=None,
                        help="fixed local steps instead of epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ig-ratio", type=float, default=0.9999)
    parser.add_argument("--obp-variant", default="drift_param",
                        choices=("drift_param", "drift_sq", "random"))
    parser.add_argument("--client-strategy", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("num_clients", "samples_per_client", "local_epochs", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")

    data = to_device(random_data(args.num_clients, args.samples_per_client, args.seed))
    model = make_model(args.model, (28, 28, 1), 10)
    common = {"join_ratio": args.join_ratio, "batch_size": args.batch_size, "lr": 0.01,
              "momentum": 0.7, "local_epochs": args.local_epochs,
              "local_steps": args.local_steps, "client_strategy": args.client_strategy}
    avg = algorithms.make("fedavg", model, **common)
    obp_alg = algorithms.make("fedobp", model, ig_ratio=args.ig_ratio,
                              obp_variant=args.obp_variant, **common)
    step = fedobp.personalizer(model, obp_alg.hparams)

    key = jax.random.key(args.seed)
    avg_state = avg.init(key, data)
    obp_state = obp_alg.init(key, data)
    # Clients that have drifted from the global model, as after some rounds.
    noise_keys = iter(jax.random.split(jax.random.key(args.seed + 1), 64))
    drifted = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(next(noise_keys), p.shape),
                           obp_state.clients["params"])
    obp_state = obp_state.replace(clients={**obp_state.clients, "params": drifted})

    server_step = jax.jit(lambda s: step.apply(s.clients, s.server["params"],
                                               fedobp.random_key(s))[:2])
    avg_round = jax.jit(avg.round)
    obp_round = jax.jit(obp_alg.round)
    # Rounds are pure: timing them repeatedly from the same state is fair.
    runs = {
        "server_step_all_clients": lambda: server_step(obp_state),
        "fedavg_round": lambda: avg_round(avg_state, data),
        "fedobp_round": lambda: obp_round(obp_state, data),
    }
    compile_s = {}
    for name, fn in runs.items():
        tic = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s[name] = time.perf_counter() - tic
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            tic = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - tic)

    _, mask = server_step(obp_state)
    personal = float(np.mean(np.asarray(
        sum(np.asarray(m).reshape(args.num_clients, -1).sum(1) for m in jax.tree.leaves(mask)))))
    result = {
        "model": args.model,
        "num_params": count_params(obp_state.server["params"]),
        "num_clients": args.num_clients,
        "join_ratio": args.join_ratio,
        "local": (f"{args.local_steps} steps" if args.local_steps
                  else f"{args.local_epochs} epochs x {args.samples_per_client} samples"),
        "batch_size": args.batch_size,
        "ig_ratio": args.ig_ratio,
        "variant": args.obp_variant,
        "personalized_per_client": personal,
        "backend": jax.default_backend(),
        "strategy": resolve_strategy(args.client_strategy),
        "server_step_all_clients_s": best["server_step_all_clients"],
        "fedavg_round_s": best["fedavg_round"],
        "fedobp_round_s": best["fedobp_round"],
        "ratio_server_step_to_fedavg_round": best["server_step_all_clients"]
        / best["fedavg_round"],
        "fedobp_round_overhead": best["fedobp_round"] / best["fedavg_round"] - 1.0,
        "compile_s": compile_s,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
