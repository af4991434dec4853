"""Partitioners (iid, Dirichlet label skew, shards, classes, natural ids), per-client
train/test split, and partition files.

The rules follow FL-bench / PFLlib: the data set's train and test splits are pooled,
partitioned over clients, then every client's share is split into its own train and test
sets, so each client is tested on its own distribution.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedjax_sim.checks import check_float, check_input_file, check_int

PARTITIONS = ("iid", "dirichlet", "shards", "classes", "natural")

# Redraws allowed to the Dirichlet partitioner before it gives up on `min_samples`.
MAX_DIRICHLET_DRAWS = 1000

Splits = list[tuple[np.ndarray, np.ndarray]]


def _check_int(name: str, value: Any, minimum: int) -> None:
    check_int(name, value, minimum)


def _check_positive(name: str, value: Any) -> None:
    check_float(name, value, 0.0, low_open=True)


def _check_scheme(scheme: Any) -> None:
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition {scheme!r}; valid names: {', '.join(PARTITIONS)}")


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    rng: np.random.Generator,
    alpha: float = 0.1,
    min_samples: int = 10,
    shards_per_client: int = 2,
    classes_per_client: int = 2,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Splits sample indices over clients.

    Schemes:
      - ``iid``: a random permutation cut into ``num_clients`` nearly equal parts.
      - ``dirichlet``: for every label c, p ~ Dir(alpha·1_K); that label's shuffled
        indices are cut at cumsum(p)·n_c. The whole draw is repeated until every client
        holds at least ``min_samples`` samples (at most ``MAX_DIRICHLET_DRAWS`` times).
      - ``shards`` (McMahan et al. 2017): indices sorted by label (random order within a
        label) are cut into K·s nearly equal shards and every client gets s random
        shards. A shard can straddle two labels when class sizes are not multiples of the
        shard size, so a client holds at most 2s labels, and at most s when they align.
      - ``classes``: every client draws ``classes_per_client`` distinct labels; each
        label's samples are split evenly among the clients that drew it. When
        K·classes_per_client >= number of labels, draws are corrected so that every label
        is drawn by someone; otherwise the labels nobody drew are left out.
      - ``natural``: one client per distinct value of ``groups``, in increasing id order;
        with fewer clients than groups, the first ``num_clients`` groups are used and the
        other samples are left out.

    Args:
      labels: (N,) integer labels.
      num_clients: K, the number of clients.
      scheme: one of ``PARTITIONS``.
      rng: source of randomness (the only one used).
      alpha: Dirichlet concentration (``dirichlet``); smaller means more label skew.
      min_samples: fewest samples a client may hold; ``dirichlet`` redraws to meet it, the
        other schemes raise ValueError when they do not.
      shards_per_client: s (``shards``).
      classes_per_client: labels per client (``classes``).
      groups: (N,) natural client id per sample (``natural``).

    Returns:
      K sorted int64 index arrays, pairwise disjoint. For ``iid``, ``dirichlet`` and
      ``shards`` (and ``natural`` with K = number of groups) they cover every sample.

    Raises:
      ValueError: bad arguments, or no partition meeting ``min_samples``.
    """
    _check_scheme(scheme)
    _check_int("num_clients", num_clients, 1)
    _check_positive("alpha", alpha)
    _check_int("min_samples", min_samples, 0)
    _check_int("shards_per_client", shards_per_client, 1)
    _check_int("classes_per_client", classes_per_client, 1)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    n = labels.shape[0]
    if scheme != "natural" and n < num_clients * min_samples:
        raise ValueError(
            f"num_clients={num_clients} needs at least {num_clients}*min_samples="
            f"{num_clients * min_samples} samples but there are {n}"
        )

    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, alpha, min_samples, rng)
    elif scheme == "shards":
        parts = _shards(labels, num_clients, shards_per_client, rng)
    elif scheme == "classes":
        parts = _classes(labels, num_clients, classes_per_client, rng)
    else:
        parts = _natural(labels, num_clients, groups)

    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    sizes = np.array([len(p) for p in parts])
    if sizes.min() < min_samples:
        k = int(np.argmin(sizes))
        raise ValueError(
            f"the {scheme!r} partition gave client {k} only {sizes[k]} samples, fewer than "
            f"min_samples={min_samples}; lower min_samples or num_clients"
        )
    return parts


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_samples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    by_label = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(num_clients, float(alpha))
    for _ in range(MAX_DIRICHLET_DRAWS):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_label:
            idx = rng.permutation(idx)
            p = rng.dirichlet(concentration)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for k, piece in enumerate(np.split(idx, cuts)):
                pieces[k].append(piece)
        parts = [np.concatenate(p) for p in pieces]
        if min(len(p) for p in parts) >= min_samples:
            return parts
    raise ValueError(
        f"the dirichlet partition found no draw giving each of {num_clients} clients at least "
        f"min_samples={min_samples} of {len(labels)} samples in {MAX_DIRICHLET_DRAWS} tries "
        f"(alpha={alpha}); raise alpha, or lower min_samples or num_clients"
    )


def _shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise ValueError(
            f"shards needs num_clients*shards_per_client={num_shards} <= the number of "
            f"samples, {len(labels)}"
        )
    # Shuffle first so that the order within a label is random, then stable-sort by label.
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(order, num_shards)
    owners = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[j] for j in row]) for row in owners]


def _classes(
    labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    values = np.unique(labels)
    num_labels = len(values)
    if classes_per_client > num_labels:
        raise ValueError(
            f"classes_per_client must be <= the number of classes ({num_labels}), "
            f"got {classes_per_client}"
        )
    chosen = np.stack(
        [rng.choice(num_labels, classes_per_client, replace=False) for _ in range(num_clients)]
    )
    if num_clients * classes_per_client >= num_labels:
        # Hand every label nobody drew to a random slot whose label someone else also
        # drew; such a slot exists while a label is missing, and its client cannot hold
        # the missing label already.
        counts = np.bincount(chosen.ravel(), minlength=num_labels)
        for missing in rng.permutation(np.flatnonzero(counts == 0)):
            rows, cols = np.nonzero(counts[chosen] > 1)
            pick = rng.integers(len(rows))
            k, j = rows[pick], cols[pick]
            counts[chosen[k, j]] -= 1
            chosen[k, j] = missing
            counts[missing] += 1
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_labels):
        holders = np.flatnonzero((chosen == c).any(axis=1))
        if len(holders) == 0:
            continue
        idx = rng.permutation(np.flatnonzero(labels == values[c]))
        for k, piece in zip(holders, np.array_split(idx, len(holders)), strict=True):
            pieces[k].append(piece)
    return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in pieces]


def _natural(labels: np.ndarray, num_clients: int, groups: np.ndarray | None) -> list[np.ndarray]:
    if groups is None:
        raise ValueError(
            "the 'natural' partition needs a natural client id per sample (groups), "
            "which this data set does not have"
        )
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise ValueError(f"groups has shape {groups.shape}, labels {labels.shape}")
    ids = np.unique(groups)
    if num_clients > len(ids):
        raise ValueError(
            f"the 'natural' partition has {len(ids)} clients (groups), "
            f"fewer than num_clients={num_clients}"
        )
    return [np.flatnonzero(groups == g) for g in ids[:num_clients]]


def train_test_split(
    client_indices: Sequence[np.ndarray], test_ratio: float, rng: np.random.Generator
) -> Splits:
    """Splits every client's indices into its own train and test sets.

    Each client's indices are shuffled; the first ``floor(n * test_ratio)`` become its test
    set, clipped so that a client with n >= 2 samples keeps at least one of each (a client
    with one sample keeps it for training).

    Args:
      client_indices: per client, indices into the pooled data.
      test_ratio: share of each client's samples used for testing, in (0, 1).
      rng: source of randomness.

    Returns:
      Per client, ``(train, test)`` sorted int64 index arrays.
    """
    check_float("test_ratio", test_ratio, 0.0, 1.0, low_open=True, high_open=True)
    splits = []
    for idx in client_indices:
        perm = rng.permutation(np.asarray(idx, dtype=np.int64))
        n = len(perm)
        n_test = min(max(int(n * test_ratio), 1), n - 1) if n >= 2 else 0
        splits.append((np.sort(perm[n_test:]), np.sort(perm[:n_test])))
    return splits


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot store {type(value).__name__} in a partition file")


def save_partition(path: str | os.PathLike, splits: Sequence[tuple[Any, Any]], **meta: Any) -> None:
    """Writes a partition file.

    The file is JSON: ``{**meta, "clients": [{"train": [...], "test": [...]}, ...]}`` with
    indices into the source's canonical pooled order, one client per line.

    Args:
      path: file to write; missing parent directories are created.
      splits: per client, ``(train, test)`` index arrays.
      **meta: JSON-serializable facts to keep alongside (data set, scheme, seed, ...).
    """
    if "clients" in meta:
        raise ValueError("'clients' is reserved in partition files")
    lines = ["{"]
    for key, value in meta.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, default=_json_default)},")
    clients = [
        json.dumps(
            {
                "train": np.asarray(train, dtype=np.int64).tolist(),
                "test": np.asarray(test, dtype=np.int64).tolist(),
            }
        )
        for train, test in splits
    ]
    lines.append('  "clients": [')
    lines.append(",\n".join(f"    {c}" for c in clients))
    lines.append("  ]")
    lines.append("}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so that an interrupted write never leaves a truncated file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def _read_partition_json(path: str | os.PathLike, label: str = "partition file"
                         ) -> dict[str, Any]:
    path = pathlib.Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{label} {path} is not valid JSON: {err}") from err
    except UnicodeDecodeError:
        raise ValueError(f"{label} {path} is not valid JSON: not UTF-8 text") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("clients"), list):
        raise ValueError(f"{label} {path} has no 'clients' list")
    return doc


def check_partition_file(path: str | os.PathLike, label: str = "partition_file") -> None:
    """Checks that ``path`` is a readable partition file, before any data is loaded.

    Only the form is checked (a JSON object with a ``clients`` list); the indices are
    checked against the data set by ``load_partition``.

    Args:
      path: partition file.
      label: how messages name it (``--partition-file`` on the command line).

    Raises:
      ValueError: a missing file, a directory, an unreadable file, invalid JSON or no
        ``clients`` list; the message names ``label`` and ``path``.
    """
    check_input_file(label, path)
    _read_partition_json(path, label)


def load_partition_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Reads the metadata stored in a partition file (everything but ``clients``).

    Args:
      path: partition file.

    Returns:
      The metadata dict.
    """
    doc = _read_partition_json(path)
    doc.pop("clients")
    return doc


def load_partition(path: str | os.PathLike, num_samples: int) -> Splits:
    """Reads and checks a partition file written by ``save_partition``.

    Args:
      path: partition file.
      num_samples: size of the pooled data set the indices point into.

    Returns:
      Per client, ``(train, test)`` int64 index arrays.

    Raises:
      ValueError: malformed file, an index that is not an integer or is out of
        ``[0, num_samples)``, or an index used twice (within or across clients).
    """
    doc = _read_partition_json(path)
    clients = doc["clients"]
    if not clients:
        raise ValueError(f"partition file {path} lists no clients")
    owner = np.full(num_samples, -1, dtype=np.int64)
    splits = []
    for k, client in enumerate(clients):
        if not isinstance(client, dict) or not {"train", "test"} <= client.keys():
            raise ValueError(f"partition file {path}: client {k} needs 'train' and 'test' lists")
        arrays = []
        for part in ("train", "test"):
            values = client[part]
            if not isinstance(values, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in values
            ):
                raise ValueError(
                    f"partition file {path}: client {k} {part} must be a list of integers"
                )
            arr = np.asarray(values, dtype=np.int64).reshape(-1)
            if arr.size and (arr.min() < 0 or arr.max() >= num_samples):
                bad = arr[(arr < 0) | (arr >= num_samples)][0]
                raise ValueError(
                    f"partition file {path}: client {k} {part} index {bad} is outside "
                    f"[0, {num_samples})"
                )
            arrays.append(arr)
        both = np.concatenate(arrays)
        uniq, counts = np.unique(both, return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"partition file {path}: client {k} lists index {uniq[counts > 1][0]} twice"
            )
        taken = owner[both] >= 0
        if taken.any():
            i = both[taken][0]
            raise ValueError(
                f"partition file {path}: index {i} belongs to both client {owner[i]} and client {k}"
            )
        owner[both] = k
        splits.append((arrays[0], arrays[1]))
    return splits
