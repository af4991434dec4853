"""The ragged layout (pooled examples, per-client offsets) gives exactly what the padded
layout gives: the same arrays to every client function, so the same floats everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim import algorithms
from fedjax_sim.core.evaluate import score
from fedjax_sim.core.local import weighted_cross_entropy
from fedjax_sim.data import make_federated_data
from fedjax_sim.data.federated import (
    RaggedFederatedData,
    build_federated,
    build_ragged,
    check_federated_data,
    choose_layout,
    client_examples,
    host_inputs,
    ragged_from_clients,
    scored_counts,
    to_padded,
)
from fedjax_sim.data.public import make_federated_data_with_public
from fedjax_sim.models import make_model

TWO_DEVICES = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
FIELDS = ("train_x", "train_y", "train_counts", "test_x", "test_y", "test_counts")


def test_ragged_holds_the_padded_layouts_rows():
    padded, splits, pooled = make_federated_data("digits", num_clients=7, layout="padded")
    ragged = build_ragged(pooled, splits)
    assert isinstance(ragged, RaggedFederatedData)
    back = to_padded(ragged)
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(back, field), getattr(padded, field))
    # Memory: the examples themselves plus one width of zero rows per split.
    total = sum(len(tr) for tr, _ in splits)
    assert ragged.train_x.shape[0] == total + ragged.train_width
    assert ragged.train_width == padded.train_x.shape[1]


def test_inputs_keep_their_dtype_and_are_decoded_in_the_step():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8) for n in (3, 5)]
    labels = [rng.integers(0, 3, n).astype(np.int32) for n in (3, 5)]
    data = ragged_from_clients(list(zip(images, labels, strict=True)),
                               list(zip(images, labels, strict=True)), num_classes=3)
    assert data.train_x.dtype == np.uint8
    x, y, n = client_examples(data, "train", jnp.asarray([1]))
    assert x.dtype == jnp.float32 and int(n[0]) == 5
    np.testing.assert_array_equal(np.asarray(x[0]), host_inputs(images[1]))
    np.testing.assert_array_equal(np.asarray(y[0]), labels[1])
    tokens = [rng.integers(0, 9, (n, 6)).astype(np.int64) for n in (2, 4)]
    text = ragged_from_clients([(t, t) for t in tokens], [(t, t) for t in tokens],
                               num_classes=9)
    assert text.train_x.dtype == np.int32 and text.label_shape == (6,)
    x, _, _ = client_examples(text, "train")
    assert x.dtype == jnp.int32 and x.shape == (2, 4, 6)


def _run(name: str, layout: str, strategy: str):
    extra = {}
    if algorithms.uses_public(name):
        data, public, _, _ = make_federated_data_with_public(
            "digits", public_fraction=0.2, num_clients=6, layout=layout)
        extra = {"public": public, "public_batch": 64}
    else:
        data, _, _ = make_federated_data("digits", num_clients=6, layout=layout)
    model = make_model("mlp", data.input_shape, data.num_classes)
    algorithm = algorithms.make(name, model, local_epochs=1, join_ratio=0.5,
                                client_strategy=strategy, **extra)
    state = jax.jit(algorithm.init)(jax.random.key(0), data)
    step = jax.jit(algorithm.round)
    for _ in range(2):
        state, metrics = step(state, data)
    return state, metrics, jax.jit(algorithm.evaluate)(state, data)


def _equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# One algorithm of each kind: global model, head split, element-wise masks, personal
# state, groups of architectures (FedMD), distillation, fine-tuned evaluation, IncFL's
# thresholds at init.
@pytest.mark.parametrize("name,strategy", [
    ("fedavg", "sequential"), ("fedavg", "vmap"), ("fedper", "chunked"), ("fedobp", "vmap"),
    ("ditto", "sequential"), ("fedmd", "sequential"), ("dsfl", "sequential"),
    ("fedavg_ft", "sequential"), ("incfl", "sequential")])
def test_ragged_equals_padded_bit_for_bit(name, strategy):
    _equal(_run(name, "ragged", strategy), _run(name, "padded", strategy))


def test_commands_give_the_same_records_in_both_layouts_on_two_devices(tmp_path):
    """A sweep over seeds (each seed its own split: stacked ragged pools) and an
    asynchronous clocked run, through the command line on two CPU devices."""
    script = f"""
import sys
from fedjax_sim.cli import main
import jax
assert len(jax.devices()) == 2
out = {str(tmp_path)!r}
for layout in ("ragged", "padded"):
    main(["sweep", "--algorithms", "fedper", "--seeds", "0,1", "--rounds", "2",
          "--eval-every", "2", "--num-clients", "6", "--local-epochs", "1",
          "--output", out + "/sweep_" + layout, "--no-progress", "--data-layout", layout])
    main(["run", "--algorithm", "fedavg", "--system", "lognormal", "--condition", "fedbuff",
          "--buffer-size", "2", "--rounds", "3", "--eval-every", "3", "--num-clients", "6",
          "--local-epochs", "1", "--output", out + "/clock_" + layout, "--no-progress",
          "--data-layout", layout])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=TWO_DEVICES, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def numbers(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if "wall" not in k and "time_s" not in k}
                for r in rows]

    assert numbers(tmp_path / "sweep_ragged" / "results.jsonl") == numbers(
        tmp_path / "sweep_padded" / "results.jsonl")
    assert numbers(tmp_path / "clock_ragged" / "metrics.jsonl") == numbers(
        tmp_path / "clock_padded" / "metrics.jsonl")


def test_token_labels_skip_pad_in_loss_and_score():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    labels = jnp.asarray([[1, 2, -1, -1], [0, 4, 3, -1], [2, 2, 2, 2]], jnp.int32)
    weights = jnp.asarray([1.0, 1.0, 0.0])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    tokens = (labels >= 0) & (weights[:, None] > 0)
    expected = float(jnp.sum(jnp.where(tokens, nll, 0.0)) / 5)
    np.testing.assert_allclose(float(weighted_cross_entropy(logits, labels, weights)),
                               expected, rtol=1e-6)
    correct, loss = score(logits, labels, jnp.asarray(2))
    hits = (np.argmax(np.asarray(logits), -1) == np.asarray(labels)) & np.asarray(tokens)
    assert int(correct) == int(hits.sum())
    np.testing.assert_allclose(float(loss), expected * 5, rtol=1e-6)
    data = ragged_from_clients([(np.zeros((3, 4), np.int32), np.asarray(labels))],
                               [(np.zeros((3, 4), np.int32), np.asarray(labels))],
                               num_classes=5)
    assert scored_counts(data).tolist() == [9]
    assert scored_counts(to_padded(data)).tolist() == [9]


def test_auto_layout_pads_small_sets_and_pools_skewed_large_ones():
    data, _, _ = make_federated_data("digits")
    assert data.layout == "padded"
    sizes = np.r_[np.full(999, 20), 40_000]
    assert choose_layout(sizes, sizes // 4, 4 * 784) == "ragged"
    assert choose_layout(sizes, sizes // 4, 4 * 784, "padded") == "padded"
    with pytest.raises(ValueError, match="data_layout must be one of"):
        make_federated_data("digits", layout="sparse")


def test_malformed_ragged_data_is_refused_with_the_array_named():
    _, splits, pooled = make_federated_data("digits", num_clients=4, layout="padded")
    data = build_ragged(pooled, splits)
    check_federated_data(data)
    with pytest.raises(ValueError, match="train rows of client 3 lie outside the pool"):
        check_federated_data(data.replace(
            train_offsets=np.asarray(data.train_offsets).copy() + np.array([0, 0, 0, 10**6])))
    with pytest.raises(ValueError, match="client 1 has no test examples"):
        check_federated_data(data.replace(test_counts=np.array([3, 0, 4, 5], np.int32)))
    bad_labels = np.asarray(data.test_y).copy()
    bad_labels[0] = 11
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        check_federated_data(data.replace(test_y=bad_labels))
    assert build_federated(pooled, splits).layout == "padded"


def test_uint8_images_give_the_same_rounds_in_both_layouts():
    """Stored as uint8 in the ragged layout and decoded in the step; decoded on the host in
    the padded one: the same floats, so the same rounds."""
    from fedjax_sim.data.sources import Pooled

    rng = np.random.default_rng(5)
    pooled = Pooled(x=rng.integers(0, 256, (120, 8, 8, 1), dtype=np.uint8),
                    y=rng.integers(0, 3, 120).astype(np.int32), num_classes=3, name="u8")
    order = rng.permutation(120)
    splits = [(order[i:i + 20][:15], order[i:i + 20][15:]) for i in range(0, 120, 20)]
    padded, ragged = build_federated(pooled, splits), build_ragged(pooled, splits)
    assert padded.train_x.dtype == np.float32 and ragged.train_x.dtype == np.uint8
    model = make_model("cnn", (8, 8, 1), 3, padding="SAME")
    results = []
    for data in (padded, ragged):
        algorithm = algorithms.make("fedavg", model, local_epochs=1)
        state = jax.jit(algorithm.init)(jax.random.key(1), data)
        state, _ = jax.jit(algorithm.round)(state, data)
        results.append((state.server, jax.jit(algorithm.evaluate)(state, data)))
    _equal(*results)


def test_large_cohorts_are_uniform_distinct_subsets_drawn_without_a_shuffle():
    from itertools import combinations

    from fedjax_sim.core.cohort import SHUFFLE_MAX_CLIENTS, floyd_sample, sample_cohort

    num_clients, size, draws = 7, 3, 35_000
    keys = jax.random.split(jax.random.key(2), draws)
    picked = np.asarray(jax.jit(jax.vmap(lambda k: floyd_sample(k, num_clients, size)))(keys))
    assert all(len(set(row)) == size for row in picked)
    assert picked.min() >= 0 and picked.max() < num_clients
    # Every one of the 35 subsets about 1,000 times (binomial sd ~31), every client in
    # every position about equally often.
    subsets = {s: 0 for s in combinations(range(num_clients), size)}
    for row in picked:
        subsets[tuple(sorted(row))] += 1
    assert min(subsets.values()) > 860 and max(subsets.values()) < 1140
    first = np.bincount(picked[:, 0], minlength=num_clients) / draws
    np.testing.assert_allclose(first, 1 / num_clients, atol=0.01)
    # Small K keeps the draw of earlier runs; large K takes Floyd's.
    key = jax.random.key(9)
    np.testing.assert_array_equal(sample_cohort(key, 100, 10),
                                  jax.random.choice(key, 100, (10,), replace=False))
    big = SHUFFLE_MAX_CLIENTS + 1
    np.testing.assert_array_equal(sample_cohort(key, big, 10), floyd_sample(key, big, 10))
