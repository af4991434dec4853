"""Bad data is refused with one clear ValueError before anything compiles: partition files,
drawn partitions, user-built FederatedData, models that do not fit the data; and the
per-client statistics leave clients without test data out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_federated

from fedjax_sim import algorithms
from fedjax_sim import data as fd
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.core.evaluate import federation_incentives, summarize
from fedjax_sim.data import (
    FederatedData,
    check_federated_data,
    check_splits,
    load_partition,
    make_federated_data,
    partition_indices,
    train_test_split,
)
from fedjax_sim.data.public import as_public, make_federated_data_with_public
from fedjax_sim.data.sources import Pooled
from fedjax_sim.models import make_model
from fedjax_sim.runner import run, sweep

# Four valid clients of digits (1,797 samples).
GOOD = [{"train": [4 * k, 4 * k + 1, 4 * k + 2], "test": [4 * k + 3]} for k in range(4)]


def _write(tmp_path, clients, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"dataset": "digits", "clients": clients}))
    return path


def _with(k, **parts):
    clients = [dict(c) for c in GOOD]
    clients[k].update(parts)
    return clients


# ---- partition files ---------------------------------------------------------------------

BAD_FILES = [
    (_with(1, train=[], test=[]), r"p\.json: client 1 has no samples at all"),
    (_with(2, train=[]), r"p\.json: client 2 has an empty train set"),
    (_with(0, test=[]), r"p\.json: client 0 has an empty test set"),
    (GOOD[:3], r"p\.json holds 3 clients but num_clients=4"),
    (_with(3, test=[1797]), r"p\.json: client 3 test index 1797 is outside \[0, 1797\)"),
    (_with(3, train=[-1, 5]), r"client 3 train index -1 is outside"),
    (_with(1, train=[4, 5, 5]), r"client 1 lists index 5 twice"),
    (_with(1, test=[0]), r"index 0 belongs to both client 0 and client 1"),
    (_with(2, train="8,9"), r"client 2 train must be a list of integers"),
    ([*GOOD[:3], [1, 2]], r"client 3 needs 'train' and 'test' lists"),
    ([], r"p\.json lists no clients"),
]


@pytest.mark.parametrize(("clients", "match"), BAD_FILES)
def test_bad_partition_file(tmp_path, clients, match):
    path = _write(tmp_path, clients)
    with pytest.raises(ValueError, match=match) as info:
        make_federated_data(partition_file=path, num_clients=4)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("text", "match"), [
    ("{", r"p\.json is not valid JSON: Expecting"),
    ('{"clients": 3}', r"p\.json has no 'clients' list"),
    ("[1, 2]", r"p\.json has no 'clients' list"),
])
def test_malformed_partition_file(tmp_path, text, match):
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        make_federated_data(partition_file=tmp_path / "p.json", num_clients=4)
    assert "\n" not in str(info.value)


def test_partition_file_client_count(tmp_path):
    path = _write(tmp_path, GOOD)
    # Unset num_clients takes the file's count; an equal one is accepted.
    for kwargs in ({}, {"num_clients": 4}):
        data, splits, _ = make_federated_data(partition_file=path, **kwargs)
        assert data.num_clients == 4 and len(splits) == 4
    with pytest.raises(ValueError, match="holds 4 clients but num_clients=20"):
        make_federated_data(partition_file=path, num_clients=20)
    with pytest.raises(ValueError, match="holds 4 clients but num_clients=3"):
        load_partition(path, 1797, num_clients=3)


def test_bad_partition_file_with_public_data(tmp_path):
    # Client 0 has no test set; the check runs before the held-out indices are compared.
    path = _write(tmp_path, _with(0, test=[]))
    with pytest.raises(ValueError, match=r"p\.json: client 0 has an empty test set"):
        make_federated_data_with_public(public_fraction=0.2, partition_file=path)
    with pytest.raises(ValueError, match=r"q\.json holds 4 clients but num_clients=6"):
        make_federated_data_with_public(public_fraction=0.2, num_clients=6,
                                        partition_file=_write(tmp_path, GOOD, "q.json"))


# ---- drawn partitions --------------------------------------------------------------------


def test_check_splits_names_clients_and_what_to_change():
    labels = np.arange(12) % 3
    # Clients of one sample keep it for training: no test set.
    parts = partition_indices(labels, 12, "iid", rng=np.random.default_rng(0), min_samples=1)
    splits = train_test_split(parts, 0.25, np.random.default_rng(0))
    hints = fd.split_hints(num_clients=12, min_samples=1, test_ratio=0.25)
    with pytest.raises(ValueError, match=r"the 'iid' partition: clients 0, 1, 2, 3, 4, 5, 6, "
                       r"7, 8, 9 and 2 more have an empty test set .*raise test_ratio "
                       r"\(now 0.25\) or min_samples \(now 1\), or lower num_clients"):
        check_splits(splits, source="the 'iid' partition", hints=hints)
    with pytest.raises(ValueError, match=r"client 1 has no samples at all.*lower num_clients"):
        check_splits([(np.arange(3), np.arange(3, 4)), (np.zeros(0), np.zeros(0))],
                     source="x", hints=hints)
    check_splits([(np.arange(3), np.arange(3, 4))], source="x", num_clients=1)


def test_drawn_partition_with_an_empty_test_set_is_refused(monkeypatch):
    # The partitioners' min_samples >= 2 rule prevents this; the check behind it must hold
    # whatever a partitioner returns.
    def tiny_last_client(labels, num_clients, scheme, **_):
        parts = np.array_split(np.arange(len(labels) - 1), num_clients)
        parts[-1] = np.array([len(labels) - 1])
        return parts

    monkeypatch.setattr(fd, "partition_indices", tiny_last_client)
    with pytest.raises(ValueError, match=r"the 'iid' partition: client 3 has an empty test "
                       r"set.*raise test_ratio \(now 0.25\) or min_samples \(now 10\), or "
                       r"lower num_clients \(now 4\)"):
        make_federated_data(partition="iid", num_clients=4)


# ---- labels from a source ----------------------------------------------------------------


def test_source_labels_outside_num_classes(monkeypatch):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200).astype(np.int32)
    y[17] = 12
    pooled = Pooled(x=rng.random((200, 6), dtype=np.float32), y=y, num_classes=10, name="toy")
    monkeypatch.setattr(fd, "load_source", lambda *a, **k: pooled)
    with pytest.raises(ValueError, match=r"data 'toy': (train|test)_y of client \d+ holds "
                       r"label\(s\) \[12\] outside \[0, 10\) \(num_classes=10\)"):
        make_federated_data("mnist1d", partition="iid", num_clients=4)


# ---- check_federated_data ----------------------------------------------------------------


def _bad(**changes):
    return random_federated(num_clients=5).replace(**changes)


def _nan_x():
    d = random_federated(num_clients=5)
    x = np.array(d.test_x)
    x[3, 0, 1] = np.nan
    return d.replace(test_x=x)


def _label(split, k, value):
    d = random_federated(num_clients=5)
    y = np.array(getattr(d, f"{split}_y"))
    y[k, 0] = value
    return d.replace(**{f"{split}_y": y})


def _counts(split, k, value):
    d = random_federated(num_clients=5)
    counts = np.array(getattr(d, f"{split}_counts"))
    counts[k] = value
    return d.replace(**{f"{split}_counts": counts})


BAD_DATA = [
    (lambda: "data", "data must be a FederatedData or RaggedFederatedData, got str"),
    (lambda: _bad(num_classes=1), "num_classes must be an integer >= 2, got 1"),
    (lambda: _bad(train_counts=np.ones(4, np.int32)),
     r"train_counts has shape \(4,\), expected \(5,\)"),
    (lambda: _bad(test_y=np.zeros((4, 9), np.int32)),
     r"test_y has shape \(4, 9\), expected \(5, 9\)"),
    (lambda: _bad(test_x=np.zeros((5, 9, 3), np.float32)),
     r"test_x has shape \(5, 9, 3\), expected \(5, 9, 6\)"),
    (lambda: _bad(train_x=np.zeros((5,), np.float32)), r"train_x must have shape \(K, N_max"),
    (lambda: _counts("train", 2, 24), r"train_counts must lie in \[0, 23\].*client 2 has \[24\]"),
    (lambda: _counts("test", 4, -1), r"test_counts must lie in \[0, 9\].*client 4 has \[-1\]"),
    (lambda: _counts("train", 1, 0), "client 1 has no train examples"),
    (lambda: _counts("test", 3, 0), "client 3 has no test examples"),
    (lambda: _label("train", 2, 4), r"train_y of client 2 holds label\(s\) \[4\] outside "
                                    r"\[0, 4\) \(num_classes=4\)"),
    (lambda: _label("test", 0, -1), r"test_y of client 0 holds label\(s\) \[-1\] outside"),
    (lambda: _bad(train_y=np.zeros((5, 23), np.float32)), "train_y must hold integers"),
    (_nan_x, "test_x of client 3 holds NaN or infinite values"),
]


@pytest.mark.parametrize(("make", "match"), BAD_DATA)
def test_check_federated_data(make, match):
    with pytest.raises(ValueError, match=match) as info:
        check_federated_data(make())
    assert "\n" not in str(info.value)


def test_check_federated_data_accepts_good_data_and_ignores_padding():
    data = random_federated(num_clients=5)
    assert check_federated_data(data) is data
    # A label out of range in a padding row is not a label.
    y = np.array(data.test_y)
    k = int(np.argmin(data.test_counts))
    y[k, int(data.test_counts[k]):] = 99
    check_federated_data(data.replace(test_y=y))
    check_federated_data(FederatedData(*(np.asarray(a) for a in (
        data.train_x, data.train_y, data.train_counts, data.test_x, data.test_y,
        data.test_counts)), num_classes=4))


# ---- runner: data and model checks before compiling ---------------------------------------


def _never_compiled(name="probe", models=()):
    def fail(*_):
        raise AssertionError("the run got past its checks")

    return Algorithm(name, fail, fail, fail, lambda d: (0, 0), {}, None, models)


def test_run_and_sweep_refuse_bad_data_before_compiling():
    bad = _counts("test", 3, 0)
    with pytest.raises(ValueError, match="client 3 has no test examples"):
        run(_never_compiled(), bad, rounds=1, progress=False)
    model = make_model("mlp", (6,), 4, hidden=(4,))
    with pytest.raises(ValueError, match=r"train_y of client 2 holds label\(s\) \[4\]"):
        sweep("fedavg", model, _label("train", 2, 4), seeds=[0], rounds=1, progress=False)


def test_model_with_fewer_outputs_than_classes():
    data = random_federated(num_clients=4, num_classes=26)
    small = make_model("mlp", (6,), 10, hidden=(4,))
    message = r"model mlp has 10 outputs but the data has labels 0..25 \(num_classes=26\)"
    with pytest.raises(ValueError, match=message):
        algorithms.check_model_fits(small, data)
    with pytest.raises(ValueError, match=message):
        run(_never_compiled(models=(small,)), data, rounds=1, progress=False)
    # The model recorded by algorithms.make is what run checks.
    alg = algorithms.make("fedavg", small, local_epochs=1)
    assert alg.models == (small,)
    with pytest.raises(ValueError, match=message):
        run(alg._replace(init=_never_compiled().init), data, rounds=1, progress=False)
    with pytest.raises(ValueError, match=message):
        sweep("fedavg", small, data, seeds=[0], rounds=1, progress=False)
    # More outputs than classes are allowed.
    algorithms.check_model_fits(make_model("mlp", (6,), 30, hidden=(4,)), data)


def test_model_with_another_input_shape_and_heterogeneous_tuples():
    data = random_federated(num_clients=4)
    good = make_model("mlp", (6,), 4, hidden=(4,))
    wide = make_model("mlp", (7,), 4, hidden=(4,))
    with pytest.raises(ValueError, match=r"model mlp takes input shape \(7,\) but the data's "
                       r"is \(6,\)"):
        algorithms.check_model_fits(wide, data)
    with pytest.raises(ValueError, match=r"model mlp \(architecture 1\) has 3 outputs"):
        algorithms.check_model_fits((good, make_model("mlp", (6,), 3)), data)
    algorithms.check_model_fits((good, make_model("mlp", (6,), 4, hidden=(8, 8))), data)
    # FedMD / FCCL record every architecture; run refuses them all before compiling.
    few = [make_model("mlp", (6,), 3, hidden=h) for h in ((4,), (8,))]
    rng = np.random.default_rng(0)
    public = as_public(rng.normal(size=(16, 6)), rng.integers(0, 3, 16))
    alg = algorithms.make("fedmd", few, public=public, public_batch=8, distill_batch_size=4)
    assert alg.models == tuple(few)
    with pytest.raises(ValueError, match=r"model mlp \(architecture 0\) has 3 outputs but the "
                       r"data has labels 0..3 \(num_classes=4\)"):
        run(alg._replace(init=_never_compiled().init), data, rounds=1, progress=False)


# ---- statistics --------------------------------------------------------------------------


def test_summarize_leaves_out_clients_without_test_data():
    stats = summarize(np.array([3, 0, 2, 1]), np.array([4, 0, 2, 4]))
    assert stats["accuracy"] == pytest.approx(6 / 10)
    assert stats["client_mean_accuracy"] == pytest.approx((0.75 + 1.0 + 0.25) / 3)
    assert stats["client_min"] == pytest.approx(0.25)  # not 0: client 1 has no test data
    assert stats["client_std"] == pytest.approx(np.std([0.75, 1.0, 0.25]))
    assert stats["client_p10"] == pytest.approx(np.percentile([0.75, 1.0, 0.25], 10))
    accuracies = stats["client_accuracies"]
    assert len(accuracies) == 4 and np.isnan(accuracies[1])
    assert accuracies[0] == 0.75 and accuracies[3] == 0.25
    none = summarize(np.zeros(2), np.zeros(2))
    assert np.isnan(none["accuracy"]) and np.isnan(none["client_mean_accuracy"])
    # Incentives compare the clients that have an accuracy in both runs.
    # Client 0 gains, client 2 ties (both 100%), client 3 is hurt.
    incentives = federation_incentives(accuracies, [0.5, 0.9, 1.0, 0.5])
    assert incentives == {"hurt_fraction": pytest.approx(1 / 3), "ipr": pytest.approx(2 / 3),
                          "ipr_strict": pytest.approx(1 / 3),
                          "tie_fraction": pytest.approx(1 / 3)}
    unknown = federation_incentives([np.nan], [0.5])
    assert set(unknown) == {"hurt_fraction", "ipr", "ipr_strict", "tie_fraction"}
    assert all(np.isnan(v) for v in unknown.values())


# ---- command line ------------------------------------------------------------------------


def _cli_error(capsys, tmp_path, *argv):
    from fedjax_sim.cli import main

    with pytest.raises(SystemExit) as info:
        main(["run", "--rounds", "1", "--no-progress", "--output", str(tmp_path / "out"),
              *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedjax-sim run: error: ") and "\n" not in err
    return err


def test_cli_partition_file_with_an_empty_test_set(capsys, tmp_path):
    path = _write(tmp_path, _with(2, test=[]))
    err = _cli_error(capsys, tmp_path, "--partition-file", str(path), "--num-clients", "4")
    assert err.endswith(f"partition file {path}: client 2 has an empty test set (every "
                        "client needs at least one train and one test sample)")


def test_cli_partition_file_with_another_client_count(capsys, tmp_path):
    path = _write(tmp_path, GOOD)
    err = _cli_error(capsys, tmp_path, "--partition-file", str(path), "--num-clients", "5")
    assert f"partition file {path} holds 4 clients but num_clients=5" in err


def test_cli_partition_file_out_of_range_and_malformed(capsys, tmp_path):
    path = _write(tmp_path, _with(1, train=[5000]))
    err = _cli_error(capsys, tmp_path, "--partition-file", str(path), "--num-clients", "4")
    assert "client 1 train index 5000 is outside [0, 1797)" in err
    path.write_text('{"clients": [')
    err = _cli_error(capsys, tmp_path, "--partition-file", str(path), "--num-clients", "4")
    assert f"--partition-file {path} is not valid JSON" in err


def test_cli_partition_file_with_public_data(capsys, tmp_path):
    path = _write(tmp_path, _with(0, train=[], test=[]))
    err = _cli_error(capsys, tmp_path, "--algorithm", "fedmd", "--partition-file", str(path),
                     "--num-clients", "4", "--architectures", "mlp:8,mlp:16")
    assert "client 0 has no samples at all" in err
