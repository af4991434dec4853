"""Your own data: ``npz:PATH`` files and ``data.register_source``, and what they refuse."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_sim import data as fdata
from fedjax_sim.data import make_federated_data
from fedjax_sim.spec import ExperimentSpec, check_spec


def arrays(n=120, classes=3, clients=None, seed=0):
    rng = np.random.default_rng(seed)
    out = {"x": rng.normal(size=(n, 5)).astype(np.float32),
           "y": rng.integers(0, classes, n)}
    if clients is not None:
        out["client"] = np.repeat(np.asarray(clients), n // len(clients))
    return out


def save(tmp_path, name="own.npz", **values):
    path = tmp_path / name
    np.savez(path, **values)
    return f"npz:{path}"


def test_npz_source_loads_the_file_and_partitions_it(tmp_path):
    values = arrays()
    source = save(tmp_path, **values)
    assert source in fdata.SOURCES and "npz:PATH" in list(fdata.SOURCES)
    pooled = fdata.load_source(source)
    np.testing.assert_array_equal(pooled.x, values["x"])
    np.testing.assert_array_equal(pooled.y, values["y"])
    assert pooled.num_classes == 3 and pooled.groups is None
    data, splits, _ = make_federated_data(source, partition="iid", num_clients=4,
                                          min_samples=5, seed=1)
    assert data.num_clients == 4 and data.input_shape == (5,) and data.num_classes == 3
    used = np.sort(np.concatenate([np.concatenate(s) for s in splits]))
    np.testing.assert_array_equal(used, np.arange(120))
    # Dirichlet too, and the spec (what the command line checks) accepts the name.
    make_federated_data(source, partition="dirichlet", num_clients=3, alpha=1.0)
    check_spec(ExperimentSpec(dataset=source, num_clients=3))


def test_npz_client_ids_give_the_natural_partition(tmp_path):
    values = arrays(n=60, clients=["carol", "alice", "bob"])
    values["num_classes"] = np.int64(5)
    source = save(tmp_path, **values)
    data, splits, pooled = make_federated_data(source, partition="natural", min_samples=4)
    assert data.num_clients == 3 and data.num_classes == 5  # every id; num_classes kept
    names = list(pooled.group_ids)
    assert names == ["alice", "bob", "carol"]
    for k, (train, test) in enumerate(splits):
        rows = np.concatenate([train, test])
        assert set(values["client"][rows]) == {names[k]} and len(rows) == 20
    # Too few examples for one client.
    values["client"] = np.array(["a"] * 58 + ["b"] * 2)
    with pytest.raises(ValueError, match=r"fewer than min_samples=10 examples, client id "
                                         r"\(examples\): b \(2\)"):
        make_federated_data(save(tmp_path, "small.npz", **values), partition="natural")


@pytest.mark.parametrize(("change", "message"), [
    ({"y": np.arange(120) % 3 - 1}, r"labels must be in \[0, 2\).*y\[0\] = -1"),
    ({"y": np.full(120, 3), "num_classes": np.int64(3)}, r"labels must be in \[0, 3\)"),
    ({"y": (np.arange(120) % 3).astype(np.float32)}, "y must hold integer class labels"),
    ({"y": np.zeros((120, 1), int)}, r"y must be one label per example, shape \(N,\)"),
    ({"x": np.zeros((100, 5))}, "x has 100 examples but y has 120 labels"),
    ({"client": np.zeros(7, int)}, r"client must hold one client id per example, shape "
                                   r"\(120,\)"),
    ({"client": np.zeros(120)}, "client ids must be integers or strings"),
    ({"x": np.full((120, 5), np.nan)}, "x must be finite"),
    ({"x": np.zeros(120)}, r"x must be real numbers of shape \(N, features...\)"),
    ({"lables": np.zeros(120, int)}, "unknown array.*lables"),
])
def test_npz_source_refuses_bad_arrays(tmp_path, change, message):
    values = {**arrays(), **change}
    with pytest.raises(ValueError, match=message):
        fdata.load_source(save(tmp_path, **values))


def test_npz_source_refuses_missing_arrays_and_files(tmp_path):
    values = arrays()
    del values["y"]
    with pytest.raises(ValueError, match=r"has no array 'y' \(it holds: x\)"):
        fdata.load_source(save(tmp_path, **values))
    with pytest.raises(FileNotFoundError, match="no file"):
        fdata.load_source(f"npz:{tmp_path / 'nothing.npz'}")
    with pytest.raises(FileNotFoundError, match="no file"):
        check_spec(ExperimentSpec(dataset=f"npz:{tmp_path / 'nothing.npz'}"))
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match=r"cannot read it as an \.npz file"):
        fdata.load_source(f"npz:{tmp_path / 'text.npz'}")
    # A source without client ids has no natural partition.
    with pytest.raises(ValueError, match="needs a data set with natural client ids"):
        make_federated_data(save(tmp_path, **arrays()), partition="natural")


def test_registered_source_works_like_a_built_in_one():
    calls = []

    def loader(n=90):
        calls.append(n)
        return arrays(n=n, classes=4, clients=[3, 1, 2])

    fdata.register_source("toy_source", loader, options=("n",))
    try:
        assert "toy_source" in fdata.SOURCES and "toy_source" in list(fdata.SOURCES)
        data, _, pooled = make_federated_data("toy_source", partition="natural",
                                              min_samples=5, source_options={"n": 60})
        assert calls == [60] and data.num_clients == 3 and list(pooled.group_ids) == [1, 2, 3]
        check_spec(ExperimentSpec(dataset="toy_source", num_clients=3))
        with pytest.raises(ValueError, match=r"unknown option.*size.*allowed: n"):
            make_federated_data("toy_source", source_options={"size": 3})
        with pytest.raises(ValueError, match="registered already"):
            fdata.register_source("toy_source", loader)
        fdata.register_source("toy_source", lambda: {"x": np.zeros((4, 2))}, replace=True)
        with pytest.raises(ValueError, match=r"toy_source \(registered source\) has no "
                                             "array 'y'"):
            fdata.load_source("toy_source")
    finally:
        fdata.unregister_source("toy_source")
    assert "toy_source" not in fdata.SOURCES
    for name, loader_, message in [("digits", loader, "built-in data source"),
                                   ("npz", loader, "built-in data source"),
                                   ("my-data", loader, "must be a Python identifier"),
                                   ("mine", 3, "must be callable")]:
        with pytest.raises(ValueError, match=message):
            fdata.register_source(name, loader_)
