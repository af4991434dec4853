"""Data: sources → partition → per-client train/test split → padded ``FederatedData``.

``make_federated_data`` runs the whole pipeline; the pieces are exported for custom use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedjax_sim.checks import check_float, check_seed
from fedjax_sim.data import partition as _partition
from fedjax_sim.data.federated import FederatedData, build_federated
from fedjax_sim.data.partition import (
    MAX_DIRICHLET_DRAWS,
    PARTITIONS,
    _check_int,
    _check_positive,
    _check_scheme,
    check_partition_file,
    load_partition,
    load_partition_meta,
    partition_indices,
    save_partition,
    train_test_split,
)
from fedjax_sim.data.sources import (
    SOURCE_OPTIONS,
    SOURCES,
    Pooled,
    check_source,
    known_size,
    load_source,
    make_synthetic,
)

__all__ = [
    "MAX_DIRICHLET_DRAWS",
    "PARTITIONS",
    "SOURCES",
    "SOURCE_OPTIONS",
    "FederatedData",
    "Pooled",
    "build_federated",
    "check_partition_file",
    "load_partition",
    "load_partition_meta",
    "load_source",
    "make_federated_data",
    "make_synthetic",
    "partition_indices",
    "save_partition",
    "train_test_split",
]


def _check_feasible(
    dataset: str,
    num_samples: int,
    num_classes: int,
    *,
    partition: str,
    num_clients: int,
    min_samples: int,
    shards_per_client: int,
    classes_per_client: int,
) -> None:
    """Refuses settings that cannot be met by a data set of this size."""
    if partition != "natural" and num_samples < num_clients * min_samples:
        raise ValueError(
            f"num_clients={num_clients} needs at least {num_clients}*min_samples="
            f"{num_clients * min_samples} samples but {dataset} has {num_samples}"
        )
    if partition == "shards" and num_clients * shards_per_client > num_samples:
        raise ValueError(
            f"num_clients*shards_per_client={num_clients * shards_per_client} shards do not "
            f"fit in the {num_samples} samples of {dataset}"
        )
    if partition == "classes" and classes_per_client > num_classes:
        raise ValueError(
            f"classes_per_client must be <= the number of classes of {dataset} "
            f"({num_classes}), got {classes_per_client}"
        )


def make_federated_data(
    dataset: str = "digits",
    *,
    partition: str = "dirichlet",
    num_clients: int = 20,
    alpha: float = 0.1,
    min_samples: int = 10,
    shards_per_client: int = 2,
    classes_per_client: int = 2,
    test_ratio: float = 0.25,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    partition_file: str | os.PathLike | None = None,
    save_partition: str | os.PathLike | None = None,
    source_options: Mapping[str, Any] | None = None,
) -> tuple[FederatedData, list[tuple[np.ndarray, np.ndarray]], Pooled]:
    """Loads a data set, partitions it over clients and pads it into ``FederatedData``.

    Every argument is checked before any data is read. The pooled data set does not depend
    on ``seed`` (generated sources take theirs from ``source_options``); the partition and
    the train/test split are drawn from ``np.random.default_rng(seed)``, so equal arguments
    give equal results.

    Args:
      dataset: one of ``SOURCES``.
      partition: one of ``PARTITIONS`` (see ``partition_indices``). With ``natural`` on
        ``synthetic``, the generator makes ``num_clients`` clients unless
        ``source_options`` says otherwise.
      num_clients: number of clients K.
      alpha: Dirichlet concentration, a finite number > 0 (``dirichlet``).
      min_samples: fewest samples per client before the train/test split, >= 2 so that
        every client has both a train and a test example.
      shards_per_client: shards per client (``shards``).
      classes_per_client: labels per client (``classes``).
      test_ratio: share of each client's samples held out for its test set, in (0, 1).
      seed: seed of the partition and the split, an integer >= 0 and < 2**32.
      data_dir: tfds data directory (tfds sources).
      partition_file: read the clients' train/test indices from this file (written by
        ``save_partition``) instead of drawing them; ``partition``, ``num_clients``,
        ``alpha``, ``min_samples``, ``shards_per_client``, ``classes_per_client``,
        ``test_ratio`` and ``seed`` are then not used.
      save_partition: write the clients' train/test indices and the settings to this file.
      source_options: keyword options for ``load_source`` (e.g. ``{"num_samples": 2000}``
        for mnist1d, ``{"alpha": 0.5, "beta": 0.5}`` for synthetic).

    Returns:
      ``(data, splits, pooled)``: the padded per-client arrays, per client the
      ``(train, test)`` indices into ``pooled``, and the pooled data set.

    Raises:
      ValueError: a bad argument (the message names it and its allowed range; floats
        must also be finite), a missing, unreadable or malformed partition file, or one
        that does not fit the data set.
      FileNotFoundError: a tfds data set that is not prepared under ``data_dir``.
    """
    if source_options is not None and not isinstance(source_options, Mapping):
        raise ValueError(f"source_options must be a dict, got {type(source_options).__name__}")
    options = dict(source_options or {})
    check_source(dataset, options)
    _check_scheme(partition)
    _check_int("num_clients", num_clients, 1)
    _check_positive("alpha", alpha)
    _check_int("min_samples", min_samples, 2)
    _check_int("shards_per_client", shards_per_client, 1)
    _check_int("classes_per_client", classes_per_client, 1)
    check_float("test_ratio", test_ratio, 0.0, 1.0, low_open=True, high_open=True)
    check_seed("seed", seed)
    if partition_file is not None:
        check_partition_file(partition_file)

    feasibility = dict(
        partition=partition,
        num_clients=num_clients,
        min_samples=min_samples,
        shards_per_client=shards_per_client,
        classes_per_client=classes_per_client,
    )
    if partition_file is None:
        if partition == "natural":
            if dataset != "synthetic":
                raise ValueError(
                    f"partition='natural' needs a data set with natural client ids "
                    f"(synthetic); {dataset!r} has none"
                )
            options.setdefault("num_clients", num_clients)
        size = known_size(dataset, options)
        if size is not None:
            _check_feasible(dataset, *size, **feasibility)

    pooled = load_source(dataset, data_dir=data_dir, **options)
    if partition_file is not None:
        meta = load_partition_meta(partition_file)
        for key, expected in (("dataset", dataset), ("num_samples", pooled.num_samples)):
            if key in meta and meta[key] != expected:
                raise ValueError(
                    f"partition file {os.fspath(partition_file)} was made for {key}="
                    f"{meta[key]!r}, not {expected!r}"
                )
        splits = load_partition(partition_file, pooled.num_samples)
    else:
        _check_feasible(dataset, pooled.num_samples, pooled.num_classes, **feasibility)
        rng = np.random.default_rng(seed)
        clients = partition_indices(
            pooled.y,
            num_clients,
            partition,
            rng=rng,
            alpha=alpha,
            min_samples=min_samples,
            shards_per_client=shards_per_client,
            classes_per_client=classes_per_client,
            groups=pooled.groups,
        )
        splits = train_test_split(clients, test_ratio, rng)

    if save_partition is not None:
        meta = dict(
            dataset=dataset,
            name=pooled.name,
            num_samples=pooled.num_samples,
            source_options=options,
        )
        if partition_file is None:
            meta.update(
                partition=partition,
                num_clients=num_clients,
                alpha=alpha,
                min_samples=min_samples,
                shards_per_client=shards_per_client,
                classes_per_client=classes_per_client,
                test_ratio=test_ratio,
                seed=seed,
            )
        else:
            meta["copied_from"] = os.fspath(partition_file)
        _partition.save_partition(save_partition, splits, **meta)

    return build_federated(pooled, splits), splits, pooled
