"""Per-client validation rows (``--val-fraction``, ``--eval-split``): carved from each
client's training rows after the train/test split, disjoint from everything else, drawn
once per partition seed, kept in partition files, and never trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedjax_sim.cli import main
from fedjax_sim.data import (
    VAL_META,
    load_partition,
    make_federated_data,
    save_partition,
    split_validation,
)
from fedjax_sim.data.federated import client_examples
from fedjax_sim.data.public import make_federated_data_with_public
from fedjax_sim.spec import ExperimentSpec, build_data, check_spec

FIELDS = ("train_x", "train_y", "train_counts", "test_x", "test_y", "test_counts")
SETTING = dict(num_clients=6, alpha=0.5, seed=3)


def _rows(data, split):
    """Per client, the (x, y) rows of ``split`` (either layout), padding dropped."""
    x, y, n = (np.asarray(a) for a in client_examples(data, split))
    return [(x[k, :n[k]], y[k, :n[k]]) for k in range(len(n))]


def _assert_same_data(a, b):
    assert type(a) is type(b)
    for field in FIELDS:
        np.testing.assert_array_equal(np.asarray(getattr(a, field)),
                                      np.asarray(getattr(b, field)), err_msg=field)


def _expected_val(n_train, fraction):
    return min(max(int(n_train * fraction), 1), n_train - 1) if n_train >= 2 else 0


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.001, 0.95])
def test_rows_are_disjoint_counted_and_carved_from_train(fraction):
    _, splits, pooled = make_federated_data("digits", **SETTING)
    triples = split_validation(splits, fraction, seed=3)
    seen = []
    for (train0, test0), (train, val, test) in zip(splits, triples, strict=True):
        np.testing.assert_array_equal(test, test0)  # the test rows never move
        np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), train0)
        assert len(val) == _expected_val(len(train0), fraction)
        assert len(train) >= 1 and len(val) >= 1
        assert not set(val) & set(train) and not set(val) & set(test)
        seen.append(np.concatenate([train, val, test]))
    every = np.concatenate(seen)
    assert len(np.unique(every)) == len(every)  # no row is shared between clients
    assert every.max() < pooled.num_samples


def test_clipping_keeps_a_training_row_and_gives_one_validation_row():
    splits = [(np.arange(1), np.array([100])), (np.arange(10, 12), np.array([101])),
              (np.arange(20, 30), np.array([102])), (np.arange(40, 45), np.array([103]))]
    got = [len(val) for _, val, _ in split_validation(splits, 0.05, seed=0)]
    assert got == [0, 1, 1, 1]  # one row stays for training; 0.05 * 10 floors to 0 -> 1
    got = [len(train) for train, _, _ in split_validation(splits, 0.99, seed=0)]
    assert got == [1, 1, 1, 1]  # the last training row is never taken
    got = [len(val) for _, val, _ in split_validation(splits, 0.5, seed=0)]
    assert got == [0, 1, 5, 2]  # floor(n * 0.5)


def test_rows_are_drawn_once_per_partition_seed():
    _, splits, _ = make_federated_data("digits", **SETTING)
    a = split_validation(splits, 0.2, seed=3)
    b = split_validation(splits, 0.2, seed=3)
    c = split_validation(splits, 0.2, seed=4)
    for (_, va, _), (_, vb, _) in zip(a, b, strict=True):
        np.testing.assert_array_equal(va, vb)
    assert any(not np.array_equal(va, vc) for (_, va, _), (_, vc, _) in zip(a, c, strict=True))
    # Through the whole pipeline: equal settings, equal rows; the run's seed takes the
    # partition seed's place only when partition_seed is unset.
    d1, _, _ = make_federated_data("digits", val_fraction=0.2, eval_split="val", **SETTING)
    d2, _, _ = make_federated_data("digits", val_fraction=0.2, eval_split="val", **SETTING)
    _assert_same_data(d1, d2)
    spec = ExperimentSpec(num_clients=6, alpha=0.5, val_fraction=0.2, eval_split="val",
                          partition_seed=3)
    built = [build_data(check_spec(spec.replace(seed=s)))[0] for s in (0, 1)]
    _assert_same_data(built[0], built[1])
    _assert_same_data(built[0], d1)


@pytest.mark.parametrize("layout", ["padded", "ragged"])
def test_val_fraction_zero_is_todays_data_bit_for_bit(layout):
    old, old_splits, _ = make_federated_data("digits", layout=layout, **SETTING)
    new, new_splits, _ = make_federated_data("digits", layout=layout, val_fraction=0.0,
                                             eval_split="test", **SETTING)
    _assert_same_data(old, new)
    for (a, b), (c, d) in zip(old_splits, new_splits, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


@pytest.mark.parametrize("layout", ["padded", "ragged"])
def test_eval_split_puts_validation_or_test_rows_in_the_test_slot(layout):
    base, splits, pooled = make_federated_data("digits", layout="padded", **SETTING)
    triples = split_validation(splits, 0.2, seed=SETTING["seed"])
    on_val, val_splits, _ = make_federated_data("digits", layout=layout, val_fraction=0.2,
                                                eval_split="val", **SETTING)
    on_test, test_splits, _ = make_federated_data("digits", layout=layout, val_fraction=0.2,
                                                  **SETTING)
    assert on_val.layout == on_test.layout == layout
    val_rows, test_rows = _rows(on_val, "test"), _rows(on_test, "test")
    train_val, train_test = _rows(on_val, "train"), _rows(on_test, "train")
    base_test = _rows(base, "test")
    for k, (train, val, _) in enumerate(triples):
        np.testing.assert_array_equal(val_splits[k][1], val)
        np.testing.assert_array_equal(val_rows[k][1], pooled.y[val])
        np.testing.assert_allclose(val_rows[k][0], pooled.x[val])
        # Evaluated on the test rows: exactly today's test rows.
        np.testing.assert_array_equal(test_rows[k][0], base_test[k][0])
        np.testing.assert_array_equal(test_rows[k][1], base_test[k][1])
        # Either way the validation rows are out of training.
        for split_list, rows in ((val_splits, train_val), (test_splits, train_test)):
            np.testing.assert_array_equal(split_list[k][0], train)
            np.testing.assert_array_equal(rows[k][1], pooled.y[train])


def test_partition_files_keep_the_rows(tmp_path):
    path = tmp_path / "p.json"
    data, _, _ = make_federated_data("digits", val_fraction=0.2, save_partition=path,
                                     eval_split="val", **SETTING)
    doc = json.loads(path.read_text())
    assert doc[VAL_META] == 0.2
    assert all("val" in client for client in doc["clients"])
    _, splits, pooled = make_federated_data("digits", **SETTING)
    triples = split_validation(splits, 0.2, seed=SETTING["seed"])
    read = load_partition(path, pooled.num_samples, with_val=True)
    for got, want in zip(read, triples, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    pairs = load_partition(path, pooled.num_samples)  # train leaves the val rows out
    assert [len(tr) for tr, _ in pairs] == [len(tr) for tr, _, _ in triples]
    again, _, _ = make_federated_data("digits", partition_file=path, val_fraction=0.2,
                                      eval_split="val")
    _assert_same_data(data, again)
    # Without validation rows, a file is written as it always was.
    plain = tmp_path / "plain.json"
    make_federated_data("digits", save_partition=plain, **SETTING)
    assert VAL_META not in plain.read_text() and '"val"' not in plain.read_text()
    assert not any(len(v) for _, v, _ in load_partition(plain, pooled.num_samples,
                                                        with_val=True))


def test_partition_file_rule(tmp_path):
    path = tmp_path / "p.json"
    make_federated_data("digits", val_fraction=0.2, save_partition=path, **SETTING)
    with pytest.raises(ValueError, match=r"holds validation rows.*give val_fraction 0\.2"):
        make_federated_data("digits", partition_file=path)
    with pytest.raises(ValueError, match=r"carved with val_fraction 0\.2, not 0\.3"):
        make_federated_data("digits", partition_file=path, val_fraction=0.3)
    with pytest.raises(ValueError, match=r"--val-fraction 0\.2, not 0\.3"):
        check_spec(ExperimentSpec(partition_file=str(path), val_fraction=0.3),
                   label=lambda name: "--" + name.replace("_", "-"))
    # A file without validation rows: carved from its training rows with its own seed, the
    # same for every run of the file.
    plain = tmp_path / "plain.json"
    _, splits, _ = make_federated_data("digits", save_partition=plain, **SETTING)
    _, got, _ = make_federated_data("digits", partition_file=plain, seed=9,
                                   val_fraction=0.2, eval_split="val")
    want = split_validation(splits, 0.2, seed=SETTING["seed"])
    for (_, val), (_, v, _) in zip(got, want, strict=True):
        np.testing.assert_array_equal(val, v)


@pytest.mark.parametrize("client, message", [
    ({"train": [0, 1], "val": [1], "test": [2]}, "lists index 1 twice"),
    ({"train": [0, 1], "val": [2], "test": [2]}, "lists index 2 twice"),
    ({"train": [0, 1], "val": [3.5], "test": [2]}, "val must be a list of integers"),
    ({"train": [0, 1], "val": [9999], "test": [2]}, "val index 9999 is outside"),
])
def test_malformed_validation_rows_are_refused(tmp_path, client, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"clients": [client]}))
    with pytest.raises(ValueError, match=message):
        load_partition(path, 100, with_val=True)


def test_validation_rows_of_two_clients_must_not_overlap(tmp_path):
    path = tmp_path / "bad.json"
    save_partition(path, [([0, 1], [5], [2]), ([3, 4], [5], [6])])
    with pytest.raises(ValueError, match="index 5 belongs to both client 0 and client 1"):
        load_partition(path, 10)


@pytest.mark.parametrize("kwargs, message", [
    ({"val_fraction": 1.0}, "val_fraction must be in \\[0, 1\\), got 1.0"),
    ({"val_fraction": -0.1}, "val_fraction must be in \\[0, 1\\)"),
    ({"val_fraction": float("nan")}, "val_fraction must be a finite number in \\[0, 1\\)"),
    ({"eval_split": "val"}, "eval_split val evaluates .* val_fraction > 0"),
    ({"val_fraction": 0.1, "eval_split": "train"}, "eval_split"),
])
def test_bad_options_are_refused_before_loading(kwargs, message, monkeypatch):
    def no_loading(*args, **kw):
        raise AssertionError("loaded the data set before refusing the options")

    monkeypatch.setattr("fedjax_sim.data.load_source", no_loading)
    with pytest.raises(ValueError, match=message):
        make_federated_data("digits", **kwargs)
    with pytest.raises(ValueError, match=message):
        check_spec(ExperimentSpec(**kwargs))


def test_a_client_without_validation_rows_cannot_be_evaluated_on_them(tmp_path):
    path = tmp_path / "p.json"
    save_partition(path, [([0], [1]), ([2, 3, 4], [5])])  # client 0: one training row
    with pytest.raises(ValueError, match="client 0 has none"):
        make_federated_data("digits", partition_file=path, val_fraction=0.5,
                            eval_split="val")
    _, got, _ = make_federated_data("digits", partition_file=path, val_fraction=0.5)
    assert [len(tr) for tr, _ in got] == [1, 2]  # one row stays; the other gives one


def test_public_data_path_takes_the_same_rows():
    kw = dict(public_fraction=0.2, num_clients=5, alpha=0.5, seed=2, layout="padded")
    data, _, splits, _ = make_federated_data_with_public("digits", client_val_fraction=0.2,
                                                         eval_split="val", **kw)
    _, _, plain, _ = make_federated_data_with_public("digits", **kw)
    triples = split_validation(plain, 0.2, seed=2)
    for (train, val), (t, v, _) in zip(splits, triples, strict=True):
        np.testing.assert_array_equal(train, t)
        np.testing.assert_array_equal(val, v)
    assert int(np.sum(data.test_counts)) == sum(len(v) for _, v, _ in triples)


def test_identity_and_config_hash():
    base = check_spec(ExperimentSpec())
    assert "val_fraction" not in base.identity() and "eval_split" not in base.identity()
    val = check_spec(ExperimentSpec(val_fraction=0.1))
    on_val = check_spec(ExperimentSpec(val_fraction=0.1, eval_split="val"))
    hashes = {base.config_hash(), val.config_hash(), on_val.config_hash(),
              check_spec(ExperimentSpec(val_fraction=0.2)).config_hash()}
    assert len(hashes) == 4
    assert on_val.identity()["eval_split"] == "val"
    assert check_spec(ExperimentSpec(val_fraction=0)).config_hash() == base.config_hash()


def test_natural_data_sets_hold_out_validation_rows(tmp_path):
    # LEAF's FEMNIST files: each client's validation rows come out of its training file's
    # examples (split_validation on their positions), the test file stays as it is.
    from natural_fixtures import write_leaf

    from fedjax_sim.data.natural import load_natural
    from fedjax_sim.data.partition import split_validation

    write_leaf(tmp_path, "femnist", scale=3)
    plain, _, _ = load_natural("leaf:femnist", tmp_path)
    held, _, _ = load_natural("leaf:femnist", tmp_path, val_fraction=0.25, seed=7)
    on_val, _, _ = load_natural("leaf:femnist", tmp_path, val_fraction=0.25,
                                eval_split="val", seed=7)

    def rows(data, split, k):
        x, y, n = (np.asarray(a) for a in client_examples(data, split))
        return x[k, :n[k]], y[k, :n[k]]

    counts = np.asarray(plain.train_counts)
    triples = split_validation([(np.arange(n), np.arange(1)) for n in counts], 0.25, 7)
    for k, (keep, val, _) in enumerate(triples):
        x, y = rows(plain, "train", k)
        assert len(val) >= 1 and len(keep) + len(val) == len(y)
        np.testing.assert_array_equal(rows(held, "train", k)[0], x[keep])
        np.testing.assert_array_equal(rows(held, "test", k)[1], rows(plain, "test", k)[1])
        np.testing.assert_array_equal(rows(on_val, "test", k)[0], x[val])
        np.testing.assert_array_equal(rows(on_val, "train", k)[1], y[keep])
    # Through the spec: checked and built like a partitioned source.
    spec = check_spec(ExperimentSpec(dataset="leaf:femnist", partition="natural",
                                     data_dir=str(tmp_path), val_fraction=0.25,
                                     eval_split="val", seed=7))
    data, _ = build_data(spec)
    alone, _, _ = load_natural("leaf:femnist", tmp_path, min_samples=spec.min_samples,
                               val_fraction=0.25, eval_split="val", seed=7)
    np.testing.assert_array_equal(np.asarray(data.test_y), np.asarray(alone.test_y))
    np.testing.assert_array_equal(np.asarray(data.train_x), np.asarray(alone.train_x))


def test_run_evaluates_on_validation_rows(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--val-fraction", "0.1", "--eval-split", "val", "--rounds", "1",
                 "--num-clients", "4", "--output", str(out), "--no-progress"])
    assert code in (0, None)
    config = json.loads((out / "config.json").read_text())
    text = json.dumps(config)
    assert '"val_fraction": 0.1' in text and '"eval_split": "val"' in text


def test_cli_refuses_eval_split_val_without_val_fraction(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--eval-split", "val", "--output", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--eval-split val" in err and "--val-fraction > 0" in err
    assert len(err.strip().splitlines()) == 1
