"""Tests of fedjax_sim.data.scale: byte counts before building, synthetic counts, the
streamed synthetic generator, and the FEMNIST / Stack Overflow stand-ins."""

from __future__ import annotations

import math
import tracemalloc

import jax
import numpy as np
import pytest

from fedjax_sim.data import make_federated_data, make_synthetic
from fedjax_sim.data import scale as sc
from fedjax_sim.data.federated import (
    build_federated,
    build_layout,
    build_ragged,
    check_ragged_data,
    ragged_from_clients,
)
from fedjax_sim.data.sources import Pooled


def _old_make_synthetic(*, alpha=1.0, beta=1.0, num_clients=30, dim=60, num_classes=10,
                        iid=False, seed=0) -> Pooled:
    """make_synthetic as it was before it streamed (lists of float64, then concatenate)."""
    rng = np.random.default_rng(seed)
    counts = rng.lognormal(4.0, 2.0, num_clients).astype(np.int64) + 50
    u = rng.normal(0.0, alpha, num_clients)
    b_mean = rng.normal(0.0, beta, num_clients)
    sigma_sqrt = np.arange(1, dim + 1, dtype=np.float64) ** -0.6
    if iid:
        w_shared = rng.normal(0.0, 1.0, (dim, num_classes))
        b_shared = rng.normal(0.0, 1.0, num_classes)
    xs, ys = [], []
    for k in range(num_clients):
        if iid:
            v, w, b = np.full(dim, b_mean[k]), w_shared, b_shared
        else:
            v = rng.normal(b_mean[k], 1.0, dim)
            w = rng.normal(u[k], 1.0, (dim, num_classes))
            b = rng.normal(u[k], 1.0, num_classes)
        x = v + rng.standard_normal((counts[k], dim)) * sigma_sqrt
        xs.append(x)
        ys.append(np.argmax(x @ w + b, axis=1))
    return Pooled(
        x=np.concatenate(xs).astype(np.float32),
        y=np.concatenate(ys).astype(np.int32),
        num_classes=int(num_classes),
        name="synthetic",
        groups=np.repeat(np.arange(num_clients, dtype=np.int64), counts),
    )


def _nbytes(data) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(data))


SYNTHETIC_SETTINGS = [
    dict(num_clients=5),
    dict(num_clients=12, seed=3, alpha=0.5, beta=0.0, dim=7, num_classes=3),
    dict(num_clients=8, seed=1, iid=True, dim=11),
    dict(num_clients=1, seed=9, alpha=0.0, beta=2.0, num_classes=2),
]


@pytest.mark.parametrize("options", SYNTHETIC_SETTINGS)
def test_streamed_make_synthetic_is_bit_identical(options):
    new, old = make_synthetic(**options), _old_make_synthetic(**options)
    for field in ("x", "y", "groups"):
        a, b = getattr(new, field), getattr(old, field)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), field
    assert (new.num_classes, new.name, new.group_ids) == (old.num_classes, old.name, None)


@pytest.mark.parametrize("options", SYNTHETIC_SETTINGS)
def test_synthetic_counts_equal_the_generator(options):
    counts = sc.synthetic_counts(**options)
    assert counts.dtype == np.int64
    groups = make_synthetic(**options).groups
    assert np.array_equal(counts, np.bincount(groups, minlength=options["num_clients"]))


def test_synthetic_counts_of_ten_thousand_clients():
    # The setting that used to build a (10000 x 43341 x 60) float32 array.
    train, est = sc.estimate_source_bytes("synthetic", {}, partition="natural",
                                          num_clients=10_000, test_ratio=0.25,
                                          layout="padded")
    assert int(train.max()) == 43_341 and est.exact and est.layout == "padded"
    assert est.data_bytes > 10_000 * 43_341 * 60 * 4 > 96 * 2**30
    _, ragged = sc.estimate_source_bytes("synthetic", {}, partition="natural",
                                         num_clients=10_000, test_ratio=0.25,
                                         layout="ragged")
    assert ragged.data_bytes < 1.1 * ragged.source_bytes < 2 * 2**30
    _, auto = sc.estimate_source_bytes("synthetic", {}, partition="natural",
                                       num_clients=10_000, test_ratio=0.25, layout="auto")
    assert auto.layout == "ragged" and auto.data_bytes == ragged.data_bytes


def test_make_synthetic_peak_memory_is_the_pool():
    options = dict(num_clients=300, seed=4)
    counts = sc.synthetic_counts(**options)
    tracemalloc.start()
    try:
        pooled = make_synthetic(**options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    pool = pooled.x.nbytes + pooled.y.nbytes + pooled.groups.nbytes
    one_client = int(counts.max()) * 60 * 8  # float64 rows of the largest client
    assert peak <= pool + 4 * one_client + 2**20, (peak, pool, one_client)
    assert peak < 2 * pool  # the former version held ~5x the pool at its peak


@pytest.mark.parametrize("layout", ["padded", "ragged"])
@pytest.mark.parametrize("case", [
    dict(dataset="digits", partition="dirichlet", num_clients=20, alpha=0.1),
    dict(dataset="digits", partition="iid", num_clients=7, test_ratio=0.3),
    dict(dataset="synthetic", partition="natural", num_clients=6,
         source_options=dict(dim=9)),
    dict(dataset="synthetic", partition="iid", num_clients=4,
         source_options=dict(num_clients=5, seed=2)),
    dict(dataset="mnist1d", partition="shards", num_clients=10,
         source_options=dict(num_samples=400)),
])
def test_data_bytes_equal_built_nbytes(case, layout):
    case = dict(case)
    case.setdefault("test_ratio", 0.25)
    data, splits, pooled = make_federated_data(**case, layout=layout, seed=1)
    assert data.layout == layout
    train = [len(tr) for tr, _ in splits]
    test = [len(te) for _, te in splits]
    dtype = np.asarray(data.train_x).dtype
    assert sc.data_bytes(train, test, data.input_shape, dtype, layout=layout) == _nbytes(data)
    auto = build_layout(pooled, splits, "auto")
    assert sc.data_bytes(train, test, data.input_shape, dtype, layout="auto") == _nbytes(auto)
    other = build_ragged if layout == "padded" else build_federated
    assert sc.data_bytes(train, test, data.input_shape, np.float32,
                         layout="ragged" if layout == "padded" else "padded") == \
        _nbytes(other(pooled, splits))
    counts, est = sc.estimate_source_bytes(
        case["dataset"], case.get("source_options"), partition=case["partition"],
        num_clients=case["num_clients"], test_ratio=case["test_ratio"], layout=layout)
    source = pooled.x.nbytes + pooled.y.nbytes
    source += 0 if pooled.groups is None else pooled.groups.nbytes
    assert est.source_bytes == source
    if case["partition"] in ("natural", "iid"):
        assert est.exact and np.array_equal(counts, train)
        assert np.array_equal(est.test_counts, test)
        assert est.data_bytes == _nbytes(data)
    else:
        assert counts is None and not est.exact
        assert est.data_bytes >= _nbytes(data)  # an upper bound


def test_estimate_unknown_sources_and_auto():
    assert sc.estimate_source_bytes("mnist", {}, partition="iid", num_clients=10,
                                    test_ratio=0.25, layout="ragged") is None
    counts, est = sc.estimate_source_bytes("digits", None, partition="iid", num_clients=10,
                                           test_ratio=0.25, layout="auto")
    assert est.layout == "padded" and counts.sum() + est.test_counts.sum() == 1797
    with pytest.raises(ValueError, match="data_layout"):
        sc.data_bytes([1], [1], (2,), np.float32, layout="dense")


def test_data_bytes_of_token_sequences_and_uint8():
    rng = np.random.default_rng(0)
    train_n, test_n = [3, 1, 7], [1, 2, 1]

    def clients(ns, shape, dtype):
        return [(rng.integers(0, 200, (n, *shape)).astype(dtype),
                 rng.integers(-1, 50, (n, 5)).astype(np.int32)) for n in ns]

    for shape, dtype in (((5,), np.int32), ((4, 4, 1), np.uint8)):
        data = ragged_from_clients(clients(train_n, shape, dtype), clients(test_n, shape, dtype),
                                   num_classes=50)
        assert data.train_x.dtype == dtype
        assert sc.data_bytes(train_n, test_n, shape, dtype, (5,), layout="ragged") == \
            _nbytes(data)
        row = math.prod(shape) * np.dtype(dtype).itemsize + 5 * 4
        padded = sum(3 * width * row + 3 * 4 for width in (7, 2))  # K=3, widths 7 and 2
        assert sc.data_bytes(train_n, test_n, shape, dtype, (5,), layout="padded") == padded


@pytest.mark.parametrize("name", ["femnist", "stackoverflow"])
def test_stand_in_shapes_and_layout(name):
    spec = sc.STAND_INS[name]
    data = sc.stand_in(name, num_clients=40, seed=3, max_examples=300)
    check_ragged_data(data)
    assert data.num_clients == 40 and data.layout == "ragged"
    assert data.input_shape == spec.input_shape and data.label_shape == spec.label_shape
    assert data.train_x.dtype == spec.input_dtype and data.train_y.dtype == np.int32
    assert data.num_classes == spec.num_classes
    train, test = sc.stand_in_counts(name, 40, 3, max_examples=300)
    assert np.array_equal(data.train_counts, train) and np.array_equal(data.test_counts, test)
    assert (test >= 1).all() and (train >= 1).all()
    assert (train + test <= 300).all() if spec.sizes == "total" else (train <= 300).all()
    # Laid out exactly as ragged_from_clients lays out the same clients.
    parts = {}
    for split in ("train", "test"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        offsets, counts = (np.asarray(getattr(data, f"{split}_{p}"))
                           for p in ("offsets", "counts"))
        parts[split] = [(x[o:o + n], y[o:o + n]) for o, n in zip(offsets, counts, strict=True)]
        width = data.width(split)
        assert not x[-width:].any() and not y[-width:].any()  # the zero tail
    again = ragged_from_clients(parts["train"], parts["test"], num_classes=data.num_classes,
                                name=data.name)
    for a, b in zip(jax.tree.leaves(data), jax.tree.leaves(again), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert (data.train_width, data.test_width) == (again.train_width, again.test_width)
    assert sc.stand_in_bytes(name, num_clients=40, seed=3, max_examples=300) == _nbytes(data)
    # Same seed, same data.
    same = sc.stand_in(name, num_clients=40, seed=3, max_examples=300)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(data),
                                                    jax.tree.leaves(same), strict=True))


def test_stand_in_labels_depend_on_inputs():
    femnist = sc.stand_in("femnist", num_clients=30, seed=0)
    x = femnist.train_x.reshape(len(femnist.train_x), -1).astype(np.float32)
    y = np.asarray(femnist.train_y)
    n = int(np.asarray(femnist.train_counts).sum())
    protos = np.stack([x[:n][y[:n] == c].mean(0) for c in range(62) if (y[:n] == c).any()])
    classes = [c for c in range(62) if (y[:n] == c).any()]
    distance = (protos**2).sum(1)[None, :] - 2 * x[:n] @ protos.T  # + |x|^2, the same
    nearest = np.asarray(classes)[np.argmin(distance, 1)]
    assert (nearest == y[:n]).mean() > 0.9
    so = sc.stand_in("stackoverflow", num_clients=20, seed=0, max_examples=200)
    x, y = np.asarray(so.train_x), np.asarray(so.train_y)
    n = int(np.asarray(so.train_counts).sum())
    assert (x[:n, 0] == sc.SO_BOS).all()
    assert np.array_equal(y[:n, :-1][y[:n, :-1] >= 0], x[:n, 1:][y[:n, :-1] >= 0])
    assert (y[:n] < so.num_classes).all() and (y[:n] == -1).any()


def test_stand_in_size_distributions():
    femnist = sc.STAND_INS["femnist"]
    assert femnist.mean == pytest.approx(226.83) and femnist.std == pytest.approx(88.94)
    train, test = sc.stand_in_counts("femnist", 3550, seed=0)
    sizes = train + test
    assert sizes.mean() == pytest.approx(226.83, rel=0.03)
    assert sizes.std() == pytest.approx(88.94, rel=0.1)
    assert np.array_equal(test, np.clip((sizes * 0.1).astype(np.int64), 1, sizes - 1))

    so = sc.STAND_INS["stackoverflow"]
    assert so.mean == pytest.approx(135_818_730 / 342_477)
    train, test = sc.stand_in_counts("stackoverflow", 5000, seed=1)
    assert np.median(train) == pytest.approx(math.exp(so.mu), rel=0.05)
    assert np.log(train).mean() == pytest.approx(so.mu, abs=0.05)
    assert np.log(train).std() == pytest.approx(so.sigma, rel=0.05)
    assert train.mean() == pytest.approx(so.mean, rel=0.1)
    assert (test == np.maximum((train * 0.1).astype(np.int64), 1)).all()
    capped, _ = sc.stand_in_counts("stackoverflow", 5000, seed=1, max_examples=1000)
    assert capped.max() == 1000 and np.array_equal(capped, np.minimum(train, 1000))
    # The first K clients of a larger draw.
    more, _ = sc.stand_in_counts("stackoverflow", 8000, seed=1)
    assert np.array_equal(more[:5000], train)
    with pytest.raises(ValueError, match="unknown stand-in"):
        sc.stand_in_counts("cifar", 10)
    with pytest.raises(ValueError, match="max_examples"):
        sc.stand_in("femnist", num_clients=3, max_examples=1)


def test_stand_in_memory_is_the_pool():
    tracemalloc.start()
    try:
        data = sc.stand_in("femnist", num_clients=1500, seed=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    examples = int(np.asarray(data.train_counts).sum() + np.asarray(data.test_counts).sum())
    own = examples * (28 * 28 + 4)  # the pooled examples themselves
    assert _nbytes(data) <= 1.1 * own
    assert peak <= 1.1 * own, (peak, own)
