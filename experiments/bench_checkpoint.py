"""How long checkpointing a large client state holds up the rounds: orbax sync and async
against the former gathered ``.npz``.

A synthetic ``SimState`` stands in for a large run: ``--clients`` clients of
``--per-client`` float32 values each (the defaults, 1,400 x 190,000, make 1.06 GB; FedOBP
with the FedAvg CNN keeps about 190,000 values per client, 7.6 GB at K=10,000). A jitted
"round" rewrites every client value (one read and one write of the state, buffers
donated) and the loop saves every ``--every`` rounds. For each way of saving it prints
one JSON line:

  loop_s      the loop's wall time, saves included, up to the last round's result;
  blocked_s   time spent inside the save calls, after the rounds before each save
              finished (what the next rounds wait for);
  drain_s     time after the loop until the last save is durable;
  per_save_s  a save's blocking time, each save;
  round_s     one round alone; checksum_s: the per-leaf checksums a save computes;
  restore_s   (orbax) reading the latest checkpoint back onto the devices.

``none`` is the loop without checkpoints; ``npz`` gathers every leaf to the host and
writes one ``np.savez`` file (what the runner did before); ``sync``, ``async`` and
``async_nosum`` (without the per-leaf checksums) use
``fedjax_sim.core.checkpoint.Checkpointer``; ``checkpoint_bytes`` is one checkpoint's size.

    python experiments/bench_checkpoint.py                      # ~1 GB on this machine
    python experiments/bench_checkpoint.py --clients 10000      # K=10,000, FedOBP-sized

Measured (seconds per save; the rounds were finished before each save):

  2 shared CPU cores, 1.06 GB, ``--rounds 8 --every 4 --work 8``: npz 3.0 to 3.5 blocked;
  orbax sync 5.3 to 5.6 (1.5 to 1.7 of it the checksums); orbax async 1.3 to 1.8 blocked
  (the checksums, computed before ``save`` returns) then 3.8 in the background; async
  without checksums 0.03 to 0.05 blocked. Restore 5 to 7. One checkpoint: 1.06 GB.
  One H200, 7.6 GB (K=10,000), zstd-compressed checkpoints (an earlier version): npz 10.6
  to 11.1 blocked; orbax sync 6.0 to 8.2; orbax async 0.16 blocked, then 3 to 5.3 more
  in the background while the next rounds ran; restore 4.4 to 6.5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.core import checkpoint
from fedjax_sim.core.checkpoint import Checkpointer
from fedjax_sim.core.state import SimState


def make_state(clients: int, per_client: int) -> SimState:
    """Two client leaves (3/4 and 1/4 of the values) and a small server part, filled on
    the device."""
    wide = per_client * 3 // 4

    def init():
        base = jnp.arange(clients, dtype=jnp.float32)[:, None] * 1e-3
        return SimState(
            key=jax.random.key(0), round=jnp.zeros((), jnp.int32),
            server={"w": jnp.linspace(-1.0, 1.0, per_client, dtype=jnp.float32)},
            clients={"a": base + jnp.linspace(0.0, 1.0, wide, dtype=jnp.float32),
                     "b": base - jnp.linspace(0.0, 1.0, per_client - wide,
                                              dtype=jnp.float32)})

    return jax.jit(init)()


def make_round(work: int):
    """A stand-in round: ``work`` passes of an update over every client value."""

    def one_round(state: SimState) -> SimState:
        key, _ = jax.random.split(state.key)
        clients = jax.lax.fori_loop(
            0, work, lambda _, c: jax.tree.map(lambda x: x * 0.999 + 1e-3, c), state.clients)
        return state.replace(key=key, round=state.round + 1, clients=clients)

    return jax.jit(one_round, donate_argnums=0)


def save_npz(path: Path, state: SimState) -> None:
    """The former runner checkpoint: every leaf on the host, one file, then a rename."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(
        state.replace(key=jax.random.key_data(state.key)))]
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, *leaves)
    os.replace(tmp, path)


def bench(mode: str, args, directory: Path) -> dict:
    round_step = make_round(args.work)
    state = make_state(args.clients, args.per_client)
    tic = time.perf_counter()
    state = round_step(state)  # compiles
    jax.block_until_ready(state)
    tic = time.perf_counter()
    state = round_step(state)
    jax.block_until_ready(state)
    round_s = time.perf_counter() - tic
    checksum_s = None
    orbax = mode in ("sync", "async", "async_nosum")
    if mode in ("sync", "async"):
        # The per-leaf checksums a save computes: compiled here, outside the timing.
        leaves = jax.tree.leaves(state.replace(key=jax.random.key_data(state.key)))
        jax.block_until_ready(checkpoint._checksums(leaves))
        tic = time.perf_counter()
        jax.block_until_ready(checkpoint._checksums(leaves))
        checksum_s = round(time.perf_counter() - tic, 3)
        del leaves
    ckpt = None
    if orbax:
        ckpt = Checkpointer(directory / mode, async_save=mode != "sync",
                            checksums=mode != "async_nosum")
    per_save = []
    start = time.perf_counter()
    for r in range(1, args.rounds + 1):
        state = round_step(state)
        if r % args.every == 0 and mode != "none":
            # The rounds so far finish first: what follows is the save's own blocking.
            jax.block_until_ready(state)
            tic = time.perf_counter()
            if mode == "npz":
                save_npz(directory / "checkpoint.npz", state)
            else:
                ckpt.save(r, state, {"round": r})
            per_save.append(time.perf_counter() - tic)
    jax.block_until_ready(state)
    loop = time.perf_counter() - start
    record = {"mode": mode, "round_s": round(round_s, 3), "loop_s": round(loop, 3),
              "blocked_s": round(sum(per_save), 3),
              "per_save_s": [round(t, 3) for t in per_save]}
    if checksum_s is not None:
        record["checksum_s"] = checksum_s
    if ckpt is not None:
        tic = time.perf_counter()
        ckpt.wait()
        record["drain_s"] = round(time.perf_counter() - tic, 3)
        tic = time.perf_counter()
        restored, _ = ckpt.restore(state)  # only its structure and shardings are used
        jax.block_until_ready(restored)
        record["restore_s"] = round(time.perf_counter() - tic, 3)
        record["restored_equal"] = bool(all(
            np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
                jax.tree.leaves(restored.clients), jax.tree.leaves(state.clients),
                strict=True)))
    if mode != "none":
        files = (directory.rglob("*") if ckpt is None
                 else ckpt.path(ckpt.latest_round()).rglob("*"))
        record["checkpoint_bytes"] = sum(f.stat().st_size for f in files if f.is_file())
    if ckpt is not None:
        ckpt.close()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    return record


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1400)
    parser.add_argument("--per-client", type=int, default=190_000,
                        help="float32 values per client")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--every", type=int, default=2, help="save every this many rounds")
    parser.add_argument("--work", type=int, default=1,
                        help="update passes over the client state per round (round length)")
    parser.add_argument("--modes", default="none,npz,sync,async,async_nosum")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    for name in ("clients", "per_client", "rounds", "every", "work"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    root.mkdir(parents=True, exist_ok=True)
    state_gb = args.clients * args.per_client * 4 / 1e9
    print(json.dumps({"state_gb": round(state_gb, 3), "clients": args.clients,
                      "per_client": args.per_client, "rounds": args.rounds,
                      "every": args.every, "work": args.work, "device": str(jax.devices()[0]),
                      "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                      "dir": str(root)}), flush=True)
    records = []
    try:
        for mode in args.modes.split(","):
            records.append(bench(mode, args, root / "run"))
            print(json.dumps(records[-1]), flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return records


if __name__ == "__main__":
    main()
