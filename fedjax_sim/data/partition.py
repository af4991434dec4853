"""Partitioners (iid, Dirichlet label skew, shards, classes, natural ids), per-client
train/test split, per-client validation rows, and partition files.

The rules follow FL-bench / PFLlib: the data set's train and test splits are pooled,
partitioned over clients, then every client's share is split into its own train and test
sets, so each client is tested on its own distribution. Validation rows (for choosing
hyperparameters without looking at the test rows) are carved from each client's training
rows afterwards (``split_validation``), so the train/test split does not move.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedjax_sim.checks import check_choice, check_float, check_input_file, check_int

PARTITIONS = ("iid", "dirichlet", "shards", "classes", "natural")

# Redraws allowed to the Dirichlet partitioner before it gives up on `min_samples`.
MAX_DIRICHLET_DRAWS = 1000

Splits = list[tuple[np.ndarray, np.ndarray]]
# Per client (train, val, test): ``split_validation`` and ``load_partition(with_val=True)``.
Triples = list[tuple[np.ndarray, np.ndarray, np.ndarray]]

# The rows a run evaluates on: each client's test rows, or its validation rows.
EVAL_SPLITS = ("test", "val")
# The extra stream value of the validation draw: client k's rows come from
# ``np.random.default_rng([seed, VAL_STREAM, k])``, apart from the partition's and the
# train/test split's draws (``np.random.default_rng(seed)``), which stay as they were.
VAL_STREAM = 0x7A11D
# The key under which a partition file records the val_fraction its "val" rows were
# carved with ("val_fraction" in files of the public-data path is the server's split).
VAL_META = "client_val_fraction"


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


def _held_out(n: int, ratio: float) -> int:
    """``floor(n * ratio)``, clipped so that n >= 2 rows keep at least one on each side;
    a single row stays on the first side."""
    return min(max(int(n * ratio), 1), n - 1) if n >= 2 else 0


def check_val_fraction(val_fraction: Any, eval_split: Any = "test", *,
                       label: Any = None) -> float:
    """Checks ``val_fraction`` (in [0, 1)) and ``eval_split`` (one of ``EVAL_SPLITS``;
    ``val`` needs ``val_fraction > 0``).

    Args:
      val_fraction: share of each client's training rows held out as validation rows.
      eval_split: which rows a run evaluates on.
      label: how messages name an option (default: its name).

    Returns:
      ``val_fraction`` as a float.

    Raises:
      ValueError: one line naming the option and its allowed values.
    """
    label = label or (lambda name: name)
    val_fraction = check_float(label("val_fraction"), val_fraction, 0.0, 1.0, high_open=True)
    check_choice(label("eval_split"), eval_split, EVAL_SPLITS)
    if eval_split == "val" and val_fraction == 0:
        raise ValueError(f"{label('eval_split')} val evaluates on the clients' validation "
                         f"rows, which need {label('val_fraction')} > 0 (in (0, 1)), got 0")
    return val_fraction


def split_validation(splits: Sequence[tuple[Any, ...]], val_fraction: float,
                     seed: int) -> Triples:
    """Carves every client's validation rows out of its training rows.

    Client k's training rows are shuffled by ``np.random.default_rng([seed, VAL_STREAM,
    k])`` and the first ``floor(n_train * val_fraction)`` become its validation rows,
    clipped so that a client with n_train >= 2 keeps at least one training row and gets
    at least one validation row (a client with one training row keeps it for training).
    The rows depend only on the client's training rows, its position and ``seed``: not on
    the other clients, the method or the run's seed, and the test rows never move. With
    ``val_fraction == 0`` every validation set is empty and the training rows are
    unchanged.

    Args:
      splits: per client, ``(train, test)`` index arrays.
      val_fraction: share of each client's training rows held out, in [0, 1).
      seed: the partition's seed (an integer in [0, 2**32)).

    Returns:
      Per client, ``(train, val, test)`` sorted int64 index arrays, pairwise disjoint.
    """
    val_fraction = check_float("val_fraction", val_fraction, 0.0, 1.0, high_open=True)
    triples = []
    for k, (train, test) in enumerate(splits):
        train = np.sort(np.asarray(train, dtype=np.int64))
        test = np.asarray(test, dtype=np.int64)
        n_val = _held_out(len(train), val_fraction) if val_fraction > 0 else 0
        if n_val == 0:
            triples.append((train, np.zeros(0, np.int64), test))
            continue
        perm = np.random.default_rng([int(seed), VAL_STREAM, k]).permutation(train)
        triples.append((np.sort(perm[n_val:]), np.sort(perm[:n_val]), test))
    return triples


def eval_splits(triples: Sequence[tuple[Any, Any, Any]], eval_split: str = "test") -> Splits:
    """The ``(train, evaluated)`` pairs a run is built from: the training rows (validation
    rows left out) and the test rows (``eval_split="test"``) or the validation rows
    (``"val"``)."""
    check_choice("eval_split", eval_split, EVAL_SPLITS)
    return [(train, val if eval_split == "val" else test) for train, val, test in triples]


def check_val_rows(triples: Sequence[tuple[Any, Any, Any]], *, source: str,
                   val_fraction: float) -> None:
    """Refuses ``eval_split="val"`` when a client has no validation row (a client with a
    single training row keeps it for training)."""
    empty = [k for k, (_, val, _) in enumerate(triples) if len(val) == 0]
    if empty:
        verb = "has" if len(empty) == 1 else "have"
        raise ValueError(
            f"eval_split='val' evaluates on every client's validation rows, but with "
            f"{source} and val_fraction={val_fraction} {_client_list(empty)} {verb} none "
            "(a client needs 2 training rows for one); raise min_samples or lower "
            "test_ratio, or use eval_split='test'")


def _client_list(ks: Sequence[int], limit: int = 10) -> str:
    listed = ", ".join(str(k) for k in ks[:limit])
    more = f" and {len(ks) - limit} more" if len(ks) > limit else ""
    return f"client{'s' if len(ks) > 1 else ''} {listed}{more}"


def check_splits(
    splits: Sequence[tuple[Any, Any]],
    *,
    source: str,
    num_clients: int | None = None,
    hints: dict[str, str] | None = None,
) -> None:
    """Refuses a split that leaves a client without training or test examples.

    Args:
      splits: per client, ``(train, test)`` indices.
      source: where the split came from, first in every message (e.g. ``"partition file
        p.json"`` or ``"the 'iid' partition"``).
      num_clients: the number of clients the split must hold, or None for any number >= 1.
      hints: what to change, per problem (``"empty"``, ``"train"``, ``"test"``), appended
        to the message.

    Raises:
      ValueError: one line naming ``source``, the problem and the clients concerned.
    """
    hints = hints or {}
    if len(splits) == 0:
        raise ValueError(f"{source} holds no clients")
    if num_clients is not None and len(splits) != num_clients:
        raise ValueError(
            f"{source} holds {len(splits)} clients but num_clients={num_clients}; set "
            f"num_clients (--num-clients) to {len(splits)} or leave it unset"
        )
    sizes = np.array([(len(train), len(test)) for train, test in splits]).reshape(-1, 2)
    problems = (
        ("empty", (sizes == 0).all(axis=1), "no samples at all"),
        ("train", (sizes[:, 0] == 0) & (sizes[:, 1] > 0), "an empty train set"),
        ("test", (sizes[:, 1] == 0) & (sizes[:, 0] > 0), "an empty test set"),
    )
    for kind, mask, what in problems:
        if mask.any():
            ks = np.flatnonzero(mask).tolist()
            verb = "has" if len(ks) == 1 else "have"
            hint = f"; {hints[kind]}" if kind in hints else ""
            raise ValueError(
                f"{source}: {_client_list(ks)} {verb} {what} (every client needs at least "
                f"one train and one test sample){hint}"
            )


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


def save_partition(path: str | os.PathLike, splits: Sequence[tuple[Any, ...]], **meta: Any) -> None:
    """Writes a partition file.

    The file is JSON: ``{**meta, "clients": [{"train": [...], "test": [...]}, ...]}`` with
    indices into the source's canonical pooled order, one client per line. A client with
    validation rows also gets ``"val": [...]`` (its ``"train"`` leaves them out).

    Args:
      path: file to write; missing parent directories are created.
      splits: per client, ``(train, test)`` or ``(train, val, test)`` index arrays.
      **meta: JSON-serializable facts to keep alongside (data set, scheme, seed, ...).
    """
    if "clients" in meta:
        raise ValueError("'clients' is reserved in partition files")
    lines = ["{"]
    for key, value in meta.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, default=_json_default)},")
    clients = []
    for split in splits:
        if len(split) == 3:
            train, val, test = split
        else:
            (train, test), val = split, ()
        client = {"train": np.asarray(train, dtype=np.int64).tolist()}
        if len(val):
            client["val"] = np.asarray(val, dtype=np.int64).tolist()
        client["test"] = np.asarray(test, dtype=np.int64).tolist()
        clients.append(json.dumps(client))
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


def load_partition(
    path: str | os.PathLike, num_samples: int, *, num_clients: int | None = None,
    with_val: bool = False,
) -> Splits | Triples:
    """Reads and checks a partition file written by ``save_partition``.

    Args:
      path: partition file.
      num_samples: size of the pooled data set the indices point into.
      num_clients: the number of clients the file must hold (None: any number).
      with_val: return ``(train, val, test)`` triples (``val`` empty for a client without
        a ``"val"`` list) instead of ``(train, test)`` pairs. Either way the training rows
        are the file's ``"train"`` list, which leaves the validation rows out.

    Returns:
      Per client, ``(train, test)`` (or ``(train, val, test)``) int64 index arrays.

    Raises:
      ValueError: malformed file, an index that is not an integer or is out of
        ``[0, num_samples)``, an index used twice (within a client's train, val and test
        lists, or across clients), a client with an empty train or test set, or a client
        count other than ``num_clients``.
    """
    doc = _read_partition_json(path)
    clients = doc["clients"]
    if not clients:
        raise ValueError(f"partition file {path} lists no clients")
    owner = np.full(num_samples, -1, dtype=np.int64)
    triples = []
    for k, client in enumerate(clients):
        if not isinstance(client, dict) or not {"train", "test"} <= client.keys():
            raise ValueError(f"partition file {path}: client {k} needs 'train' and 'test' lists")
        arrays = []
        for part in ("train", "val", "test"):
            values = client.get(part, [])
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
                " (its train, val and test lists must be disjoint)"
            )
        taken = owner[both] >= 0
        if taken.any():
            i = both[taken][0]
            raise ValueError(
                f"partition file {path}: index {i} belongs to both client {owner[i]} and client {k}"
            )
        owner[both] = k
        triples.append((arrays[0], arrays[1], arrays[2]))
    splits = [(train, test) for train, _, test in triples]
    check_splits(splits, source=f"partition file {path}", num_clients=num_clients)
    return triples if with_val else splits


def _check_file_val(path: str | os.PathLike, has_val: bool, meta: dict[str, Any],
                    val_fraction: float, label: Any) -> None:
    if not has_val:
        return
    recorded = meta.get(VAL_META)
    given = (f"give {label('val_fraction')} {recorded}" if recorded is not None
             else f"give {label('val_fraction')} > 0")
    if val_fraction == 0:
        raise ValueError(f"partition file {os.fspath(path)} holds validation rows (never "
                         f"trained on): {given} to run on it")
    if recorded is not None and float(recorded) != val_fraction:
        raise ValueError(f"partition file {os.fspath(path)} holds validation rows carved "
                         f"with {label('val_fraction')} {recorded}, not {val_fraction}: "
                         f"{given}, or leave out the file to draw a new split")


def check_partition_val(path: str | os.PathLike, val_fraction: float, *,
                        label: Any = None) -> None:
    """Checks ``val_fraction`` against a partition file's validation rows before any data
    is loaded (the rule of ``file_validation``).

    Raises:
      ValueError: a file with ``"val"`` rows and ``val_fraction == 0``, or a
        ``val_fraction`` other than the one the file records.
    """
    doc = _read_partition_json(path)
    has_val = any(isinstance(c, dict) and isinstance(c.get("val"), list) and c["val"]
                  for c in doc.pop("clients"))
    _check_file_val(path, has_val, doc, val_fraction, label or (lambda name: name))


def file_validation(path: str | os.PathLike, triples: Triples, val_fraction: float,
                    *, label: Any = None) -> Triples:
    """The validation rows of a run read from a partition file, by one rule: the file
    fixes every row's role.

    - A file with ``"val"`` rows: those rows are the validation rows and are never
      trained on; ``val_fraction`` must be > 0 and, when the file records the fraction it
      was written with (``VAL_META``, which ``--save-partition`` writes), equal to it.
    - A file without ``"val"`` rows: ``val_fraction == 0`` reads it as before; with
      ``val_fraction > 0`` the rows are carved from its training rows as for a drawn split
      (``split_validation``), seeded by the file's recorded ``seed`` (0 when it has none),
      so that every run and seed of the file sees the same rows.

    Args:
      path: the partition file (for messages and its metadata).
      triples: ``load_partition(path, ..., with_val=True)``.
      val_fraction: the run's ``val_fraction``, checked.
      label: how messages name an option (default: its name).

    Returns:
      Per client, ``(train, val, test)``.

    Raises:
      ValueError: a ``val_fraction`` that disagrees with the file's rows.
    """
    meta = load_partition_meta(path)
    has_val = any(len(val) for _, val, _ in triples)
    _check_file_val(path, has_val, meta, val_fraction, label or (lambda name: name))
    if has_val or val_fraction == 0:
        return list(triples)
    seed = meta.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        seed = 0
    return split_validation([(tr, te) for tr, _, te in triples], val_fraction, seed)
