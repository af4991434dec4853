"""Data: sources → partition → per-client train/test split (→ validation rows carved
from the training rows) → padded or ragged ``FederatedData``.

``make_federated_data`` runs the whole pipeline; the pieces are exported for custom use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedjax_sim.checks import check_float, check_seed
from fedjax_sim.data import partition as _partition
from fedjax_sim.data.federated import (
    LAYOUTS,
    FederatedData,
    RaggedFederatedData,
    build_federated,
    build_layout,
    build_ragged,
    check_federated_data,
    check_layout,
    ragged_from_clients,
)
from fedjax_sim.data.partition import (
    EVAL_SPLITS,
    MAX_DIRICHLET_DRAWS,
    PARTITIONS,
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
    load_partition_meta,
    partition_indices,
    save_partition,
    split_validation,
    train_test_split,
)
from fedjax_sim.data.sources import (
    NPZ_PREFIX,
    SOURCE_OPTIONS,
    SOURCES,
    Pooled,
    check_source,
    has_natural_ids,
    is_source,
    known_size,
    load_npz,
    load_source,
    make_synthetic,
    pooled_from_arrays,
    register_source,
    unregister_source,
)

__all__ = [
    "DEFAULT_NUM_CLIENTS",
    "EVAL_SPLITS",
    "LAYOUTS",
    "MAX_DIRICHLET_DRAWS",
    "NPZ_PREFIX",
    "PARTITIONS",
    "SOURCES",
    "SOURCE_OPTIONS",
    "VAL_META",
    "FederatedData",
    "Pooled",
    "RaggedFederatedData",
    "build_federated",
    "build_layout",
    "build_ragged",
    "check_federated_data",
    "check_layout",
    "check_partition_file",
    "check_partition_val",
    "check_splits",
    "check_val_fraction",
    "check_val_rows",
    "eval_splits",
    "file_validation",
    "is_source",
    "load_npz",
    "load_partition",
    "load_partition_meta",
    "load_source",
    "make_federated_data",
    "make_synthetic",
    "partition_indices",
    "pooled_from_arrays",
    "ragged_from_clients",
    "register_source",
    "save_partition",
    "split_hints",
    "split_validation",
    "train_test_split",
    "unregister_source",
]


# Clients drawn when ``num_clients`` is not given (a partition file sets its own count).
DEFAULT_NUM_CLIENTS = 20


def split_hints(*, num_clients: int, min_samples: int, test_ratio: float) -> dict[str, str]:
    """What to change when a drawn partition leaves a client without train or test data
    (the ``hints`` of ``check_splits``)."""
    return {
        "empty": f"lower num_clients (now {num_clients}) or raise min_samples (now "
                 f"{min_samples})",
        "train": f"lower test_ratio (now {test_ratio}) or raise min_samples (now "
                 f"{min_samples})",
        "test": f"raise test_ratio (now {test_ratio}) or min_samples (now {min_samples}), "
                f"or lower num_clients (now {num_clients})",
    }


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


def _no_natural_ids(dataset: str) -> ValueError:
    return ValueError(
        f"partition='natural' needs a data set with natural client ids (synthetic, an "
        f"npz:PATH file with a 'client' array, or a registered source that gives them); "
        f"{dataset!r} has none")


def _check_natural_sizes(dataset: str, pooled: Pooled, num_clients: int,
                         min_samples: int) -> None:
    """Refuses natural clients (the first ``num_clients`` ids) with fewer than
    ``min_samples`` examples."""
    sizes = np.bincount(pooled.groups)
    small = [g for g in range(min(num_clients, sizes.size)) if sizes[g] < min_samples]
    if small:
        names = pooled.group_ids if pooled.group_ids is not None else np.arange(sizes.size)
        shown = ", ".join(f"{names[g]!s} ({sizes[g]})" for g in small[:5])
        more = f" and {len(small) - 5} more" if len(small) > 5 else ""
        raise ValueError(
            f"dataset {dataset}: {len(small)} natural client(s) have fewer than min_samples="
            f"{min_samples} examples, client id (examples): {shown}{more}; every client "
            "needs min_samples (at least 2: one train and one test example): lower "
            "min_samples, merge or drop those clients, or use another partition")


def _check_data_memory(dataset: str, options: dict, *, layout: str, **settings: Any) -> None:
    """Refuses (exit 5) data whose source and federated arrays would not fit in host
    memory, from the generator's parameters or the source's known size, before anything
    is generated or loaded."""
    from fedjax_sim.data.scale import estimate_source_bytes
    from fedjax_sim.safety import check_host_memory

    found = estimate_source_bytes(dataset, options, layout=layout, **settings)
    if found is None:
        return
    estimate = found[1]
    advice = "lower --num-clients"
    if estimate.layout == "padded":
        advice += " or use --data-layout ragged (memory of the examples alone)"
    check_host_memory(
        {"source": estimate.source_bytes, f"{estimate.layout} client data": estimate.data_bytes},
        what=f"dataset {dataset} with {settings['partition']} clients", advice=advice)


def make_federated_data(
    dataset: str = "digits",
    *,
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
    save_partition: str | os.PathLike | None = None,
    source_options: Mapping[str, Any] | None = None,
    layout: str = "auto",
    val_fraction: float = 0.0,
    eval_split: str = "test",
) -> tuple[FederatedData | RaggedFederatedData, list[tuple[np.ndarray, np.ndarray]], Pooled]:
    """Loads a data set, partitions it over clients and pads it into ``FederatedData``.

    Every argument is checked before any data is read. The pooled data set does not depend
    on ``seed`` (generated sources take theirs from ``source_options``); the partition and
    the train/test split are drawn from ``np.random.default_rng(seed)``, so equal arguments
    give equal results. With ``val_fraction > 0`` every client's validation rows are then
    carved from its training rows (``split_validation``, a stream of ``seed`` of its own,
    so the partition and the train/test split stay as they are) and left out of training,
    whichever rows the run evaluates on.

    Args:
      dataset: one of ``SOURCES``: a built-in or registered source, or ``npz:PATH``.
      partition: one of ``PARTITIONS`` (see ``partition_indices``). With ``natural`` on
        ``synthetic``, the generator makes ``num_clients`` clients unless
        ``source_options`` says otherwise; on other sources with client ids (an npz file's
        ``client``), one client per id, each with at least ``min_samples`` examples.
      num_clients: number of clients K (default ``DEFAULT_NUM_CLIENTS``, 20; with
        ``natural`` on a source other than synthetic, every id). With
        ``partition_file``, the file's client count, which a given value must equal.
      alpha: Dirichlet concentration, a finite number > 0 (``dirichlet``).
      min_samples: fewest samples per client before the train/test split, >= 2 so that
        every client has both a train and a test example.
      shards_per_client: shards per client (``shards``).
      classes_per_client: labels per client (``classes``).
      test_ratio: share of each client's samples held out for its test set, in (0, 1).
      seed: seed of the partition and the split, an integer >= 0 and < 2**32.
      data_dir: tfds data directory (tfds sources).
      partition_file: read the clients' train/test indices from this file (written by
        ``save_partition``) instead of drawing them; ``partition``, ``alpha``,
        ``min_samples``, ``shards_per_client``, ``classes_per_client``, ``test_ratio``
        and ``seed`` are then not used.
      save_partition: write the clients' train/test indices and the settings to this file.
      source_options: keyword options for ``load_source`` (e.g. ``{"num_samples": 2000}``
        for mnist1d, ``{"alpha": 0.5, "beta": 0.5}`` for synthetic).
      layout: ``padded`` (K, N_max, ...) arrays, ``ragged`` pooled arrays with per-client
        offsets (memory of the examples alone), or ``auto`` (``federated.choose_layout``:
        padded while it costs little beyond the examples). Both give the same floats.
      val_fraction: share of each client's training rows held out as its validation rows,
        in [0, 1) (``split_validation``: ``floor(n_train * val_fraction)``, at least one
        when n_train >= 2, never the last training row); 0 gives the data of old, bit for
        bit. With ``partition_file``, ``file_validation`` says how it meets the file's
        rows; ``save_partition`` stores the rows as ``"val"`` lists.
      eval_split: the rows in the data's test slot: ``test`` (the clients' test rows) or
        ``val`` (their validation rows, for choosing hyperparameters without the test
        rows; needs ``val_fraction > 0``). Training leaves the validation rows out either
        way.

    Returns:
      ``(data, splits, pooled)``: the padded per-client arrays, per client the
      ``(train, test)`` indices into ``pooled`` that the data holds (with
      ``eval_split="val"``, ``test`` holds the validation rows), and the pooled data set.

    Raises:
      ValueError: a bad argument (the message names it and its allowed range; floats
        must also be finite); a missing, unreadable or malformed partition file, or one
        that does not fit the data set or ``num_clients``; a client left without train or
        test examples; data that fails ``check_federated_data`` (e.g. labels outside
        ``[0, num_classes)``).
      FileNotFoundError: a tfds data set that is not prepared under ``data_dir``.
    """
    if source_options is not None and not isinstance(source_options, Mapping):
        raise ValueError(f"source_options must be a dict, got {type(source_options).__name__}")
    options = dict(source_options or {})
    check_source(dataset, options)
    _check_scheme(partition)
    if num_clients is not None:
        _check_int("num_clients", num_clients, 1)
    drawn_clients = DEFAULT_NUM_CLIENTS if num_clients is None else num_clients
    _check_positive("alpha", alpha)
    _check_int("min_samples", min_samples, 2)
    _check_int("shards_per_client", shards_per_client, 1)
    _check_int("classes_per_client", classes_per_client, 1)
    check_float("test_ratio", test_ratio, 0.0, 1.0, low_open=True, high_open=True)
    check_seed("seed", seed)
    check_layout(layout)
    val_fraction = check_val_fraction(val_fraction, eval_split)
    if partition_file is not None:
        check_partition_file(partition_file)
        check_partition_val(partition_file, val_fraction)

    feasibility = dict(
        partition=partition,
        num_clients=drawn_clients,
        min_samples=min_samples,
        shards_per_client=shards_per_client,
        classes_per_client=classes_per_client,
    )
    if partition_file is None:
        if partition == "natural":
            if has_natural_ids(dataset) is False:
                raise _no_natural_ids(dataset)
            if dataset == "synthetic":
                options.setdefault("num_clients", drawn_clients)
        size = known_size(dataset, options)
        if size is not None:
            _check_feasible(dataset, *size, **feasibility)

    if partition_file is None:
        _check_data_memory(dataset, options, partition=partition, num_clients=num_clients,
                           test_ratio=test_ratio, layout=layout, min_samples=min_samples,
                           shards_per_client=shards_per_client)
    pooled = load_source(dataset, data_dir=data_dir, **options)
    if partition_file is None and partition == "natural":
        if pooled.groups is None:
            raise _no_natural_ids(dataset)
        if num_clients is None:  # every natural client
            drawn_clients = feasibility["num_clients"] = int(np.unique(pooled.groups).size)
        _check_natural_sizes(dataset, pooled, drawn_clients, min_samples)
    if partition_file is not None:
        meta = load_partition_meta(partition_file)
        for key, expected in (("dataset", dataset), ("num_samples", pooled.num_samples)):
            if key in meta and meta[key] != expected:
                raise ValueError(
                    f"partition file {os.fspath(partition_file)} was made for {key}="
                    f"{meta[key]!r}, not {expected!r}"
                )
        triples = file_validation(partition_file, load_partition(
            partition_file, pooled.num_samples, num_clients=num_clients, with_val=True),
            val_fraction)
    else:
        _check_feasible(dataset, pooled.num_samples, pooled.num_classes, **feasibility)
        rng = np.random.default_rng(seed)
        clients = partition_indices(
            pooled.y,
            drawn_clients,
            partition,
            rng=rng,
            alpha=alpha,
            min_samples=min_samples,
            shards_per_client=shards_per_client,
            classes_per_client=classes_per_client,
            groups=pooled.groups,
        )
        splits = train_test_split(clients, test_ratio, rng)
        check_splits(splits, source=f"the {partition!r} partition", hints=split_hints(
            num_clients=drawn_clients, min_samples=min_samples, test_ratio=test_ratio))
        triples = split_validation(splits, val_fraction, seed)
    source = (f"partition file {os.fspath(partition_file)}" if partition_file is not None
              else f"the {partition!r} partition")
    if eval_split == "val":
        check_val_rows(triples, source=source, val_fraction=val_fraction)
    splits = eval_splits(triples, eval_split)

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
                num_clients=drawn_clients,
                alpha=alpha,
                min_samples=min_samples,
                shards_per_client=shards_per_client,
                classes_per_client=classes_per_client,
                test_ratio=test_ratio,
                seed=seed,
            )
        else:
            meta["copied_from"] = os.fspath(partition_file)
        if val_fraction > 0:
            meta[VAL_META] = val_fraction
        _partition.save_partition(save_partition, triples, **meta)

    return check_federated_data(build_layout(pooled, splits, layout)), splits, pooled
