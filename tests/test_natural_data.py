"""Natural federated data sets from files in LEAF's and TFF's formats (written here by
tests/natural_fixtures.py): clients, splits, the references' tokenization, options,
size bounds, errors, and runs through the command line."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from natural_fixtures import SENTENCES, SIZES, write_leaf, write_tff

from fedjax_sim.cli import main
from fedjax_sim.data.natural import (
    LEAF_LETTERS,
    TFF_CHARS,
    load_natural,
    natural_size,
    sent140_ids,
    sent140_vocab,
    sent140_words,
    shakespeare_windows,
    stackoverflow_ids,
)
from fedjax_sim.spec import ExperimentSpec, build_model


def _bytes(data):
    return sum(a.nbytes for a in (data.train_x, data.train_y, data.test_x, data.test_y))


def test_leaf_femnist_keeps_writers_their_split_and_pixels_as_uint8(tmp_path):
    write_leaf(tmp_path, "femnist")
    data, ids, info = load_natural("leaf:femnist", tmp_path)
    assert ids == sorted(SIZES) and info["clients"] == 3
    assert data.train_counts.tolist() == [SIZES[c][0] for c in ids]
    assert data.test_counts.tolist() == [SIZES[c][1] for c in ids]
    assert data.train_x.dtype == np.uint8 and data.input_shape == (28, 28, 1)
    assert data.num_classes == 62 and data.layout == "ragged"
    blob = json.loads(next((tmp_path / "femnist/data/train").glob("*_0_*")).read_text())
    first = np.asarray(blob["user_data"]["f_0001"]["x"][0], np.float32)
    row = int(data.train_offsets[0])
    np.testing.assert_array_equal(data.train_x[row].reshape(-1),
                                  np.rint(first * 255).astype(np.uint8))
    assert natural_size("leaf:femnist", tmp_path) >= _bytes(data)


def test_leaf_shakespeare_scores_the_next_character_only(tmp_path):
    write_leaf(tmp_path, "shakespeare")
    data, _, _ = load_natural("leaf:shakespeare", tmp_path)
    assert data.num_classes == len(LEAF_LETTERS) == 80 and data.input_shape == (80,)
    y = np.asarray(data.train_y[: int(data.train_counts.sum())])
    assert (y[:, :-1] == -1).all() and (y[:, -1] >= 0).all()
    assert natural_size("leaf:shakespeare", tmp_path) >= _bytes(data)


def test_sent140_tokenizes_as_leaf_by_hand():
    # LEAF's split_line: words with apostrophes, punctuation .,!?; on its own, case kept.
    assert sent140_words("I can't... Wait!? #yes") == ["I", "can't", ".", ".", ".", "Wait",
                                                       "!", "?", "yes"]
    vocab = sent140_vocab(["b a a", "c b a"], vocab_size=2)
    assert vocab == {"a": 1, "b": 2}  # most frequent first; "c" is unknown
    ids = sent140_ids("a c b", vocab)
    assert len(ids) == 25 and ids[:3] == [1, 0, 2] and ids[3:] == [0] * 22
    assert sent140_ids(" ".join(["a"] * 40), vocab) == [1] * 25  # the first 25 words


def test_leaf_sent140_reads_tweets_and_labels(tmp_path):
    write_leaf(tmp_path, "sent140")
    data, ids, _ = load_natural("leaf:sent140", tmp_path)
    assert ids == sorted(SIZES) and data.num_classes == 2 and data.input_shape == (25,)
    assert data.label_shape == () and data.train_x.dtype == np.int16
    tweets, first = [], None
    for path in sorted((tmp_path / "sent140/data/train").glob("*.json")):
        blob = json.loads(path.read_text())
        tweets += [row[4] for user in sorted(blob["user_data"])
                   for row in blob["user_data"][user]["x"]]
        first = blob["user_data"].get(ids[0], first)
    vocab = sent140_vocab(tweets)
    n = SIZES[ids[0]][0]
    assert np.asarray(data.train_x[:n]).tolist() == [sent140_ids(row[4], vocab)
                                                     for row in first["x"]]
    assert np.asarray(data.train_y[:n]).tolist() == first["y"]
    small = load_natural("leaf:sent140", tmp_path, vocab_size=2)[0]
    assert int(np.max(np.asarray(small.train_x))) == 2
    assert natural_size("leaf:sent140", tmp_path) >= _bytes(data)
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 1"):
        load_natural("leaf:sent140", tmp_path, vocab_size=0)


def test_tff_shakespeare_windows_by_hand():
    x, y = shakespeare_windows("ab")
    index = {c: i + 1 for i, c in enumerate(TFF_CHARS)}
    assert len(TFF_CHARS) == 86
    # [begin=88, a, b, end=89], padded with 0 to 81; y = the next ids, pad as -1.
    assert x.shape == (1, 80) and x[0, :4].tolist() == [88, index["a"], index["b"], 89]
    assert (x[0, 4:] == 0).all()
    assert y[0, :3].tolist() == [index["a"], index["b"], 89] and (y[0, 3:] == -1).all()
    x, _ = shakespeare_windows("~" * 100)  # 102 ids: two windows; ~ is out of vocabulary
    assert x.shape == (2, 80) and x[0, 1] == 87


def test_stackoverflow_ids_by_hand():
    vocab = {"the": 1, "cat": 2}
    x, y = stackoverflow_ids("the cat zzz", vocab, 10_000)
    assert x[:5].tolist() == [10_002, 1, 2, 10_001, 10_003] and (x[5:] == 0).all()
    assert y[:4].tolist() == [1, 2, 10_001, 10_003] and (y[4:] == -1).all()
    # 20 words or more: truncated to 20, no end token.
    x, y = stackoverflow_ids(" ".join(["cat"] * 25), vocab, 10_000)
    assert x.tolist() == [10_002] + [2] * 19 and y.tolist() == [2] * 20


def test_tff_stackoverflow_keeps_clients_in_both_files(tmp_path):
    write_tff(tmp_path, "stackoverflow")
    data, ids, info = load_natural("tff:stackoverflow", tmp_path)
    assert ids == ["u1", "u2"] and info["clients_read"] == 3  # u3 has no test sentences
    assert data.num_classes == 10_004 and data.train_x.dtype == np.int16
    assert data.train_counts.tolist() == [len(SENTENCES["u1"]), len(SENTENCES["u2"])]
    first = np.asarray(data.train_x[0])
    assert first[:8].tolist() == [10_002, 1, 2, 3, 4, 1, 5, 10_003]
    assert natural_size("tff:stackoverflow", tmp_path) >= _bytes(data)


@pytest.mark.parametrize("name", ["emnist", "cifar100"])
def test_tff_images(tmp_path, name):
    write_tff(tmp_path, name)
    data, ids, _ = load_natural(f"tff:{name}", tmp_path)
    assert ids == sorted(SIZES) and data.train_x.dtype == np.uint8
    if name == "cifar100":
        # One file: each client's last 20% (file order) is its test set.
        assert (data.train_counts + data.test_counts).tolist() == [sum(SIZES[c]) for c in ids]
        coarse, _, _ = load_natural("tff:cifar100", tmp_path, label_key="coarse_label")
        assert coarse.num_classes == 20
    assert natural_size(f"tff:{name}", tmp_path) == _bytes(data)


def test_min_samples_max_examples_and_max_clients(tmp_path):
    write_tff(tmp_path, "emnist")
    data, ids, info = load_natural("tff:emnist", tmp_path, min_samples=5)
    assert ids == ["f_0001", "f_0003"] and info["dropped_small"] == 1
    data, _, _ = load_natural("tff:emnist", tmp_path, max_examples=4)
    assert data.train_counts.tolist() == [4, 2, 4] and data.test_counts.tolist() == [2, 1, 3]
    _, ids, _ = load_natural("tff:emnist", tmp_path, max_clients=2)
    assert ids == ["f_0001", "f_0002"]


def test_missing_files_and_bad_names_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"femnist/data/train/\*\.json"):
        load_natural("leaf:femnist", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"fed_emnist_train\.h5"):
        load_natural("tff:emnist", tmp_path)
    with pytest.raises(ValueError, match="unknown natural data set"):
        load_natural("leaf:mnist", tmp_path)
    with pytest.raises(ValueError, match="unknown option"):
        load_natural("tff:emnist", tmp_path, vocab_size=3)
    with pytest.raises(ValueError, match="max_examples must be an integer >= 1"):
        load_natural("tff:emnist", tmp_path, max_examples=0)


@pytest.mark.parametrize("algorithm", ["fedper", "fedobp"])
def test_sent140_runs_from_the_command_line_with_leafs_lstm(tmp_path, algorithm):
    write_leaf(tmp_path / "data", "sent140")
    out = tmp_path / "run"
    main(["run", "--algorithm", algorithm, "--dataset", "leaf:sent140", "--data-dir",
          str(tmp_path / "data"), "--partition", "natural", "--min-samples", "2",
          "--rounds", "1", "--local-epochs", "1", "--output", str(out), "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and len(summary["client_accuracies"]) == 3
    # ``auto`` on one label per token sequence is LEAF's LSTM over the words read.
    data, _, _ = load_natural("leaf:sent140", tmp_path / "data")
    model = build_model(ExperimentSpec(dataset="leaf:sent140"), data.input_shape, 2, data)
    assert model.name == "sent_lstm"
    vocab = 1 + int(np.max(np.asarray(data.train_x)))
    assert model.init(jax.random.key(0))["embedding"]["table"].shape == (vocab, 100)


def test_command_line_runs_and_refuses_what_does_not_apply(tmp_path, capsys):
    write_leaf(tmp_path / "data", "femnist")
    out = tmp_path / "run"
    main(["run", "--algorithm", "fedper", "--dataset", "leaf:femnist", "--data-dir",
          str(tmp_path / "data"), "--partition", "natural", "--min-samples", "2",
          "--rounds", "1", "--eval-every", "1", "--local-epochs", "1", "--output", str(out),
          "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["dataset"] == "leaf:femnist"
    assert len(summary["client_accuracies"]) == 3
    for extra, words in ((["--partition", "dirichlet"], "use --partition natural"),
                         (["--partition", "natural", "--algorithm", "dsfl"], "public")):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "--dataset", "leaf:femnist", "--data-dir", str(tmp_path / "data"),
                  *extra, "--output", str(tmp_path / "x"), "--no-progress"])
        assert exit_info.value.code == 2
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--dataset", "digits", "--max-examples", "5", "--output",
              str(tmp_path / "y"), "--no-progress"])
    assert "natural data set" in capsys.readouterr().err
