"""Tests of fedjax_sim.data: sources, partitioners, splits, partition files, padding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedjax_sim import data as fd
from fedjax_sim.data import (
    build_federated,
    load_partition,
    load_source,
    make_federated_data,
    partition_indices,
    save_partition,
    train_test_split,
)


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


def _rng(seed=0):
    return np.random.default_rng(seed)


def _assert_disjoint(parts):
    merged = np.concatenate(parts)
    assert len(np.unique(merged)) == len(merged)
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no repeats


def _max_class_share(parts, labels):
    return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])


# ---- sources ---------------------------------------------------------------------------


def test_digits_source(digits):
    assert digits.x.shape == (1797, 8, 8, 1)
    assert digits.x.dtype == np.float32 and digits.y.dtype == np.int32
    assert 0.0 <= digits.x.min() and digits.x.max() <= 1.0
    assert digits.num_classes == 10 and digits.groups is None


def test_mnist1d_shape_and_global_rng_untouched():
    np.random.seed(123)  # noqa: NPY002
    expected = np.random.random()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    pooled = load_source("mnist1d", num_samples=200)
    assert np.random.random() == expected  # noqa: NPY002
    assert pooled.x.shape == (200, 40, 1) and pooled.x.dtype == np.float32
    assert pooled.y.dtype == np.int32 and set(np.unique(pooled.y)) == set(range(10))
    again = load_source("mnist1d", num_samples=200)
    np.testing.assert_array_equal(pooled.x, again.x)


def test_synthetic_shape_and_groups():
    pooled = load_source("synthetic", num_clients=5, alpha=0.5, beta=0.5)
    assert pooled.x.shape == (len(pooled.y), 60) and pooled.x.dtype == np.float32
    assert pooled.y.dtype == np.int32 and pooled.y.max() < 10
    counts = np.bincount(pooled.groups)
    assert len(counts) == 5 and counts.min() >= 50
    # Ordered client by client.
    assert np.all(np.diff(pooled.groups) >= 0)
    iid = load_source("synthetic", num_clients=5, iid=True, alpha=0.0, beta=0.0, dim=20)
    assert iid.x.shape[1] == 20
    np.testing.assert_array_equal(
        pooled.y, load_source("synthetic", num_clients=5, alpha=0.5, beta=0.5).y
    )


def test_source_errors():
    with pytest.raises(ValueError, match="digits, mnist1d, synthetic"):
        load_source("imagenet")
    with pytest.raises(ValueError, match="unknown option"):
        load_source("digits", num_samples=5)


def test_tfds_sources_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        mnist = load_source("mnist", data_dir="/nonexistent")
        emnist = load_source("emnist")
        coarse = load_source("cifar100", label_key="coarse_label")
        data, _, pooled = make_federated_data(
            "cifar10", partition="iid", num_clients=2, min_samples=2, test_ratio=0.5
        )
    # Images stay uint8 (a quarter of float32); the padded layout reads them as x / 255.
    assert mnist.x.shape == (12, 28, 28, 1) and mnist.x.dtype == np.uint8
    assert mnist.y.dtype == np.int32 and mnist.num_classes == 10
    # The mock yields the same examples for train and test: train comes first, then test.
    np.testing.assert_array_equal(mnist.x[:6], mnist.x[6:])
    assert emnist.name == "emnist/balanced" and emnist.num_classes == 47
    assert coarse.num_classes == 20 and coarse.y.max() < 20
    assert pooled.x.shape == (12, 32, 32, 3)
    assert data.input_shape == (32, 32, 3) and data.num_clients == 2
    assert data.train_x.dtype == np.float32 and 0.0 <= data.train_x.min()
    assert data.train_x.max() <= 1.0
    assert int(data.train_counts.sum() + data.test_counts.sum()) == 12


def test_tfds_missing_data_names_data_dir(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_source("mnist", data_dir=str(tmp_path))


# ---- partitions ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_every_sample_assigned_once(digits, scheme):
    parts = partition_indices(digits.y, 10, scheme, rng=_rng(), alpha=0.5)
    assert len(parts) == 10
    _assert_disjoint(parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1797))


def test_dirichlet_respects_min_samples(digits):
    for seed in range(3):
        parts = partition_indices(
            digits.y, 20, "dirichlet", rng=_rng(seed), alpha=0.1, min_samples=25
        )
        assert min(len(p) for p in parts) >= 25


def test_dirichlet_gives_up_with_clear_error(digits):
    with pytest.raises(ValueError, match="raise alpha"):
        partition_indices(digits.y, 80, "dirichlet", rng=_rng(), alpha=0.01, min_samples=20)


def test_label_skew_grows_as_alpha_falls(digits):
    shares = [
        _max_class_share(
            partition_indices(digits.y, 10, "dirichlet", rng=_rng(1), alpha=a), digits.y
        )
        for a in (0.05, 1.0, 100.0)
    ]
    assert shares[0] > shares[1] > shares[2]
    assert shares[0] > 0.6 and shares[2] < 0.2


def test_shards_label_count():
    # Class sizes that are multiples of the shard size: every shard holds one label.
    labels = np.repeat(np.arange(10), 100)
    parts = partition_indices(labels, 10, "shards", rng=_rng(), shards_per_client=2)
    for p in parts:
        assert len(p) == 100 and len(np.unique(labels[p])) <= 2
    _assert_disjoint(parts)


def test_shards_on_digits_at_most_two_labels_per_shard(digits):
    parts = partition_indices(digits.y, 10, "shards", rng=_rng(), shards_per_client=2)
    assert all(len(np.unique(digits.y[p])) <= 4 for p in parts)


def test_classes_partition(digits):
    parts = partition_indices(digits.y, 10, "classes", rng=_rng(), classes_per_client=3)
    _assert_disjoint(parts)
    assert all(len(np.unique(digits.y[p])) <= 3 for p in parts)
    # K * classes >= labels: every label is drawn, so every sample is used.
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1797))
    # Too few slots for all labels: exactly the samples of the drawn labels are used.
    parts = partition_indices(digits.y, 2, "classes", rng=_rng(), classes_per_client=2)
    drawn = np.unique(digits.y[np.concatenate(parts)])
    assert len(drawn) <= 4
    np.testing.assert_array_equal(
        np.sort(np.concatenate(parts)), np.flatnonzero(np.isin(digits.y, drawn))
    )


def test_natural_partition():
    pooled = load_source("synthetic", num_clients=6)
    parts = partition_indices(pooled.y, 6, "natural", rng=_rng(), groups=pooled.groups)
    for k, p in enumerate(parts):
        np.testing.assert_array_equal(p, np.flatnonzero(pooled.groups == k))
    data, _, _ = make_federated_data("synthetic", partition="natural", num_clients=4)
    assert data.num_clients == 4
    with pytest.raises(ValueError, match="natural"):
        partition_indices(pooled.y, 7, "natural", rng=_rng(), groups=pooled.groups)


def test_train_test_split_disjoint_and_covering(digits):
    parts = partition_indices(digits.y, 10, "dirichlet", rng=_rng(), alpha=0.3)
    parts.append(np.array([5], np.int64))
    parts.append(np.array([7, 9], np.int64))
    splits = train_test_split(parts, 0.25, _rng())
    for client, (train, test) in zip(parts, splits, strict=True):
        assert len(np.intersect1d(train, test)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), client)
        if len(client) >= 2:
            assert len(train) >= 1 and len(test) >= 1
    assert len(splits[-2][0]) == 1 and len(splits[-2][1]) == 0
    assert len(splits[-1][0]) == 1 and len(splits[-1][1]) == 1


# ---- FederatedData ---------------------------------------------------------------------


def test_build_federated_pads_with_zeros(digits):
    splits = [(np.array([0, 1, 2]), np.array([3])), (np.array([4]), np.array([5, 6]))]
    data = build_federated(digits, splits)
    assert data.train_x.shape == (2, 3, 8, 8, 1) and data.test_x.shape == (2, 2, 8, 8, 1)
    assert data.train_x.dtype == np.float32 and data.train_y.dtype == np.int32
    assert data.train_counts.dtype == np.int32
    np.testing.assert_array_equal(data.train_counts, [3, 1])
    np.testing.assert_array_equal(data.test_counts, [1, 2])
    np.testing.assert_array_equal(data.train_x[0], digits.x[:3])
    np.testing.assert_array_equal(data.test_y[1], digits.y[5:7])
    assert not data.train_x[1, 1:].any() and not data.test_x[0, 1:].any()
    empty = build_federated(digits, [(np.array([0]), np.array([], np.int64))])
    assert empty.test_x.shape == (1, 1, 8, 8, 1) and empty.test_counts[0] == 0


def test_make_federated_data_defaults_and_determinism():
    a, splits_a, pooled = make_federated_data(seed=3)
    b, splits_b, _ = make_federated_data(seed=3)
    c, _, _ = make_federated_data(seed=4)
    assert a.num_clients == 20 and a.name == "digits" and a.num_classes == 10
    total = int(a.train_counts.sum() + a.test_counts.sum())
    assert total == pooled.num_samples
    for leaf_a, leaf_b in zip(
        (a.train_x, a.train_y, a.train_counts, a.test_x, a.test_y, a.test_counts),
        (b.train_x, b.train_y, b.train_counts, b.test_x, b.test_y, b.test_counts),
        strict=True,
    ):
        np.testing.assert_array_equal(leaf_a, leaf_b)
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(splits_a, splits_b, strict=True))
    assert not np.array_equal(a.train_counts, c.train_counts)


def test_partition_file_round_trip(tmp_path):
    path = tmp_path / "part" / "digits.json"
    first, splits, _ = make_federated_data(
        partition="shards", num_clients=8, seed=5, save_partition=path
    )
    meta = json.loads(path.read_text())
    assert meta["partition"] == "shards" and meta["num_samples"] == 1797
    second, loaded, _ = make_federated_data(partition_file=path, seed=99)
    for (tr_a, te_a), (tr_b, te_b) in zip(splits, loaded, strict=True):
        np.testing.assert_array_equal(tr_a, tr_b)
        np.testing.assert_array_equal(te_a, te_b)
    for name in ("train_x", "train_y", "train_counts", "test_x", "test_y", "test_counts"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    with pytest.raises(ValueError, match="dataset='digits'"):
        make_federated_data("mnist1d", partition_file=path, source_options={"num_samples": 100})


@pytest.mark.parametrize(
    ("clients", "match"),
    [
        ([{"train": [0, 1], "test": [10]}], "outside"),
        ([{"train": [0, 1], "test": [2]}, {"train": [2], "test": [3]}], "both client 0"),
        ([{"train": [0, 0], "test": [1]}], "twice"),
        ([{"train": [0, 1.5], "test": [2]}], "list of integers"),
        ([{"train": [0]}], "'train' and 'test'"),
    ],
)
def test_load_partition_rejects_bad_files(tmp_path, clients, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"clients": clients}))
    with pytest.raises(ValueError, match=match) as info:
        load_partition(path, 10)
    assert "bad.json" in str(info.value)


def test_save_load_partition_direct(tmp_path):
    splits = [(np.array([0, 2]), np.array([1])), (np.array([3]), np.array([4], np.int64))]
    save_partition(tmp_path / "p.json", splits, note="x")
    loaded = load_partition(tmp_path / "p.json", 5)
    assert [(t.tolist(), s.tolist()) for t, s in loaded] == [([0, 2], [1]), ([3], [4])]
    # A client without a test set cannot be evaluated: refused (tests/test_data_checks.py).
    save_partition(tmp_path / "empty.json", [(np.array([3]), np.array([], np.int64))])
    with pytest.raises(ValueError, match="client 0 has an empty test set"):
        load_partition(tmp_path / "empty.json", 4)
    assert fd.load_partition_meta(tmp_path / "p.json") == {"note": "x"}
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_partition(tmp_path / "broken.json", 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; valid names: digits"),
        ({"partition": "zipf"}, "unknown partition 'zipf'; valid names: iid, dirichlet"),
        ({"alpha": -1}, "alpha must be > 0, got -1"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"num_clients": 0}, "num_clients must be a positive integer"),
        ({"num_clients": 2.5}, "num_clients must be a positive integer"),
        ({"num_clients": True}, "num_clients must be a positive integer"),
        ({"min_samples": 1}, "min_samples must be an integer >= 2"),
        ({"shards_per_client": 0}, "shards_per_client must be a positive integer"),
        ({"classes_per_client": -2}, "classes_per_client must be a positive integer"),
        ({"test_ratio": 1.0}, r"test_ratio must be in \(0, 1\)"),
        ({"test_ratio": 0}, r"test_ratio must be in \(0, 1\)"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"partition_file": "/nonexistent/p.json"}, "partition_file"),
        ({"source_options": {"bogus": 1}}, "unknown option"),
        ({"source_options": 3}, "source_options must be a dict"),
        (
            {"num_clients": 500},
            r"num_clients=500 needs at least 500\*min_samples=5000 samples but digits has 1797",
        ),
        ({"partition": "classes", "classes_per_client": 11}, "classes_per_client must be <="),
        ({"partition": "shards", "num_clients": 100, "shards_per_client": 20}, "shards"),
        ({"partition": "natural"}, "natural"),
        ({"dataset": "synthetic", "num_clients": 5000}, "num_clients=5000 needs"),
    ],
)
def test_make_federated_data_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_federated_data(**kwargs)


def test_validation_happens_before_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(fd, "load_source", fail)
    for kwargs in ({"alpha": 0}, {"num_clients": 500}, {"dataset": "mnist", "num_clients": 8000}):
        with pytest.raises(ValueError):
            make_federated_data(**kwargs)
