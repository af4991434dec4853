"""Public data for federated distillation: a shared set every client can predict on.

Distillation methods (DS-FL, FedMD, FCCL, FedDF) exchange predictions on a public set
instead of weights. The public set is either held out of the pooled data set before it is
partitioned (``public_fraction``), so that no client owns any of it, or taken from another
source with the same input shape (``public_dataset``). A small labeled server validation
split (``val_fraction``, FedDF's early stopping) can be held out of the pool as well.

``PublicData`` reaches an algorithm as an argument of its factory
(``algorithms.make(name, model, public=...)``); labels are carried along but only FedMD's
transfer learning reads them, the other methods treat the set as unlabeled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import struct

from fedjax_sim.checks import check_float, check_seed
from fedjax_sim.data.federated import (
    FederatedData,
    build_layout,
    check_federated_data,
    check_layout,
    host_inputs,
)
from fedjax_sim.data.partition import (
    VAL_META,
    _check_int,
    _check_positive,
    _check_scheme,
    check_partition_file,
    check_partition_val,
    check_splits,
    check_val_fraction,
    check_val_rows,
    eval_splits,
    file_validation,
    load_partition,
    partition_indices,
    save_partition,
    split_validation,
    train_test_split,
)
from fedjax_sim.data.sources import Pooled, check_source, known_size, load_source


@struct.dataclass
class PublicData:
    """A public set shared by all clients, and an optional labeled server validation split.

    Attributes:
      x: (N, *input_shape) float32 public inputs.
      y: (N,) int32 labels, or None for an unlabeled set.
      val_x: (V, *input_shape) float32 server validation inputs (V may be 0).
      val_y: (V,) int32 server validation labels.
      name: where the public set came from (static).
    """

    x: jax.Array
    y: jax.Array | None
    val_x: jax.Array
    val_y: jax.Array
    name: str = struct.field(pytree_node=False, default="public")

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_val(self) -> int:
        return int(self.val_x.shape[0])


def as_public(
    x: Any,
    y: Any = None,
    *,
    val_x: Any = None,
    val_y: Any = None,
    name: str = "public",
) -> PublicData:
    """Wraps arrays as ``PublicData`` (float32 inputs, int32 labels).

    Args:
      x: (N, *input_shape) public inputs.
      y: (N,) labels or None.
      val_x, val_y: server validation split, both or neither.
      name: a label for reports.

    Raises:
      ValueError: shapes that do not line up, or non-finite inputs.
    """
    x = np.asarray(x, np.float32)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"public x must have shape (N, *input_shape) with N >= 1, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("public x holds NaN or infinite values")
    if y is not None:
        y = _labels("public y", y, x.shape[0])
    if (val_x is None) != (val_y is None):
        raise ValueError("val_x and val_y must be given together")
    if val_x is None:
        val_x = np.zeros((0, *x.shape[1:]), np.float32)
        val_y = np.zeros((0,), np.int32)
    else:
        val_x = np.asarray(val_x, np.float32)
        if val_x.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"val_x input shape {val_x.shape[1:]} differs from public x {x.shape[1:]}"
            )
        if not np.all(np.isfinite(val_x)):
            raise ValueError("val_x holds NaN or infinite values")
        val_y = _labels("val_y", val_y, val_x.shape[0])
    return PublicData(x=x, y=y, val_x=val_x, val_y=val_y, name=str(name))


def _labels(what: str, y: Any, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} must hold integer labels, got dtype {y.dtype}")
    return y.astype(np.int32)


def check_public(
    public: Any,
    *,
    algorithm: str,
    input_shape: Sequence[int],
    num_classes: int,
    batch: int | None = None,
    batch_name: str = "public_batch",
    need_labels: bool = False,
    need_val: bool = False,
) -> PublicData:
    """Validates the public data handed to a distillation algorithm, before any compiling.

    Args:
      public: a ``PublicData`` (``as_public`` builds one from arrays).
      algorithm: the algorithm's name, for messages.
      input_shape: what the model(s) take.
      num_classes: the models' number of classes (labels must lie in [0, num_classes)).
      batch: public examples the algorithm draws at once; must not exceed the set.
      batch_name: the hyperparameter that set ``batch``, for messages.
      need_labels: the algorithm reads ``public.y``.
      need_val: the algorithm needs a non-empty validation split.

    Returns:
      ``public``.

    Raises:
      ValueError: naming the offending parameter.
    """
    if public is None:
        raise ValueError(
            f"{algorithm} needs public data: pass public=PublicData(...) (see "
            "fedjax_sim.data.public), or --public-fraction / --public-dataset on the "
            "command line"
        )
    if not isinstance(public, PublicData):
        raise ValueError(
            f"{algorithm}: public must be a PublicData (fedjax_sim.data.public.as_public "
            f"builds one from arrays), got {type(public).__name__}"
        )
    if tuple(public.input_shape) != tuple(input_shape):
        raise ValueError(
            f"{algorithm}: public data has input shape {tuple(public.input_shape)} but the "
            f"model takes {tuple(input_shape)}"
        )
    if batch is not None and batch > public.num_samples:
        raise ValueError(
            f"{batch_name} must be <= the public set size ({public.num_samples}), got {batch}"
        )
    if need_labels:
        if public.y is None:
            raise ValueError(f"{algorithm} needs labeled public data (public.y is None)")
        y = np.asarray(public.y)
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"{algorithm}: public labels must lie in [0, {num_classes}), got range "
                f"[{y.min()}, {y.max()}]"
            )
    if need_val and public.num_val == 0:
        raise ValueError(f"{algorithm} needs a server validation split (public.val_x is empty)")
    if public.num_val:
        vy = np.asarray(public.val_y)
        if vy.min() < 0 or vy.max() >= num_classes:
            raise ValueError(
                f"{algorithm}: validation labels must lie in [0, {num_classes}), got range "
                f"[{vy.min()}, {vy.max()}]"
            )
    return public


def check_public_matches(public: PublicData, data: FederatedData, algorithm: str) -> None:
    """Raises ValueError when the private data's input shape differs from the public set's."""
    if tuple(data.input_shape) != tuple(public.input_shape):
        raise ValueError(
            f"{algorithm}: private data has input shape {tuple(data.input_shape)} but the "
            f"public data has {tuple(public.input_shape)}"
        )


def _check_fraction(name: str, value: Any, *, allow_zero: bool) -> float:
    return check_float(name, value, 0.0, 1.0, low_open=not allow_zero, high_open=True)


def hold_out(
    num_samples: int, *, public_fraction: float, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random disjoint public, validation and private index sets of a pool.

    ``round(public_fraction * N)`` indices go to the public set and
    ``round(val_fraction * N)`` to the validation split; the rest stays private. The draw
    uses its own stream of ``seed``, independent of the partition's.

    Returns:
      ``(public, val, private)`` sorted int64 index arrays.
    """
    rng = np.random.default_rng([int(seed), 0x9B1C])
    perm = rng.permutation(num_samples)
    n_public = round(public_fraction * num_samples)
    n_val = round(val_fraction * num_samples)
    public = np.sort(perm[:n_public])
    val = np.sort(perm[n_public:n_public + n_val])
    private = np.sort(perm[n_public + n_val:])
    return public, val, private


def make_federated_data_with_public(
    dataset: str = "digits",
    *,
    public_fraction: float | None = None,
    public_dataset: str | None = None,
    public_size: int | None = None,
    val_fraction: float = 0.0,
    partition: str = "dirichlet",
    num_clients: int | None = None,
    alpha: float = 0.1,
    min_samples: int = 10,
    shards_per_client: int = 2,
    classes_per_client: int = 2,
    test_ratio: float = 0.25,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    partition_file: str | os.PathLike | None = None,
    save_partition_to: str | os.PathLike | None = None,
    source_options: Mapping[str, Any] | None = None,
    public_source_options: Mapping[str, Any] | None = None,
    layout: str = "auto",
    client_val_fraction: float = 0.0,
    eval_split: str = "test",
) -> tuple[FederatedData, PublicData, list[tuple[np.ndarray, np.ndarray]], Pooled]:
    """``make_federated_data`` with a public set and a server validation split held out.

    Exactly one of ``public_fraction`` (hold out that share of the pool, before
    partitioning) and ``public_dataset`` (all of another source, or ``public_size`` random
    examples of it) must be given. ``val_fraction`` of the pool is held out too, as a
    labeled validation split on the server. Everything else is partitioned as
    ``make_federated_data`` does, with the same arguments; the client splits index the
    full pool, so partition files stay indices into the source's canonical order.

    Args:
      dataset: the private data set (one of ``SOURCES``).
      public_fraction: share of the pool held out as public data, in (0, 1).
      public_dataset: a source with the same input shape as ``dataset``.
      public_size: with ``public_dataset``, how many of its examples to use (default all).
      val_fraction: share of the pool held out as the server validation split, in [0, 1).
      partition, num_clients, alpha, min_samples, shards_per_client, classes_per_client,
      test_ratio, seed, data_dir, source_options: as in ``make_federated_data``.
      partition_file: read the client splits from this file; they must not touch the
        held-out indices.
      save_partition_to: write the client splits (and the held-out indices) to this file.
      public_source_options: options of ``public_dataset``'s loader.
      layout: the client data's layout, as in ``make_federated_data``.
      client_val_fraction, eval_split: the clients' own validation rows and the rows a run
        evaluates on: ``make_federated_data``'s ``val_fraction`` and ``eval_split`` (named
        so apart from ``val_fraction``, the server's split here).

    Returns:
      ``(data, public, splits, pooled)``.

    Raises:
      ValueError: a bad argument, named in the message; a partition file that is
        malformed or does not fit; a client without train or test examples; data that
        fails ``check_federated_data``.
    """
    if (public_fraction is None) == (public_dataset is None):
        raise ValueError("give exactly one of public_fraction and public_dataset")
    options = dict(source_options or {})
    check_source(dataset, options)
    if public_fraction is not None:
        public_fraction = _check_fraction("public_fraction", public_fraction, allow_zero=False)
        if public_size is not None:
            raise ValueError("public_size applies only with public_dataset")
    val_fraction = _check_fraction("val_fraction", val_fraction, allow_zero=True)
    if (public_fraction or 0.0) + val_fraction >= 1.0:
        raise ValueError(
            f"public_fraction + val_fraction must be < 1, got {public_fraction} + {val_fraction}"
        )
    public_options = dict(public_source_options or {})
    check_layout(layout)
    client_val_fraction = check_val_fraction(
        client_val_fraction, eval_split,
        label=lambda name: "client_val_fraction" if name == "val_fraction" else name)
    if public_dataset is not None:
        check_source(public_dataset, public_options)
        if public_dataset == dataset and public_options == options:
            raise ValueError(
                f"public_dataset {public_dataset!r} is the private data set itself; use "
                "public_fraction to hold part of it out"
            )
        if public_size is not None:
            _check_int("public_size", public_size, 1)
    _check_scheme(partition)
    if partition == "natural":
        raise ValueError("partition='natural' is not supported together with public data")
    from fedjax_sim.data import DEFAULT_NUM_CLIENTS, _check_feasible, split_hints

    if num_clients is not None:
        _check_int("num_clients", num_clients, 1)
    drawn_clients = DEFAULT_NUM_CLIENTS if num_clients is None else num_clients
    _check_positive("alpha", alpha)
    _check_int("min_samples", min_samples, 2)
    _check_int("shards_per_client", shards_per_client, 1)
    _check_int("classes_per_client", classes_per_client, 1)
    _check_fraction("test_ratio", test_ratio, allow_zero=False)
    check_seed("seed", seed)
    if partition_file is not None:
        check_partition_file(partition_file)
        check_partition_val(partition_file, client_val_fraction)

    feasibility = dict(
        partition=partition,
        num_clients=drawn_clients,
        min_samples=min_samples,
        shards_per_client=shards_per_client,
        classes_per_client=classes_per_client,
    )
    size = known_size(dataset, options)
    if size is not None and partition_file is None:
        kept = size[0] - round((public_fraction or 0.0) * size[0]) - round(val_fraction * size[0])
        _check_feasible(dataset, kept, size[1], **feasibility)

    pooled = load_source(dataset, data_dir=data_dir, **options)
    n = pooled.num_samples
    public_idx, val_idx, private_idx = hold_out(
        n, public_fraction=public_fraction or 0.0, val_fraction=val_fraction, seed=seed
    )
    if public_dataset is not None:
        other = load_source(public_dataset, data_dir=data_dir, **public_options)
        if other.x.shape[1:] != pooled.x.shape[1:]:
            raise ValueError(
                f"public_dataset {public_dataset!r} has input shape {other.x.shape[1:]} but "
                f"{dataset!r} has {pooled.x.shape[1:]}"
            )
        take = np.arange(other.num_samples)
        if public_size is not None:
            if public_size > other.num_samples:
                raise ValueError(
                    f"public_size must be <= the {other.num_samples} examples of "
                    f"{public_dataset!r}, got {public_size}"
                )
            rng = np.random.default_rng([int(seed), 0x9B1D])
            take = np.sort(rng.choice(other.num_samples, public_size, replace=False))
        public_x, public_y, public_name = host_inputs(other.x[take]), other.y[take], other.name
    else:
        public_x, public_y = host_inputs(pooled.x[public_idx]), pooled.y[public_idx]
        public_name = f"{pooled.name} (held out {public_fraction:g})"

    held = np.concatenate([public_idx, val_idx])
    if partition_file is not None:
        triples = file_validation(partition_file, load_partition(
            partition_file, n, num_clients=num_clients, with_val=True), client_val_fraction)
        used = np.concatenate([np.concatenate(split) for split in triples])
        clash = np.intersect1d(used, held)
        if clash.size:
            raise ValueError(
                f"partition file {os.fspath(partition_file)} gives held-out public or "
                f"validation index {clash[0]} to a client (public_fraction={public_fraction}, "
                f"val_fraction={val_fraction}, seed={seed})"
            )
    else:
        _check_feasible(dataset, private_idx.size, pooled.num_classes, **feasibility)
        rng = np.random.default_rng(seed)
        clients = partition_indices(
            pooled.y[private_idx], drawn_clients, partition, rng=rng, alpha=alpha,
            min_samples=min_samples, shards_per_client=shards_per_client,
            classes_per_client=classes_per_client,
        )
        local = train_test_split(clients, test_ratio, rng)
        check_splits(local, source=f"the {partition!r} partition", hints=split_hints(
            num_clients=drawn_clients, min_samples=min_samples, test_ratio=test_ratio))
        splits = [(private_idx[tr], private_idx[te]) for tr, te in local]
        triples = split_validation(splits, client_val_fraction, seed)
    if eval_split == "val":
        source = (f"partition file {os.fspath(partition_file)}" if partition_file is not None
                  else f"the {partition!r} partition")
        check_val_rows(triples, source=source, val_fraction=client_val_fraction)
    splits = eval_splits(triples, eval_split)

    if save_partition_to is not None:
        meta = {VAL_META: client_val_fraction} if client_val_fraction > 0 else {}
        save_partition(
            save_partition_to, triples, dataset=dataset, name=pooled.name, num_samples=n,
            source_options=options, partition=partition, num_clients=len(splits), alpha=alpha,
            min_samples=min_samples, shards_per_client=shards_per_client,
            classes_per_client=classes_per_client, test_ratio=test_ratio, seed=seed,
            public_fraction=public_fraction, public_dataset=public_dataset,
            val_fraction=val_fraction, public_indices=public_idx, val_indices=val_idx, **meta,
        )

    public = as_public(public_x, public_y, val_x=host_inputs(pooled.x[val_idx]),
                       val_y=pooled.y[val_idx], name=public_name)
    return check_federated_data(build_layout(pooled, splits, layout)), public, splits, pooled


__all__ = [
    "PublicData",
    "as_public",
    "check_public",
    "check_public_matches",
    "hold_out",
    "make_federated_data_with_public",
]
