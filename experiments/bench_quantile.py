"""Times FedOBP's per-client quantile mask: top-k path versus a full sort.

The scores mimic K clients of the FedAvg CNN on 28x28x1 inputs (582,026
elements in 8 leaves). Each configuration is jitted, run once to compile, then
timed; the best of ``--repeats`` runs is printed as one JSON line.

    python experiments/bench_quantile.py                 # K=100, q=0.9999
    python experiments/bench_quantile.py --sweep --clients 10   # switch point
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import jax

from fedjax_sim.kernels import obp

# Leaf shapes of the CNN (conv 5x5 -> 32, conv 5x5 -> 64, fc 512, head 10).
CNN_SHAPES = {
    "conv1": {"kernel": (5, 5, 1, 32), "bias": (32,)},
    "conv2": {"kernel": (5, 5, 32, 64), "bias": (64,)},
    "fc1": {"kernel": (1024, 512), "bias": (512,)},
    "head": {"kernel": (512, 10), "bias": (10,)},
}
SWEEP_QS = (0.9999, 0.999, 0.99, 0.95, 0.9, 0.8, 0.6, 0.5, 0.4, 0.3)


def make_scores(key: jax.Array, clients: int) -> dict:
    """Random positive scores shaped like K clients' CNN parameters.

    Args:
      key: PRNG key.
      clients: K.

    Returns:
      Nested dict of float32 leaves (K, ...).
    """
    shapes = jax.tree.leaves(CNN_SHAPES, is_leaf=lambda s: isinstance(s, tuple))
    keys = iter(jax.random.split(key, len(shapes)))
    return jax.tree.map(
        lambda s: jax.random.exponential(next(keys), (clients, *s)),
        CNN_SHAPES,
        is_leaf=lambda s: isinstance(s, tuple),
    )


def best_time(fn, arg, repeats: int) -> float:
    """Best wall time of ``fn(arg)`` over ``repeats`` runs after one warm-up.

    Args:
      fn: jitted function.
      arg: its argument.
      repeats: timed runs.

    Returns:
      Seconds.
    """
    jax.block_until_ready(fn(arg))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - start)
    return min(times)


def compare(scores: dict, q: float, repeats: int) -> dict:
    """Times both methods of :func:`obp.quantile_mask` and checks they agree.

    Args:
      scores: pytree of (K, ...) scores.
      q: quantile.
      repeats: timed runs per method.

    Returns:
      A JSON-ready record.
    """
    leaves = jax.tree.leaves(scores)
    k = leaves[0].shape[0]
    n = sum(math.prod(x.shape[1:]) for x in leaves)
    m = n - math.floor(q * (n - 1))
    fns = {
        meth: jax.jit(functools.partial(obp.quantile_mask, q=q, method=meth))
        for meth in ("top_k", "sort")
    }
    counts = {
        meth: jax.device_get(obp.personalized_fraction(fn(scores)) * n).round().tolist()
        for meth, fn in fns.items()
    }
    if counts["top_k"] != counts["sort"]:
        raise AssertionError(f"methods disagree at q={q}: {counts}")
    secs = {meth: best_time(fn, scores, repeats) for meth, fn in fns.items()}
    return {
        "clients": k,
        "elements": n,
        "q": q,
        "m": m,
        "m_over_n": round(m / n, 6),
        "top_k_s": round(secs["top_k"], 4),
        "sort_s": round(secs["sort"], 4),
        "sort_over_top_k": round(secs["sort"] / secs["top_k"], 2),
        "auto_picks": "top_k" if m <= obp.TOP_K_MAX_FRACTION * n else "sort",
        "personalized_per_client": counts["top_k"][0],
        "backend": jax.default_backend(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--q", type=float, default=0.9999)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="time every q in SWEEP_QS")
    args = parser.parse_args()
    scores = make_scores(jax.random.key(0), args.clients)
    for q in SWEEP_QS if args.sweep else (args.q,):
        print(json.dumps(compare(scores, q, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
