"""Back-to-back command-line runs on the default devices of a busy machine: runs / aborts.

Each run is ``fedjax-sim run`` with sparse evaluation (``--eval-every`` equal to
``--rounds``, and ``--compare-local``, whose Local reference follows the same schedule),
so that rounds go back to back without a host read in between, while ``--load``
processes keep every core busy. Algorithms rotate over the list given. A run counts as
an abort when it exits by a signal or prints XLA's rendezvous termination.

``--mechanism`` first runs the bare cause, outside the simulator: a program sharded over
two CPU devices whose shards meet in an all-reduce, called repeatedly with the calls
queued (no host wait) and with one call in flight (a host wait after each), each in a
fresh process; it prints which of the two aborted.

  python experiments/stress.py --runs 30
  python experiments/stress.py --mechanism --runs 0
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MECHANISM = r"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

mesh = Mesh(np.asarray(jax.devices()), ("c",), axis_types=(AxisType.Auto,))

def per_device(w, x):
    def client(xi):
        return jax.lax.scan(lambda w, xt: (jnp.tanh(w @ xt), None), w, xi)[0]
    return jax.lax.psum(jax.lax.map(client, x).sum(0), "c")

step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("c")), out_specs=P(),
                             check_vma=False), donate_argnums=0)
n = 256
w = jnp.eye(n) * 0.1
x = jax.device_put(np.random.default_rng(0).random((16, 20, n, n), np.float32),
                   NamedSharding(mesh, P("c")))
for i in range(int(sys.argv[2])):
    w = step(w, x) / n
    if sys.argv[1] == "wait":
        w.block_until_ready()
w.block_until_ready()
print("finished", flush=True)
"""


def _burn() -> None:
    while True:
        pass


def _aborted(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode < 0 or proc.returncode == 134 or "Termination timeout" in (
        proc.stderr or "")


def mechanism(calls: int, timeout: float) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    for mode in ("queue", "wait"):
        tic = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", MECHANISM, mode, str(calls)],
                                  capture_output=True, text=True, env=env, timeout=timeout)
            verdict = "aborted" if _aborted(proc) else (
                "finished" if "finished" in proc.stdout else f"exit {proc.returncode}")
        except subprocess.TimeoutExpired:
            verdict = f"no result in {timeout:.0f} s"
        print(f"mechanism, calls {'queued' if mode == 'queue' else 'one in flight'}: "
              f"{verdict} ({time.perf_counter() - tic:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--algorithms", default="fedavg,fedper,fedrep,ditto,fedobp")
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2,
                        help="busy processes beside the runs (default: one per core)")
    parser.add_argument("--mechanism", action="store_true")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()

    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.load)]
    for proc in burners:
        proc.start()
    try:
        if args.mechanism:
            mechanism(args.calls, args.timeout)
        names = [n for n in args.algorithms.split(",") if n]
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # default devices
        aborts = failures = 0
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                name = names[i % len(names)]
                command = [sys.executable, "-m", "fedjax_sim.cli", "run", "--algorithm", name,
                           "--rounds", str(args.rounds), "--eval-every", str(args.rounds),
                           "--compare-local", "--no-progress", "--seed", str(i),
                           "--output", str(Path(tmp) / f"run{i}")]
                tic = time.perf_counter()
                proc = subprocess.run(command, capture_output=True, text=True, env=env,
                                      timeout=args.timeout)
                aborted = _aborted(proc)
                aborts += aborted
                failures += proc.returncode != 0 and not aborted
                status = "abort" if aborted else ("ok" if proc.returncode == 0 else
                                                  f"exit {proc.returncode}")
                print(f"run {i + 1}/{args.runs} {name}: {status} "
                      f"({time.perf_counter() - tic:.0f} s)", flush=True)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
        if args.runs:
            print(f"{args.runs} runs on the default devices with {args.load} busy processes: "
                  f"{aborts} aborts, {failures} other failures")
    finally:
        for proc in burners:
            proc.terminate()


if __name__ == "__main__":
    main()
