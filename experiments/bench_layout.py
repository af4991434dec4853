"""Round time of the ragged layout against the padded one on the same split.

For each data set and algorithm, both layouts are built from one partition, their rounds
compiled, then timed alternately in this process (``--repeats`` blocks of ``--rounds``
rounds each; the median per layout), so machine load hits both alike. The ratio
ragged / padded is what the ragged layout costs (a client's rows are sliced out of the
pool once per round inside the jitted step).

    python experiments/bench_layout.py
    python experiments/bench_layout.py --datasets digits,mnist1d --algorithms fedavg,fedper
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax


def time_rounds(step, state, data, rounds: int) -> tuple[float, object]:
    tic = time.perf_counter()
    for _ in range(rounds):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - tic) / rounds, state


def main(argv=None) -> None:
    from fedjax_sim import algorithms
    from fedjax_sim.data import make_federated_data
    from fedjax_sim.data.federated import build_federated, build_ragged
    from fedjax_sim.models import make_model
    from fedjax_sim.runner import to_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,mnist1d")
    parser.add_argument("--algorithms", default="fedavg,fedper")
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rows = []
    for dataset in args.datasets.split(","):
        _, splits, pooled = make_federated_data(dataset, num_clients=args.num_clients,
                                                alpha=0.1)
        layouts = {"padded": to_device(build_federated(pooled, splits)),
                   "ragged": to_device(build_ragged(pooled, splits))}
        data_bytes = {name: sum(leaf.nbytes for leaf in jax.tree.leaves(d))
                      for name, d in layouts.items()}
        for name in args.algorithms.split(","):
            model = make_model("mlp", layouts["padded"].input_shape, pooled.num_classes)
            algorithm = algorithms.make(name, model)
            runs = {}
            for layout, data in layouts.items():
                state = jax.jit(algorithm.init)(jax.random.key(0), data)
                step = jax.jit(algorithm.round)
                _, state = time_rounds(step, state, data, 1)  # compile
                runs[layout] = [step, state, []]
            for _ in range(args.repeats):
                for layout, data in layouts.items():
                    step, state, times = runs[layout]
                    seconds, runs[layout][1] = time_rounds(step, state, data, args.rounds)
                    times.append(seconds)
            median = {layout: statistics.median(r[2]) for layout, r in runs.items()}
            row = {"dataset": dataset, "algorithm": name, "clients": args.num_clients,
                   "padded_round_ms": 1e3 * median["padded"],
                   "ragged_round_ms": 1e3 * median["ragged"],
                   "ratio": median["ragged"] / median["padded"],
                   "padded_data_bytes": data_bytes["padded"],
                   "ragged_data_bytes": data_bytes["ragged"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| data | algorithm | padded ms/round | ragged ms/round | ragged / padded "
          "| data bytes padded | ragged |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['algorithm']} | {r['padded_round_ms']:.1f} "
              f"| {r['ragged_round_ms']:.1f} | {r['ratio']:.3f} | {r['padded_data_bytes']:,} "
              f"| {r['ragged_data_bytes']:,} |")


if __name__ == "__main__":
    main()
