"""Natural federated data sets read from the files researchers have: LEAF json, TFF h5.

Nothing is downloaded. Each data set keeps its own clients (writers, speakers, users)
and, where the files have one, its own per-client train / test split; it is returned in
the ragged layout (:class:`~fedjax_sim.data.federated.RaggedFederatedData`) with images
as uint8 and tokens as integers. Clients are ordered by sorted client id.

Files, in ``DATA_DIR`` (the ``--data-dir`` of the command line):

``leaf:femnist``, ``leaf:shakespeare``, ``leaf:sent140``, ``leaf:synthetic``
    LEAF's preprocessing output (``preprocess.sh`` of github.com/TalwalkarLab/leaf):
    ``DATA_DIR/<name>/data/train/*.json`` and ``DATA_DIR/<name>/data/test/*.json``, each
    ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y":
    [...]}}}``, LEAF's per-user split (a user must be in both).
``tff:emnist``
    ``fed_emnist_train.h5`` and ``fed_emnist_test.h5`` (62 classes; ``only_digits``:
    ``fed_emnist_digitsonly_*.h5``, 10 classes), from TFF's
    ``tff.simulation.datasets.emnist``: ``examples/<client id>/pixels`` (n, 28, 28)
    float32 in [0, 1] and ``examples/<client id>/label``.
``tff:shakespeare``
    ``shakespeare_train.h5`` and ``shakespeare_test.h5``: ``examples/<client>/snippets``,
    byte strings.
``tff:stackoverflow``
    ``stackoverflow_train.h5``, ``stackoverflow_test.h5`` (``examples/<client>/tokens``:
    byte strings of space-separated words) and ``stackoverflow.word_count`` (``word
    count`` lines, most frequent first).
``tff:cifar100``
    ``fed_cifar100_train.h5``: ``examples/<client>/image`` (n, 32, 32, 3) uint8 and
    ``label`` (``coarse_label``: the 20 superclasses with ``label_key="coarse_label"``).
    TFF's test file holds 100 other clients, so each of the 500 training clients' own
    examples are split here (the last ``test_ratio`` of them, file order) to give every
    client a test set, as personalized FL needs.

Preprocessing follows the references:

* Shakespeare, TFF (Reddi et al. 2021 / TFF's ``shakespeare`` task): the 86-character
  vocabulary of TFF's text-generation tutorial, pad 0, characters 1..86, out-of-vocabulary
  87, begin 88, end 89 (90 ids); each snippet becomes ``[begin] + chars + [end]``, cut into
  windows of 81 ids (the last padded), x = the first 80, y = the next 80.
* Shakespeare, LEAF (the FedAvg paper's task): LEAF's 80 characters; x is the 80-character
  window, y the next character, scored at the last position only (the labels of the other
  positions are pad), so the same per-position models serve both.
* StackOverflow next-word prediction (Reddi et al., "Adaptive Federated Optimization",
  ICLR 2021): the 10,000 most frequent words; pad 0, words 1..10,000, out-of-vocabulary
  10,001, begin 10,002, end 10,003 (10,004 ids); a sentence's first 20 words, then
  ``end`` if it had fewer than 20, ``begin`` in front, padded to 21: x = ids[:20],
  y = ids[1:]. Reddi et al. train on at most 1,000 sentences per client:
  ``max_examples=1000``.
* Sent140, LEAF (its ``stacked_lstm`` task): a tweet is the text field of LEAF's row
  (``x[4]``) split by LEAF's ``split_line`` (words with their apostrophes and each of
  ``.,!?;``; case kept), its first 25 words; labels 0 / 1. LEAF maps words through
  GloVe's vocabulary only to index its own learned embedding; here the ``vocab_size``
  (10,000) most frequent words of every user's training split (ties by word) get ids
  1..V, and id 0 is both the unknown word and the padding after a short tweet, as LEAF's
  one unknown id is both.
* Pixels: LEAF's FEMNIST and TFF's EMNIST store greyscale / 255 with 1.0 the white
  background; they are kept so (as uint8), not inverted to MNIST's convention.
* ``max_examples`` caps the test split too (to bound memory); Reddi et al. cap training
  sentences only, and TFF draws them after a shuffle: here they are the first in file
  order.
* Accuracy counts every non-pad position, out-of-vocabulary and end tokens included
  (``fedjax_sim.core.evaluate.score``): TFF's ``accuracy_with_oov``. Pad labels are
  stored as -1.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedjax_sim.data.federated import RaggedFederatedData, ragged_from_clients

NATURAL_DATASETS = ("leaf:femnist", "leaf:shakespeare", "leaf:sent140", "leaf:synthetic",
                    "tff:emnist", "tff:shakespeare", "tff:stackoverflow", "tff:cifar100")

# Options of each data set's reader, beside min_samples, max_examples and max_clients.
NATURAL_OPTIONS = {"tff:emnist": ("only_digits",), "tff:cifar100": ("label_key", "test_ratio"),
                   "tff:stackoverflow": ("vocab_size",), "leaf:sent140": ("vocab_size",)}

# LEAF's Shakespeare alphabet (leaf/models/utils/language_utils.py, ALL_LETTERS).
LEAF_LETTERS = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuv"
                "wxyz}")
# TFF's Shakespeare characters (the text-generation tutorial's vocabulary).
TFF_CHARS = ("dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]"
             "!%)-159\r")
SHAKESPEARE_LENGTH = 80
SO_LENGTH = 20
SO_VOCAB_SIZE = 10_000
SENT140_WORDS = 25
SENT140_VOCAB_SIZE = 10_000
PAD = 0
PAD_LABEL = -1


def special_ids(vocab_size: int) -> tuple[int, int, int]:
    """``(out_of_vocab, begin, end)`` ids after pad 0 and the words 1..vocab_size (TFF)."""
    return vocab_size + 1, vocab_size + 2, vocab_size + 3


# --- Tokenizers -----------------------------------------------------------------------

def shakespeare_windows(snippet: str, length: int = SHAKESPEARE_LENGTH
                        ) -> tuple[np.ndarray, np.ndarray]:
    """TFF's Shakespeare preprocessing of one snippet: (n, length) inputs and next-character
    labels (pad labels -1), ``[begin] + chars + [end]`` cut into windows of length + 1."""
    index = {c: i + 1 for i, c in enumerate(TFF_CHARS)}
    oov, begin, end = special_ids(len(TFF_CHARS))
    ids = [begin, *(index.get(c, oov) for c in snippet), end]
    windows = -(-len(ids) // (length + 1))
    padded = np.full(windows * (length + 1), PAD, np.int64)
    padded[: len(ids)] = ids
    chunks = padded.reshape(windows, length + 1)
    y = chunks[:, 1:].copy()
    y[y == PAD] = PAD_LABEL
    return chunks[:, :-1].astype(np.int16), y.astype(np.int32)


def leaf_letters(text: str) -> list[int]:
    """LEAF's character ids (its ``word_to_indices``); a character outside the alphabet
    (not in LEAF's files) reads as a space."""
    space = LEAF_LETTERS.index(" ")
    return [i if (i := LEAF_LETTERS.find(c)) >= 0 else space for c in text]


def load_word_counts(path: str, vocab_size: int = SO_VOCAB_SIZE) -> dict[str, int]:
    """The ``vocab_size`` most frequent words of a ``word count`` file (most frequent first,
    as TFF's ``stackoverflow.word_count``) mapped to ids 1..vocab_size."""
    words = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 1:
                continue
            if parts[0] not in words:
                words[parts[0]] = len(words) + 1
            if len(words) == vocab_size:
                break
    return words


def stackoverflow_ids(sentence: str, vocab: dict[str, int], vocab_size: int,
                      length: int = SO_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """TFF's next-word ids of one sentence (Reddi et al.): x (length,) and y (length,)
    with pad labels -1."""
    oov, begin, end = special_ids(vocab_size)
    words = sentence.split()[:length]
    ids = [vocab.get(w, oov) for w in words]
    if len(ids) < length:
        ids.append(end)
    ids = [begin, *ids]
    row = np.full(length + 1, PAD, np.int64)
    row[: len(ids)] = ids
    y = row[1:].copy()
    y[y == PAD] = PAD_LABEL
    return row[:-1].astype(np.int16), y.astype(np.int32)


# --- File readers -----------------------------------------------------------------------

def _leaf_files(data_dir: str, name: str, split: str) -> list[str]:
    folder = os.path.join(data_dir, name, "data", split)
    files = sorted(glob.glob(os.path.join(folder, "*.json")))
    if not files:
        raise FileNotFoundError(
            f"leaf:{name}: no json files in {folder}; expected DATA_DIR/{name}/data/train/"
            f"*.json and DATA_DIR/{name}/data/test/*.json, the output of LEAF's "
            f"preprocess.sh for {name} (github.com/TalwalkarLab/leaf), with --data-dir "
            "DATA_DIR")
    return files


def _read_leaf(data_dir: str, name: str, split: str) -> dict[str, dict]:
    users: dict[str, dict] = {}
    for path in _leaf_files(data_dir, name, split):
        try:
            with open(path, encoding="utf-8") as f:
                blob = json.load(f)
            data = blob["user_data"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"leaf:{name}: {path} is not a LEAF json file (users, "
                             f"num_samples, user_data): {err}") from None
        for user in blob.get("users", data.keys()):
            users[str(user)] = data[user]
    return users


def _leaf_arrays(name: str, record: dict, vocab=None) -> tuple[np.ndarray, np.ndarray]:
    x, y = record["x"], record["y"]
    if name == "sent140":
        return _sent140_arrays(record, vocab)
    if name == "femnist":
        pixels = np.asarray(x, np.float32).reshape(-1, 28, 28, 1)
        return np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8), np.asarray(y, np.int32)
    if name == "shakespeare":
        tokens = np.asarray([leaf_letters(s) for s in x], np.int16).reshape(len(x), -1)
        labels = np.full(tokens.shape, PAD_LABEL, np.int32)
        labels[:, -1] = [leaf_letters(c)[0] for c in y]
        return tokens, labels
    return np.asarray(x, np.float32).reshape(len(x), -1), np.asarray(y, np.int32)


def sent140_words(tweet: str) -> list[str]:
    """LEAF's ``split_line``: words, apostrophes kept, and the punctuation ``.,!?;``."""
    return re.findall(r"[\w']+|[.,!?;]", tweet)


def sent140_vocab(tweets, vocab_size: int = SENT140_VOCAB_SIZE) -> dict[str, int]:
    """The ``vocab_size`` most frequent words of ``tweets`` (ties by word) -> ids 1..V."""
    counts = Counter(w for t in tweets for w in sent140_words(t)[:SENT140_WORDS])
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:vocab_size]
    return {word: i + 1 for i, (word, _) in enumerate(ranked)}


def sent140_ids(tweet: str, vocab: dict[str, int]) -> list[int]:
    """A tweet's first 25 word ids, unknown words and the padding after it 0."""
    ids = [vocab.get(w, 0) for w in sent140_words(tweet)[:SENT140_WORDS]]
    return ids + [0] * (SENT140_WORDS - len(ids))


def _sent140_arrays(record: dict, vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    rows = record["x"]
    try:
        tokens = [sent140_ids(str(row[4]), vocab) for row in rows]
        labels = np.asarray([int(v) for v in record["y"]], np.int32)
    except (IndexError, TypeError, ValueError) as err:
        raise ValueError(f"leaf:sent140: a row is not LEAF's [id, date, query, user, text] "
                         f"with an integer label: {err}") from None
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"leaf:sent140: labels must be 0 or 1 (LEAF's preprocessing), got "
                         f"{sorted(set(labels.tolist()) - {0, 1})[:5]}")
    dtype = np.int16 if len(vocab) < np.iinfo(np.int16).max else np.int32
    return np.asarray(tokens, dtype).reshape(len(rows), SENT140_WORDS), labels


def _h5(path: str, what: str):
    import h5py

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what}: no file {path}; put TFF's h5 files of the data set in --data-dir (the "
            "files tff.simulation.datasets downloads and caches, e.g. under "
            "~/.keras/datasets)")
    return h5py.File(path, "r")


def _tff_paths(spec: str, data_dir: str, options: dict) -> tuple[str, str | None]:
    name = spec.split(":", 1)[1]
    prefix = {"emnist": "fed_emnist_digitsonly" if options.get("only_digits") else
              "fed_emnist", "shakespeare": "shakespeare", "stackoverflow": "stackoverflow",
              "cifar100": "fed_cifar100"}[name]
    train = os.path.join(data_dir, f"{prefix}_train.h5")
    test = None if name == "cifar100" else os.path.join(data_dir, f"{prefix}_test.h5")
    return train, test


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _tff_client(spec: str, group, options: dict, vocab) -> tuple[np.ndarray, np.ndarray]:
    if spec == "tff:emnist":
        pixels = np.asarray(group["pixels"], np.float32)[..., None]
        return (np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8),
                np.asarray(group["label"], np.int32))
    if spec == "tff:cifar100":
        return (np.asarray(group["image"], np.uint8),
                np.asarray(group[options.get("label_key", "label")], np.int32))
    if spec == "tff:shakespeare":
        parts = [shakespeare_windows(s) for s in _decode(group["snippets"][()])]
        if not parts:
            return (np.zeros((0, SHAKESPEARE_LENGTH), np.int16),
                    np.zeros((0, SHAKESPEARE_LENGTH), np.int32))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    size = options.get("vocab_size", SO_VOCAB_SIZE)
    rows = [stackoverflow_ids(s, vocab, size) for s in _decode(group["tokens"][()])]
    if not rows:
        return np.zeros((0, SO_LENGTH), np.int16), np.zeros((0, SO_LENGTH), np.int32)
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def _num_classes(spec: str, options: dict, labels: Sequence[np.ndarray]) -> int:
    if spec == "leaf:femnist":
        return 62
    if spec == "tff:emnist":
        return 10 if options.get("only_digits") else 62
    if spec == "tff:cifar100":
        return 20 if options.get("label_key") == "coarse_label" else 100
    if spec == "leaf:shakespeare":
        return len(LEAF_LETTERS)
    if spec == "leaf:sent140":
        return 2
    if spec == "tff:shakespeare":
        return len(TFF_CHARS) + 4
    if spec == "tff:stackoverflow":
        return options.get("vocab_size", SO_VOCAB_SIZE) + 4
    return max(2, max((int(y.max()) + 1 for y in labels if y.size), default=2))


def _check_options(spec: str, data_dir: Any, options: dict) -> None:
    if spec not in NATURAL_DATASETS:
        raise ValueError(f"unknown natural data set {spec!r}; one of "
                         f"{', '.join(NATURAL_DATASETS)}")
    if not isinstance(data_dir, str | os.PathLike) or not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{spec}: data_dir {data_dir!r} is not a folder; give the "
                                "folder that holds the data set's files (--data-dir)")
    allowed = NATURAL_OPTIONS.get(spec, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{spec}: unknown option(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(allowed) or 'none'}")
    if options.get("label_key", "label") not in ("label", "coarse_label"):
        raise ValueError(f"tff:cifar100 label_key must be 'label' or 'coarse_label', got "
                         f"{options['label_key']!r}")
    size = options.get("vocab_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{spec} vocab_size must be an integer >= 1, got {size!r}")
    ratio = options.get("test_ratio", 0.2)
    if not isinstance(ratio, float | int) or not 0 < ratio < 1:
        raise ValueError(f"tff:cifar100 test_ratio must lie in (0, 1), got {ratio!r}")


def _limit_checked(name: str, value: Any, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < low):
        raise ValueError(f"{name} must be an integer >= {low} or unset, got {value!r}")


def load_natural(spec: str, data_dir: str | os.PathLike, *, min_samples: int = 1,
                 max_examples: int | None = None, max_clients: int | None = None,
                 val_fraction: float = 0.0, eval_split: str = "test", seed: int = 0,
                 **options: Any) -> tuple[RaggedFederatedData, list[str], dict]:
    """Reads a natural federated data set (see the module docstring for the files).

    Args:
      spec: one of :data:`NATURAL_DATASETS`.
      data_dir: the folder of its files.
      min_samples: drop clients with fewer training examples (clients without a test
        example are dropped too).
      max_examples: keep at most this many examples per client and split, the first in
        file order (Reddi et al.'s StackOverflow setting is 1,000).
      max_clients: keep the first clients in sorted id order (after dropping).
      val_fraction: share of each kept client's training examples held out as its
        validation rows, in [0, 1) (``partition.split_validation``: drawn from ``seed``
        and the client's position, never trained on; the test files stay as they are).
      eval_split: ``test`` (the test files) or ``val`` (the validation rows, to choose
        hyperparameters; needs ``val_fraction > 0``): what the run is evaluated on.
      seed: the seed of the validation rows.
      **options: the data set's own options (:data:`NATURAL_OPTIONS`): ``only_digits``
        (tff:emnist), ``label_key`` and ``test_ratio`` (tff:cifar100), ``vocab_size``
        (tff:stackoverflow, leaf:sent140).

    Returns:
      ``(data, client_ids, info)``: ``info`` counts the clients read and dropped.

    Raises:
      ValueError: an unknown name or option, a malformed file, no client left.
      FileNotFoundError: a missing file, naming the file and where it comes from.
    """
    data_dir = os.fspath(data_dir) if isinstance(data_dir, os.PathLike) else data_dir
    _check_options(spec, data_dir, options)
    _limit_checked("min_samples", min_samples, 1)
    _limit_checked("max_examples", max_examples, 1)
    _limit_checked("max_clients", max_clients, 1)
    cap = slice(None) if max_examples is None else slice(0, max_examples)
    train: dict[str, tuple] = {}
    test: dict[str, tuple] = {}
    if spec.startswith("leaf:"):
        name = spec.split(":", 1)[1]
        train_users, test_users = (_read_leaf(data_dir, name, s) for s in ("train", "test"))
        ids = sorted(set(train_users) & set(test_users))
        vocab = None
        if name == "sent140":
            size = options.get("vocab_size", SENT140_VOCAB_SIZE)
            vocab = sent140_vocab((str(row[4]) for user in sorted(train_users)
                                   for row in train_users[user]["x"] if len(row) > 4), size)
        for user in ids:
            for out, users in ((train, train_users), (test, test_users)):
                x, y = _leaf_arrays(name, users[user], vocab)
                out[user] = (x[cap], y[cap])
        read = len(set(train_users) | set(test_users))
    else:
        train_path, test_path = _tff_paths(spec, data_dir, options)
        vocab = None
        if spec == "tff:stackoverflow":
            counts = os.path.join(data_dir, "stackoverflow.word_count")
            if not os.path.isfile(counts):
                raise FileNotFoundError(f"{spec}: no file {counts} (TFF's word counts, "
                                        "'word count' lines, most frequent first)")
            vocab = load_word_counts(counts, options.get("vocab_size", SO_VOCAB_SIZE))
        with _h5(train_path, spec) as train_file:
            train_groups = train_file["examples"]
            if test_path is None:
                ids = sorted(train_groups)
                ratio = float(options.get("test_ratio", 0.2))
                for cid in ids:
                    x, y = _tff_client(spec, train_groups[cid], options, vocab)
                    held = max(1, round(len(y) * ratio)) if len(y) > 1 else 0
                    train[cid] = (x[: len(y) - held][cap], y[: len(y) - held][cap])
                    test[cid] = (x[len(y) - held:][cap], y[len(y) - held:][cap])
                read = len(ids)
            else:
                with _h5(test_path, spec) as test_file:
                    test_groups = test_file["examples"]
                    ids = sorted(set(train_groups) & set(test_groups))
                    read = len(set(train_groups) | set(test_groups))
                    for cid in ids:
                        for out, groups in ((train, train_groups), (test, test_groups)):
                            x, y = _tff_client(spec, groups[cid], options, vocab)
                            out[cid] = (x[cap], y[cap])
    usable = [c for c in ids if len(train[c][1]) >= min_samples and len(test[c][1]) >= 1]
    kept = usable if max_clients is None else usable[:max_clients]
    if not kept:
        raise ValueError(f"{spec}: no client in {data_dir} has >= min_samples={min_samples} "
                         "training examples and a test example")
    num_classes = _num_classes(spec, options, [train[c][1] for c in kept])
    trains, evals = _with_validation([train[c] for c in kept], [test[c] for c in kept],
                                     val_fraction, eval_split, seed)
    data = ragged_from_clients(trains, evals, num_classes=num_classes, name=spec)
    info = {"clients_read": read, "clients_in_both_splits": len(ids),
            "dropped_small": len(ids) - len(usable), "clients": len(kept)}
    return data, list(kept), info


def _with_validation(train: list[tuple], test: list[tuple], val_fraction: float,
                     eval_split: str, seed: int) -> tuple[list[tuple], list[tuple]]:
    """Per client, its training examples less its validation rows, and the rows it is
    evaluated on (its test examples, or with ``eval_split="val"`` its validation rows)."""
    from fedjax_sim.data.partition import check_val_fraction, split_validation

    check_val_fraction(val_fraction, eval_split)
    if val_fraction == 0:
        return train, test
    triples = split_validation([(np.arange(len(y)), np.arange(len(t[1])))
                                for (_, y), t in zip(train, test, strict=True)],
                               val_fraction, seed)
    trains, evals = [], []
    for (x, y), held, (keep, val, _) in zip(train, test, triples, strict=True):
        trains.append((x[keep], y[keep]))
        evals.append((x[val], y[val]) if eval_split == "val" else held)
    return trains, evals


def natural_size(spec: str, data_dir: str | os.PathLike, **options: Any) -> int | None:
    """An upper bound on the bytes :func:`load_natural` builds, from file headers and sizes
    (no example is parsed), or ``None`` where the files are missing (the load then says
    which). h5 images and labels: their shapes, stored as uint8 / int32. StackOverflow:
    one row of 20 int16 inputs and int32 labels per sentence. Shakespeare: 6 bytes per
    character of the file (one int16 input and one int32 label each) plus a padded window
    per snippet. LEAF json: the stored values never take more than the text that writes
    them, except Shakespeare's (80 labels per example): 8x the files' size for it, 2x
    for the others.
    """
    data_dir = os.fspath(data_dir)
    if spec.startswith("leaf:"):
        name = spec.split(":", 1)[1]
        files = glob.glob(os.path.join(data_dir, name, "data", "*", "*.json"))
        # Sent140: a row of 25 ids and a label from as few as ~17 characters of json.
        factor = {"shakespeare": 8, "sent140": 7}.get(name, 2)
        return factor * sum(os.path.getsize(f) for f in files) if files else None
    import h5py

    window = (SHAKESPEARE_LENGTH + 1) * 6
    total = 0
    for path in _tff_paths(spec, data_dir, options):
        if path is None:
            continue
        if not os.path.isfile(path):
            return None
        if spec == "tff:shakespeare":
            total += 6 * os.path.getsize(path)
        with h5py.File(path, "r") as f:
            widest = 0  # the pool's trailing rows: the largest client's row count
            for group in f["examples"].values():
                client = 0
                for feature, dataset in group.items():
                    if spec == "tff:stackoverflow" and feature == "tokens":
                        row = SO_LENGTH * 6
                    elif spec == "tff:shakespeare" and feature == "snippets":
                        row = window
                    elif feature in ("pixels", "image"):
                        row = dataset.size // max(1, dataset.shape[0])
                    elif feature == options.get("label_key", "label"):
                        row = 4
                    else:
                        continue
                    client += dataset.shape[0] * row
                total += client
                widest = max(widest, client)
            total += widest
    return total
