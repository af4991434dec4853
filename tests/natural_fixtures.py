"""Small files in exactly the published formats of LEAF (json) and TFF (h5), for tests and
for the README's natural-data commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Per client: (train examples, test examples).
SIZES = {"f_0003": (12, 3), "f_0001": (6, 2), "f_0002": (2, 1)}
SNIPPETS = {"ALICE": ["To be, or not.", "Ay!"], "BOB": ["What?"], "CAROL": ["No ~ way"]}
SENTENCES = {"u1": ["the cat sat on the mat", "hello world"], "u2": ["the the zzz"],
             "u3": ["cat"]}
# LEAF's Sent140 rows are [tweet id, date, query, user, text]; labels 0 / 1.
TWEETS = ["I love it! so good", "so bad, so sad", "love love love", "Bad day?",
          "it's good"]
WORD_COUNTS = [("the", 50), ("cat", 20), ("sat", 10), ("on", 5), ("mat", 3)]


def write_leaf(root: Path, name: str = "femnist", seed: int = 0, scale: int = 1) -> Path:
    """LEAF's layout: root/<name>/data/{train,test}/*.json, users split over two files;
    every client ``scale`` times the examples of :data:`SIZES`."""
    rng = np.random.default_rng(seed)
    for split, column in (("train", 0), ("test", 1)):
        folder = root / name / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        users = sorted(SIZES)
        for part, chunk in enumerate((users[:2], users[2:])):
            blob = {"users": chunk, "num_samples": [], "user_data": {}}
            for user in chunk:
                n = SIZES[user][column] * scale
                if name == "femnist":
                    x = rng.random((n, 784)).round(3).tolist()
                    y = rng.integers(0, 62, n).tolist()
                elif name == "sent140":
                    picks = rng.integers(0, len(TWEETS), n)
                    x = [[str(1000 + i), "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", user,
                          TWEETS[p]] for i, p in enumerate(picks)]
                    y = rng.integers(0, 2, n).tolist()
                elif name == "shakespeare":
                    text = "".join(rng.choice(list("abc de!?\n"), n + 80))
                    x = [text[i:i + 80] for i in range(n)]
                    y = [text[i + 80] for i in range(n)]
                else:
                    x = rng.normal(size=(n, 60)).round(3).tolist()
                    y = rng.integers(0, 10, n).tolist()
                blob["num_samples"].append(n)
                blob["user_data"][user] = {"x": x, "y": y}
            (folder / f"all_data_{part}_niid_{split}.json").write_text(json.dumps(blob))
    return root


def write_tff(root: Path, name: str, seed: int = 0, scale: int = 1) -> Path:
    """TFF's h5 files: examples/<client id>/<feature>; strings as bytes; every client
    ``scale`` times the examples (sentences, snippets) of the tables above."""
    import h5py

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = {"emnist": ["fed_emnist_train.h5", "fed_emnist_test.h5"],
             "shakespeare": ["shakespeare_train.h5", "shakespeare_test.h5"],
             "stackoverflow": ["stackoverflow_train.h5", "stackoverflow_test.h5"],
             "cifar100": ["fed_cifar100_train.h5"]}[name]
    for column, filename in enumerate(files):
        with h5py.File(root / filename, "w") as f:
            examples = f.create_group("examples")
            if name in ("emnist", "cifar100"):
                for cid, sizes in SIZES.items():
                    n = scale * (sizes[column] if name == "emnist" else sum(sizes))
                    group = examples.create_group(cid)
                    if name == "emnist":
                        group["pixels"] = rng.random((n, 28, 28)).astype(np.float32)
                        group["label"] = rng.integers(0, 62, n).astype(np.int32)
                    else:
                        group["image"] = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
                        group["label"] = rng.integers(0, 100, n).astype(np.int64)
                        group["coarse_label"] = rng.integers(0, 20, n).astype(np.int64)
            elif name == "shakespeare":
                for cid, snippets in SNIPPETS.items():
                    chosen = (snippets if column == 0 else snippets[:1]) * scale
                    examples.create_group(cid)["snippets"] = [s.encode() for s in chosen]
            else:
                for cid, sentences in SENTENCES.items():
                    if column == 1 and cid == "u3":
                        continue  # a client without test sentences
                    chosen = (sentences if column == 0 else sentences[:1]) * scale
                    examples.create_group(cid)["tokens"] = [s.encode() for s in chosen]
    if name == "stackoverflow":
        (root / "stackoverflow.word_count").write_text(
            "".join(f"{w} {c}\n" for w, c in WORD_COUNTS))
    return root
