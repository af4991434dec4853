"""Training throughput of the FedAvg CNN with XLA's convolution, im2col and Winograd.

One jitted SGD step (value_and_grad of the softmax cross-entropy, then a plain update) on a
fixed batch; prints one JSON line per implementation with steps per second, then one line
with the winograd / im2col, im2col / xla and im2col / im2col-full ratios. ``winograd`` runs
conv2 as Winograd F(2x2, 5x5) and conv1 as im2col. ``im2col-full`` builds the
full patch matrix in every layer, where ``im2col`` keeps only row patches for layers with
8 or more input channels (``fedjax_sim.models.layers._patch_rows``). Repeats are
interleaved across implementations and the best is kept, since timings on a shared machine
are noisy.

Usage:
  python experiments/bench_conv.py [--batch 32] [--shape 28 28 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sim.models.layers as layers
from fedjax_sim.models import make_model

# name -> (conv_impl, whether every layer builds the full patch matrix)
IMPLS = {
    "xla": ("xla", False),
    "im2col": ("im2col", False),
    "im2col-full": ("im2col", True),
    "winograd": ("winograd", False),
}


@contextlib.contextmanager
def full_patches(enabled: bool):
    """While tracing, makes every im2col layer build the full patch matrix."""
    saved = layers._ROW_PATCH_CHANNELS
    if enabled:
        layers._ROW_PATCH_CHANNELS = float("inf")
    try:
        yield
    finally:
        layers._ROW_PATCH_CHANNELS = saved


def make_step(model, lr: float):
    """Builds a jitted SGD step.

    Args:
      model: a :class:`~fedjax_sim.models.base.Model`.
      lr: learning rate.

    Returns:
      ``step(params, x, y) -> (params, loss)``.
    """

    def loss_fn(params, x, y):
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss

    return step


def steps_per_second(step, params, x, y, min_time: float) -> float:
    """Runs chunks of 10 steps until ``min_time`` seconds have passed.

    Args:
      step: a compiled step.
      params: initial parameters.
      x: inputs.
      y: labels.
      min_time: least seconds to measure.

    Returns:
      Steps per second.
    """
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(10):
            params, loss = step(params, x, y)
        jax.block_until_ready(loss)
        n += 10
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shape", type=int, nargs="+", default=[28, 28, 1])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    args = parser.parse_args()

    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, *shape), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, args.classes, args.batch), dtype=jnp.int32)

    runs = {}
    for impl, (conv_impl, full) in IMPLS.items():
        model = make_model("cnn", shape, args.classes, conv_impl=conv_impl)
        params = model.init(jax.random.key(0))
        step = make_step(model, lr=0.01)
        start = time.perf_counter()
        with full_patches(full):
            jax.block_until_ready(step(params, x, y))
        runs[impl] = dict(step=step, params=params, compile_s=time.perf_counter() - start)

    best = {impl: 0.0 for impl in IMPLS}
    for _ in range(args.repeats):
        for impl, run in runs.items():
            rate = steps_per_second(run["step"], run["params"], x, y, args.min_time)
            best[impl] = max(best[impl], rate)

    common = dict(
        model="cnn", batch=args.batch, input_shape=list(shape), backend=jax.default_backend()
    )
    for impl in IMPLS:
        line = dict(impl=impl, steps_per_s=round(best[impl], 2), **common)
        line["compile_s"] = round(runs[impl]["compile_s"], 2)
        print(json.dumps(line))
    print(json.dumps(dict(ratio_winograd_over_im2col=round(best["winograd"] / best["im2col"], 3),
                          ratio_im2col_over_xla=round(best["im2col"] / best["xla"], 2),
                          ratio_im2col_over_full=round(best["im2col"] / best["im2col-full"], 3),
                          **common)))


if __name__ == "__main__":
    main()
