"""Round time at a fixed cohort as the client count grows to StackOverflow's 342,477.

A StackOverflow-shaped stand-in (``fedjax_sim.data.scale.stand_in``: 20 int32 tokens in
and out per sentence, vocabulary 10,004, log-normal client sizes) in the ragged layout,
K clients, a cohort of ``--cohort`` clients per round (``join_ratio = cohort / K``), each
training ``--local-steps`` steps of batch ``--batch-size``: the work of a round does not
depend on K, so neither should its time. Per K: the data's bytes, the compile time and
the median round time over ``--rounds`` rounds (evaluation not included: it visits all K
clients). ``--cap`` caps each client's sentences so that the largest K fits in memory.

    python experiments/scale_rounds.py
    python experiments/scale_rounds.py --clients 1000,10000,100000,342477 --model transformer
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax


def main(argv=None) -> None:
    from fedjax_sim import algorithms
    from fedjax_sim.data.scale import stand_in
    from fedjax_sim.models import make_model
    from fedjax_sim.runner import to_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1000,10000,100000,342477")
    parser.add_argument("--stand-in", default="stackoverflow")
    parser.add_argument("--cap", type=int, default=32, help="sentences per client at most")
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="transformer")
    parser.add_argument("--algorithm", default="fedavg")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    rows = []
    for k in (int(v) for v in args.clients.split(",")):
        tic = time.perf_counter()
        data = stand_in(args.stand_in, num_clients=k, max_examples=args.cap)
        build_s = time.perf_counter() - tic
        options = {"dim": 32, "depth": 1, "heads": 2} if args.model == "transformer" else {}
        model = make_model(args.model, data.input_shape, data.num_classes, **options)
        algorithm = algorithms.make(args.algorithm, model, local_steps=args.local_steps,
                                    batch_size=args.batch_size,
                                    join_ratio=min(1.0, args.cohort / k))
        device_data = to_device(data)
        state = jax.jit(algorithm.init)(jax.random.key(0), device_data)
        step = jax.jit(algorithm.round)
        tic = time.perf_counter()
        state, metrics = step(state, device_data)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - tic
        times = []
        for _ in range(args.rounds):
            tic = time.perf_counter()
            state, metrics = step(state, device_data)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - tic)
        row = {"clients": k, "examples": int(data.train_counts.sum()),
               "data_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(data)),
               "build_s": build_s, "first_round_s": compile_s,
               "round_ms": 1e3 * statistics.median(times),
               "train_loss": float(metrics["train_loss"])}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del data, device_data, state
    base = rows[0]["round_ms"]
    print(f"\n{args.algorithm}, {args.model}, cohort {args.cohort}, {args.local_steps} steps of "
          f"{args.batch_size}\n\n| clients K | train examples | data MiB | ms / round "
          "| vs smallest K |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']:,} | {r['examples']:,} | {r['data_bytes'] / 2**20:,.0f} "
              f"| {r['round_ms']:.1f} | {r['round_ms'] / base:.2f} |")


if __name__ == "__main__":
    main()
