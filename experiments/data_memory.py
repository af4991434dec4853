"""Memory of federated data: the pooled examples, the ragged layout, the padded layout.

For digits (Dirichlet 0.1, 20 clients, built by ``make_federated_data``) and the FEMNIST-
and Stack Overflow-shaped stand-ins (``fedjax_sim.data.scale.stand_in``), prints

* the pooled examples' own bytes (every client's examples once, stored dtype),
* the ragged layout's bytes, measured as the ``nbytes`` of the built object's arrays, and
  the growth of the process's peak RSS (``ru_maxrss``) while building it,
* the padded (K, N_max, ...) layout's bytes, computed by ``data_bytes`` and never
  allocated,

and their ratios. Every build runs in a fresh process so that ``ru_maxrss`` is its own.
The Stack Overflow stand-in is built at its real client count only where it fits in half
of the memory available (``MemAvailable``); otherwise with the cap of 1,000 sentences per
client of Reddi et al. (2021), and if that does not fit either, on the first clients of the
same draw that do; the figures of the full set are then computed from its counts.

    python experiments/data_memory.py                   # prints the tables
    python experiments/data_memory.py --so-clients 342477 --so-cap 0   # force a build
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import numpy as np

CHILD = r"""
import json, resource, sys
import jax
import numpy as np
from fedjax_sim.data import make_federated_data
from fedjax_sim.data import scale
import sklearn.datasets  # imported before the baseline: the digits row measures the data

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

case, clients, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) or None
before_rss = rss()
before_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if case == "digits":
    data, _, _ = make_federated_data("digits", partition="dirichlet", alpha=0.1,
                                     num_clients=clients, seed=0, layout="ragged")
else:
    data = scale.stand_in(case, num_clients=clients, max_examples=cap, seed=0)
jax.block_until_ready(data)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
train, test = (np.asarray(getattr(data, s + "_counts")) for s in ("train", "test"))
x_row = int(np.prod(data.input_shape)) * np.asarray(data.train_x).dtype.itemsize
y_row = int(np.prod(data.label_shape, dtype=np.int64)) * 4
print(json.dumps({
    "case": case, "clients": int(data.num_clients), "cap": cap,
    "examples": int(train.sum() + test.sum()),
    "own": int((train.sum() + test.sum()) * (x_row + y_row)),
    "ragged": int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(data))),
    "ragged_computed": scale.data_bytes(train, test, data.input_shape,
                                        np.asarray(data.train_x).dtype, data.label_shape,
                                        layout="ragged"),
    "padded": scale.data_bytes(train, test, data.input_shape, np.asarray(data.train_x).dtype,
                               data.label_shape, layout="padded"),
    "padded_float32": scale.data_bytes(train, test, data.input_shape, np.float32,
                                       data.label_shape, layout="padded"),
    "rss_growth": int(peak - max(before_rss, 0)),
    "peak_before": int(before_peak), "rss_before": int(before_rss),
    "dtype": str(np.asarray(data.train_x).dtype),
    "widths": [data.train_width, data.test_width],
}))
"""


def gib(n: float) -> str:
    return f"{n / 2**30:,.3f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(case: str, clients: int, cap: int | None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(clients), str(cap or 0)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{case}: child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def computed_row(name: str, cap: int | None) -> dict:
    from fedjax_sim.data import scale

    spec = scale.STAND_INS[name]
    train, test = scale.stand_in_counts(name, max_examples=cap)
    x_row = math.prod(spec.input_shape) * np.dtype(spec.input_dtype).itemsize
    y_row = 4 * math.prod(spec.label_shape)
    args = (train, test, spec.input_shape, spec.input_dtype, spec.label_shape)
    return {"case": name, "clients": len(train), "cap": cap,
            "examples": int(train.sum() + test.sum()),
            "own": int((train.sum() + test.sum()) * (x_row + y_row)),
            "ragged_computed": scale.data_bytes(*args, layout="ragged"),
            "padded": scale.data_bytes(*args, layout="padded"),
            "widths": [int(train.max()), int(test.max())]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--so-clients", type=int, default=None,
                        help="Stack Overflow clients to build (default: what fits)")
    parser.add_argument("--so-cap", type=int, default=None,
                        help="sentences per client cap when building (0: none)")
    parser.add_argument("--share", type=float, default=0.5,
                        help="share of MemAvailable a build may plan to use")
    args = parser.parse_args()

    from fedjax_sim.data import scale

    available = mem_available()
    print(f"MemAvailable at start: {gib(available)}; builds planned within "
          f"{args.share:.0%} of it\n")

    # Computed (nothing allocated): the full stand-ins and the synthetic set that used to
    # pad 10,000 clients to 43,341 rows.
    computed = [computed_row("femnist", None), computed_row("stackoverflow", None),
                computed_row("stackoverflow", scale.STACKOVERFLOW_CAP)]
    train, est = scale.estimate_source_bytes("synthetic", {}, partition="natural",
                                             num_clients=10_000, test_ratio=0.25,
                                             layout="ragged")
    test = est.test_counts
    own = int((train.sum() + test.sum()) * (60 * 4 + 4))
    computed.append({"case": "synthetic natural", "clients": 10_000, "cap": None,
                     "examples": int(train.sum() + test.sum()), "own": own,
                     "ragged_computed": est.data_bytes,
                     "padded": scale.data_bytes(train, test, (60,), "float32",
                                                layout="padded"),
                     "widths": [int(train.max()), int(test.max())]})
    print("Computed from the client counts alone (data_bytes; nothing allocated)\n")
    print("| data set | clients | cap | examples | own bytes | ragged | padded | padded / "
          "ragged | widths (train, test) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in computed:
        print(f"| {r['case']} | {r['clients']:,} | {r['cap'] or '-'} | {r['examples']:,} | "
              f"{gib(r['own'])} | {gib(r['ragged_computed'])} | {gib(r['padded'])} | "
              f"{r['padded'] / r['ragged_computed']:,.1f}x | {r['widths']} |")

    # What to build of Stack Overflow.
    budget = args.share * available
    so_clients, so_cap = args.so_clients, args.so_cap
    if so_cap == 0:
        so_cap = None
    if so_clients is None:
        so_clients = scale.STAND_INS["stackoverflow"].num_clients
        if so_cap is None and args.so_cap is None:
            if scale.stand_in_bytes("stackoverflow") > budget:
                so_cap = scale.STACKOVERFLOW_CAP
        while scale.stand_in_bytes("stackoverflow", num_clients=so_clients,
                                   max_examples=so_cap) > budget and so_clients > 1000:
            so_clients = int(so_clients * 0.8)
    builds = [("digits", 20, None), ("femnist", 3550, None),
              ("stackoverflow", so_clients, so_cap)]
    rows = []
    for case, clients, cap in builds:
        row = run_child(case, clients, cap)
        assert row["ragged"] == row["ragged_computed"], row
        rows.append(row)
        print(f"\nbuilt {case}: {json.dumps(row)}", file=sys.stderr)
    print("\nBuilt (ragged layout, stored dtype; each in a fresh process)\n")
    print("| data set | clients | cap | examples | dtype | own bytes | ragged (nbytes) | "
          "ragged / own | peak RSS growth | RSS growth / own | padded (computed) | "
          "padded / ragged |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "digits Dirichlet 0.1" if r["case"] == "digits" else f"{r['case']} stand-in"
        print(f"| {name} | {r['clients']:,} | {r['cap'] or '-'} | {r['examples']:,} | "
              f"{r['dtype']} | {gib(r['own'])} | {gib(r['ragged'])} | "
              f"{r['ragged'] / r['own']:.3f} | {gib(r['rss_growth'])} | "
              f"{r['rss_growth'] / r['own']:.3f} | {gib(r['padded'])} | "
              f"{r['padded'] / r['ragged']:,.1f}x |")
    digits = rows[0]
    print(f"\ndigits: make_federated_data stores float32 inputs in both layouts; the padded "
          f"layout would take {gib(digits['padded_float32'])}. Its peak RSS growth is mostly "
          "the loading of the source (float64 images, partition, split), not the data.")
    femnist = rows[1]
    print(f"femnist: uint8 pixels; padded as build_federated stores it (float32) it would "
          f"take {gib(femnist['padded_float32'])}.")
    so = rows[-1]
    full = scale.STAND_INS["stackoverflow"].num_clients
    if so["clients"] != full or so["cap"] is not None:
        capped = f" capped at {so['cap']:,} sentences" if so["cap"] else ""
        print(f"stackoverflow: built {so['clients']:,} of {full:,} clients{capped} (the full set "
              "does not fit the build budget on this machine); the full set's figures are "
              "computed in the first table.")


if __name__ == "__main__":
    main()
