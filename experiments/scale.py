"""Round time and peak memory against the number of clients K at a fixed cohort.

Every K runs in a fresh process (so that ``ru_maxrss`` is that run's peak): random
28x28x1 data, ``--samples`` training rows per client, the mlp, a cohort of ``--cohort``
clients per round (``join_ratio = cohort / K``). The personal state of all K clients stays
resident as (K, ...) arrays; a round gathers the cohort's rows, trains them and scatters
them back into the donated buffers, so its cost should follow the cohort, not K. The
compiled round is also searched for copies of a (K, ...) buffer.

    python experiments/scale.py                       # FedPer (and FedOBP if registered)
    python experiments/scale.py --algorithms fedper --ks 100,1000,10000

Prints one JSON line per (algorithm, K) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, re, resource, sys
import jax
import numpy as np
from fedjax_sim.platform import configure_cpu_devices
configure_cpu_devices(sys.argv[7])
from fedjax_sim import algorithms
from fedjax_sim.bench import random_data, timed_calls
from fedjax_sim.models import make_model
from fedjax_sim.runner import client_axis_mesh, make_round_block, mesh_context, place

name, k, cohort, samples, steps, rounds = sys.argv[1], *map(int, sys.argv[2:7])
alg = algorithms.make(name, make_model("mlp", (28, 28, 1), 10), local_steps=steps,
                      batch_size=32, join_ratio=cohort / k)
mesh = client_axis_mesh(k)
context = mesh_context(mesh)
context.__enter__()
data, state, shardings = place(alg, random_data(k, samples, test_samples=4), seed=0, mesh=mesh)
jax.block_until_ready(state)
state_bytes = sum(x.nbytes for x in jax.tree.leaves(state.clients))
block = make_round_block(alg, 1, state_shardings=shardings)
hlo = block.lower(state, data).compile().as_text()
# A copy whose result has the shape of a client-state leaf copies a whole (K, ...) buffer
# (a K equal to the cohort or to a layer width also counts temporaries of that shape).
state_shapes = {"f32[%s]" % ",".join(map(str, x.shape))
                for x in jax.tree.leaves(state.clients) if x.ndim}
copies = [line.strip()[:160] for line in hlo.splitlines()
          if (m := re.search(r"= (f32\[[0-9,]*\])\{[^=]*\bcopy\(", line))
          and m.group(1) in state_shapes]
state, compile_s, times = timed_calls(block, state, data, rounds)
print(json.dumps({
    "algorithm": name, "num_clients": k, "cohort": cohort, "join_ratio": cohort / k,
    "round_s": float(np.median(times)), "round_s_best": min(times), "compile_s": compile_s,
    "client_state_mb": state_bytes / 2**20, "full_state_copies": len(copies),
    "copies": copies[:3],
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "devices": 1 if mesh is None else mesh.size,
}))
"""


def main(argv=None) -> None:
    from fedjax_sim import algorithms

    default = [a for a in ("fedper", "fedobp") if a in algorithms.ALGORITHMS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default=",".join(default))
    parser.add_argument("--ks", default="100,1000,10000")
    parser.add_argument("--cohort", type=int, default=100)
    parser.add_argument("--samples", type=int, default=32, help="training rows per client")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per K")
    parser.add_argument("--cpu-devices", default="auto",
                        help="XLA CPU devices to show, as fedjax-sim --cpu-devices")
    args = parser.parse_args(argv)
    names = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    missing = [a for a in ("fedper", "fedobp") if a not in algorithms.ALGORITHMS]
    if missing:
        print(f"not registered here, skipped: {', '.join(missing)}", file=sys.stderr)
    rows = []
    for name in names:
        for k in [int(v) for v in args.ks.split(",")]:
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, name, str(k), str(min(args.cohort, k)),
                 str(args.samples), str(args.local_steps), str(args.rounds), args.cpu_devices],
                capture_output=True, text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-3:]
                row = {"algorithm": name, "num_clients": k, "error": " | ".join(tail)}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| algorithm | K | cohort | round ms (median) | round ms (best) | vs first K "
          "| client state MB | peak RSS MB | (K, ...) copies |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {}
    for row in rows:
        if "error" in row:
            print(f"| {row['algorithm']} | {row['num_clients']} | failed: {row['error']} |")
            continue
        first = base.setdefault(row["algorithm"], row["round_s"])
        print(f"| {row['algorithm']} | {row['num_clients']} | {row['cohort']} "
              f"| {1e3 * row['round_s']:.1f} | {1e3 * row['round_s_best']:.1f} "
              f"| {row['round_s'] / first:.2f}x "
              f"| {row['client_state_mb']:.0f} | {row['peak_rss_mb']:.0f} "
              f"| {row['full_state_copies']} |")


if __name__ == "__main__":
    main()
