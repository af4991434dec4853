"""The size of federated data before it is built, and scale stand-ins built in O(examples).

Three things, none of which allocates more than it reports:

* :func:`data_bytes`: the resident bytes of the padded (K, N_max, ...) layout or of the
  ragged (pooled, per-client offsets) layout, from the per-client counts alone.
* :func:`synthetic_counts` and :func:`estimate_source_bytes`: per-client counts and bytes
  of the offline sources whose size is known beforehand (``digits``, ``mnist1d``,
  ``synthetic``), so that a run can compare them with the memory it has
  (:func:`fedjax_sim.safety.check_memory`) before generating or padding anything.
* :func:`stand_in`: data sets with the client count and the client-size distribution of
  FEMNIST (LEAF) and Stack Overflow (TFF), random content in the stored dtype (uint8
  images, int32 tokens), generated chunk by chunk straight into the preallocated pooled
  arrays of a :class:`~fedjax_sim.data.federated.RaggedFederatedData`.
  :func:`stand_in_counts` gives their sizes only.

Client sizes of the stand-ins are ``round(X)`` with ``X ~ LogNormal(mu, sigma)`` (natural
log), clipped below (every client keeps at least one train and one test example) and
optionally capped; ``mu`` and ``sigma`` come from the published mean ``m`` and standard
deviation ``s`` per client by moment matching: ``sigma^2 = ln(1 + s^2 / m^2)``,
``mu = ln(m) - sigma^2 / 2``. Where only the mean is published, ``sigma`` is an assumption
and says so (:data:`STAND_INS`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fedjax_sim.data.federated import (
    PADDED_SLACK_BYTES,
    RaggedFederatedData,
    check_layout,
    choose_layout,
)
from fedjax_sim.data.sources import SOURCE_OPTIONS, known_size

# Label dtype of both layouts (int32 class ids or token ids, negative = pad token).
_LABEL_BYTES = 4
# Per-client int32 arrays: (offsets, counts) in the ragged layout, counts in the padded.
_INDEX_BYTES = 4

# Rows generated per chunk by the stand-ins: a few MB of temporaries, whatever the size.
_CHUNK_BYTES = 4 * 2**20


def _counts(values: Any, what: str) -> np.ndarray:
    counts = np.asarray(values, dtype=np.int64).reshape(-1)
    if counts.size == 0 or (counts < 0).any():
        raise ValueError(f"{what} must be one count >= 0 per client, at least one client")
    return counts


def data_bytes(train_counts: Any, test_counts: Any, input_shape: Sequence[int],
               input_dtype: Any, label_shape: Sequence[int] = (), *, layout: str) -> int:
    """Resident bytes of federated data with these per-client counts; nothing is allocated.

    ``padded`` (:class:`~fedjax_sim.data.federated.FederatedData`): per split, inputs
    (K, W, *input_shape) of ``input_dtype`` (``build_federated`` stores float32; pass
    what the arrays hold), int32 labels (K, W, *label_shape) and int32 counts (K,), with
    W = max(1, largest count). ``ragged`` (:class:`RaggedFederatedData`): per split,
    ``sum(counts) + W`` rows of inputs and labels (every pool ends with W zero rows) and
    int32 offsets and counts (K,). ``auto``: the layout
    :func:`~fedjax_sim.data.federated.choose_layout` picks for float32 examples, as
    ``build_layout`` does.

    Args:
      train_counts, test_counts: (K,) examples per client.
      input_shape: one example's input shape, e.g. (28, 28, 1).
      input_dtype: the stored input dtype (float32, uint8, int32).
      label_shape: one example's label shape: () for a class, (L,) for a token sequence.
      layout: ``padded``, ``ragged`` or ``auto``.

    Returns:
      The bytes of every array of the built object (Python ints, exact).
    """
    check_layout(layout)
    train, test = _counts(train_counts, "train_counts"), _counts(test_counts, "test_counts")
    if train.size != test.size:
        raise ValueError(f"train_counts and test_counts must have one entry per client, got "
                         f"{train.size} and {test.size}")
    x_bytes = math.prod(int(d) for d in input_shape) * np.dtype(input_dtype).itemsize
    y_bytes = math.prod(int(d) for d in label_shape) * _LABEL_BYTES
    if layout == "auto":
        layout = choose_layout(train, test, 4 * math.prod(int(d) for d in input_shape))
    k = int(train.size)
    total = 0
    for counts in (train, test):
        width = max(1, int(counts.max()))
        if layout == "padded":
            total += k * width * (x_bytes + y_bytes) + k * _INDEX_BYTES
        else:
            total += (int(counts.sum()) + width) * (x_bytes + y_bytes) + 2 * k * _INDEX_BYTES
    return total


def split_counts(sizes: Any, test_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` counts of clients of ``sizes`` examples, split as
    :func:`fedjax_sim.data.partition.train_test_split` splits them: ``floor(n *
    test_ratio)`` test examples clipped to [1, n - 1] (a client of one example keeps it
    for training)."""
    n = _counts(sizes, "sizes")
    test = np.minimum(np.maximum((n * float(test_ratio)).astype(np.int64), 1), n - 1)
    test = np.where(n >= 2, test, 0)
    return n - test, test


# --- The synthetic source -------------------------------------------------------------

def synthetic_counts(num_clients: int = 30, seed: int = 0, **options: Any) -> np.ndarray:
    """The per-client sample counts of ``make_synthetic(num_clients=..., seed=...)``,
    without generating an example: ``floor(LogNormal(4, 2)) + 50``, the generator's first
    draw from ``np.random.default_rng(seed)``.

    Args:
      num_clients: generator clients.
      seed: generator seed (``load_source`` uses 0 unless told otherwise).
      **options: the other options of the synthetic source (alpha, beta, dim, ...),
        accepted so that a source's options can be passed whole; they do not change the
        counts.

    Returns:
      (num_clients,) int64 counts, client 0 first (the pooled order).
    """
    unknown = sorted(set(options) - set(SOURCE_OPTIONS["synthetic"]))
    if unknown:
        raise ValueError(f"unknown synthetic option(s) {', '.join(unknown)}")
    if (isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer)
            or num_clients < 1):
        raise ValueError(f"synthetic num_clients must be an integer >= 1, got {num_clients!r}")
    rng = np.random.default_rng(seed)
    return rng.lognormal(4.0, 2.0, int(num_clients)).astype(np.int64) + 50


# (input shape, bytes per pooled example beside x: y int32 and, for synthetic, groups int64)
def _source_layout(dataset: str, options: Mapping[str, Any]) -> tuple[tuple[int, ...], int]:
    if dataset == "digits":
        return (8, 8, 1), 4
    if dataset == "mnist1d":
        return (40, 1), 4
    return (int(options.get("dim", 60)),), 4 + 8


class SizeEstimate(NamedTuple):
    """What :func:`estimate_source_bytes` found.

    Attributes:
      source_bytes: the pooled source (``Pooled``: float32 x, int32 y, int64 groups).
      data_bytes: the federated arrays in ``layout`` (exact when ``exact``, else an upper
        bound).
      layout: ``padded`` or ``ragged`` (what ``auto`` resolves to where it is known).
      exact: whether every client's size is known beforehand.
      test_counts: (K,) test examples per client, or None where not known.
    """

    source_bytes: int
    data_bytes: int
    layout: str
    exact: bool
    test_counts: np.ndarray | None = None


def estimate_source_bytes(dataset: str, options: Mapping[str, Any] | None = None, *,
                          partition: str, num_clients: int | None, test_ratio: float,
                          layout: str, min_samples: int = 10, shards_per_client: int = 2,
                          ) -> tuple[np.ndarray | None, SizeEstimate] | None:
    """Bytes of a source and of its federated arrays, before anything is loaded.

    For ``digits``, ``mnist1d`` and ``synthetic`` (the offline sources whose size is known
    beforehand); None for the others. The arguments are those of
    :func:`fedjax_sim.data.make_federated_data`.

    Client sizes are known exactly for ``natural`` on ``synthetic`` (the generator's
    counts, :func:`synthetic_counts`) and for ``iid`` (nearly equal parts); the split
    follows ``train_test_split``. For the drawn partitions (``dirichlet``, ``shards``,
    ``classes``) only the total is known: the estimate then bounds the largest client by
    ``N - (K - 1) * min_samples`` (``shards``: ``s * ceil(N / (K s))``), counts all N
    examples, and is an upper bound (``exact`` False); ``auto`` is then taken as the
    ragged bound plus the padded slack ``auto`` allows.

    Args:
      dataset: the source name.
      options: the source options (``num_samples`` of mnist1d; ``num_clients``, ``dim``,
        ``seed`` of synthetic).
      partition: one of ``PARTITIONS``.
      num_clients: K (None: 20, or with ``natural`` every generator client).
      test_ratio: share of each client's examples held out.
      layout: ``padded``, ``ragged`` or ``auto``.
      min_samples, shards_per_client: as in ``make_federated_data``.

    Returns:
      ``(train_counts, estimate)``: (K,) training examples per client (None where the
      partition draws them) and a :class:`SizeEstimate`; or None for a source whose size
      is not known beforehand.
    """
    check_layout(layout)
    options = dict(options or {})
    if dataset not in ("digits", "mnist1d", "synthetic"):
        return None
    input_shape, extra_bytes = _source_layout(dataset, options)
    x_bytes = 4 * math.prod(input_shape)
    k = 20 if num_clients is None else int(num_clients)
    sizes = None
    if dataset == "synthetic":
        generator_clients = int(options.get("num_clients", k if partition == "natural" else 30))
        all_counts = synthetic_counts(generator_clients, int(options.get("seed", 0)))
        n = int(all_counts.sum())
        if partition == "natural":
            if k > generator_clients:
                raise ValueError(f"the 'natural' partition has {generator_clients} clients "
                                 f"(groups), fewer than num_clients={k}")
            sizes = all_counts if num_clients is None else all_counts[:k]
    else:
        size = known_size(dataset, options)
        if size is None:
            return None
        n = size[0]
    source_bytes = n * (x_bytes + extra_bytes)
    if partition == "iid":
        sizes = n // k + (np.arange(k) < n % k).astype(np.int64)  # np.array_split's parts
    if sizes is not None:
        train, test = split_counts(sizes, test_ratio)
        chosen = choose_layout(train, test, x_bytes, layout)
        nbytes = data_bytes(train, test, input_shape, np.float32, layout=chosen)
        return train, SizeEstimate(source_bytes, nbytes, chosen, True, test)
    largest = max(1, n - (k - 1) * min_samples)
    if partition == "shards":
        largest = shards_per_client * -(-n // (k * shards_per_client))
    big_train, big_test = (int(a[0]) for a in split_counts([largest], test_ratio))
    example = x_bytes + _LABEL_BYTES
    ragged = (n + big_train + big_test) * example + 4 * k * _INDEX_BYTES
    padded = k * (big_train + big_test) * example + 2 * k * _INDEX_BYTES
    if layout == "auto":
        chosen, nbytes = "ragged", min(padded, ragged + PADDED_SLACK_BYTES)
    else:
        chosen, nbytes = layout, (padded if layout == "padded" else ragged)
    return None, SizeEstimate(source_bytes, nbytes, chosen, False, None)


# --- Scale stand-ins --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StandIn:
    """A published federated data set's shape and client-size distribution.

    Attributes:
      name: the stand-in's name.
      num_clients: the published client count.
      mu, sigma: log-normal parameters of a client's size (natural log).
      sizes: what a drawn size counts: ``total`` (train + test, split by ``test_ratio``)
        or ``train`` (the test set is ``test_ratio`` of it more, at least 1).
      input_shape, input_dtype: one stored example.
      label_shape: () for a class, (L,) for next-token labels.
      num_classes: classes, or the vocabulary size.
      test_ratio: share held out per client.
      min_size: the smallest drawn size kept (smaller draws are raised to it).
      source: where the figures come from.
    """

    name: str
    num_clients: int
    mu: float
    sigma: float
    sizes: str
    input_shape: tuple[int, ...]
    input_dtype: Any
    label_shape: tuple[int, ...]
    num_classes: int
    test_ratio: float
    min_size: int
    source: str

    @property
    def mean(self) -> float:
        """The uncapped log-normal's mean, exp(mu + sigma^2 / 2)."""
        return math.exp(self.mu + self.sigma**2 / 2)

    @property
    def std(self) -> float:
        """The uncapped log-normal's standard deviation."""
        return self.mean * math.sqrt(math.expm1(self.sigma**2))


def lognormal_from_moments(mean: float, std: float) -> tuple[float, float]:
    """``(mu, sigma)`` of the log-normal with this mean and standard deviation."""
    sigma2 = math.log1p((std / mean) ** 2)
    return math.log(mean) - sigma2 / 2, math.sqrt(sigma2)


# FEMNIST, LEAF paper (Caldas et al. 2018, arXiv:1812.01097) Table 1: 3,550 writers,
# 805,263 samples, 226.83 +- 88.94 samples per writer. (The LEAF repository's pipeline
# gives 817,851 samples; LEAF issue #49 traces the difference to duplicated images.)
FEMNIST_MEAN, FEMNIST_STD = 226.83, 88.94
_FEMNIST_MU, _FEMNIST_SIGMA = lognormal_from_moments(FEMNIST_MEAN, FEMNIST_STD)

# Stack Overflow, TFF (tff.simulation.datasets.stackoverflow.load_data): train split of
# 342,477 users with 135,818,730 sentences (396.58 per user); users with fewer than 100
# sentences overall were removed. No spread is published: sigma = 1.0 is an assumption
# (median exp(mu) = 241 sentences, 7.7% of clients above 1,000, largest of 342,477 about
# 20,000). Reddi et al. 2021 (Adaptive Federated Optimization) cap training at 1,000
# sentences per client (max_elements_per_user = 1000): pass max_examples=1000.
STACKOVERFLOW_MEAN = 135_818_730 / 342_477
STACKOVERFLOW_SIGMA = 1.0
STACKOVERFLOW_CAP = 1000
_SO_MU = math.log(STACKOVERFLOW_MEAN) - STACKOVERFLOW_SIGMA**2 / 2

# Stack Overflow tokens: 10,000 words (ids 1..10000), then out-of-vocabulary, beginning
# and end of sentence; 0 is the pad token (TFF's vocabulary of 10,000 + 4 = 10,004).
SO_VOCAB, SO_OOV, SO_BOS, SO_EOS = 10_000, 10_001, 10_002, 10_003
SO_SEQUENCE_LENGTH = 20

STAND_INS: dict[str, StandIn] = {
    "femnist": StandIn(
        name="femnist", num_clients=3550, mu=_FEMNIST_MU, sigma=_FEMNIST_SIGMA,
        sizes="total", input_shape=(28, 28, 1), input_dtype=np.uint8, label_shape=(),
        num_classes=62, test_ratio=0.1, min_size=2,
        source="LEAF (Caldas et al. 2018) Table 1: 3,550 writers, 805,263 samples, "
               "mean 226.83, std 88.94 per writer; moment-matched log-normal"),
    "stackoverflow": StandIn(
        name="stackoverflow", num_clients=342_477, mu=_SO_MU, sigma=STACKOVERFLOW_SIGMA,
        sizes="train", input_shape=(SO_SEQUENCE_LENGTH,), input_dtype=np.int32,
        label_shape=(SO_SEQUENCE_LENGTH,), num_classes=SO_VOCAB + 4, test_ratio=0.1,
        min_size=1,
        source="TFF stackoverflow train split: 342,477 users, 135,818,730 sentences "
               "(mean 396.58); sigma = 1.0 assumed (no spread published)"),
}


def _spec(name: str) -> StandIn:
    if name not in STAND_INS:
        raise ValueError(f"unknown stand-in {name!r}; one of {', '.join(STAND_INS)}")
    return STAND_INS[name]


def _draw_counts(spec: StandIn, rng: np.random.Generator, num_clients: int,
                 max_examples: int | None) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.rint(rng.lognormal(spec.mu, spec.sigma, num_clients)).astype(np.int64)
    sizes = np.maximum(sizes, spec.min_size)
    if max_examples is not None:
        sizes = np.minimum(sizes, max_examples)
    if spec.sizes == "total":
        return split_counts(sizes, spec.test_ratio)
    test = np.maximum((sizes * spec.test_ratio).astype(np.int64), 1)
    return sizes, test


def _check_args(spec: StandIn, num_clients: Any, max_examples: Any) -> int:
    num_clients = spec.num_clients if num_clients is None else num_clients
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer) \
            or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    low = 2 if spec.sizes == "total" else 1
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(
            max_examples, int | np.integer) or max_examples < low):
        raise ValueError(f"max_examples must be an integer >= {low} or None, got "
                         f"{max_examples!r}")
    return int(num_clients)


def stand_in_counts(name: str, num_clients: int | None = None, seed: int = 0, *,
                    max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` (K,) example counts of ``stand_in(name, ...)``, drawn alone (the
    stand-in's first draw from ``np.random.default_rng(seed)``): for memory estimates
    (:func:`data_bytes`) and benchmarks."""
    spec = _spec(name)
    k = _check_args(spec, num_clients, max_examples)
    return _draw_counts(spec, np.random.default_rng(seed), k, max_examples)


def _client_blocks(counts: np.ndarray, chunk_rows: int):
    """``(start, stop, client_ids)`` over the rows of a pool, ``chunk_rows`` at a time."""
    ends = np.cumsum(counts)
    total = int(ends[-1]) if ends.size else 0
    for start in range(0, total, chunk_rows):
        stop = min(start + chunk_rows, total)
        yield start, stop, np.searchsorted(ends, np.arange(start, stop), side="right")


def _femnist_generator(rng: np.random.Generator, k: int, spec: StandIn) -> Callable:
    """Images: half a class prototype plus half uniform noise, uint8. Labels: the
    client's favourite class with probability 0.4, else uniform (label skew per client)."""
    prototypes = rng.integers(0, 256, (spec.num_classes, *spec.input_shape), dtype=np.uint8)
    favourite = rng.integers(0, spec.num_classes, k)

    def generate(clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = clients.size
        y = np.where(rng.random(r) < 0.4, favourite[clients],
                     rng.integers(0, spec.num_classes, r)).astype(np.int32)
        x = rng.integers(0, 256, (r, *spec.input_shape), dtype=np.uint8)
        x >>= 1
        x += prototypes[y] >> 1
        return x, y

    return generate


def _stackoverflow_generator(rng: np.random.Generator, k: int, spec: StandIn) -> Callable:
    """Sentences of 1 to 20 words after a begin token, then an end token and pads (0).
    Each next word is, with probability 0.8, the previous one plus the client's own
    step (mod the vocabulary), else a uniform word. Inputs are the first 20 tokens,
    labels the next 20, pads labelled -1 (not scored)."""
    length = spec.input_shape[0]
    steps = rng.integers(1, 100, k)

    def generate(clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = clients.size
        seq = np.zeros((r, length + 1), dtype=np.int32)
        seq[:, 0] = SO_BOS
        words = rng.integers(1, SO_VOCAB + 1, (r, length), dtype=np.int32)
        follow = rng.random((r, length)) < 0.8
        step = steps[clients].astype(np.int32)
        for t in range(1, length):
            nxt = (words[:, t - 1] - 1 + step) % SO_VOCAB + 1
            words[:, t] = np.where(follow[:, t], nxt, words[:, t])
        seq[:, 1:] = words
        n_words = rng.integers(1, length + 1, r)
        position = np.arange(length + 1)[None, :]
        seq[position == n_words[:, None] + 1] = SO_EOS
        seq[position > n_words[:, None] + 1] = 0
        x = seq[:, :length]
        y = seq[:, 1:].copy()
        y[y == 0] = -1
        return np.ascontiguousarray(x), y

    return generate


_GENERATORS = {"femnist": _femnist_generator, "stackoverflow": _stackoverflow_generator}


def stand_in(name: str, *, num_clients: int | None = None, seed: int = 0,
             max_examples: int | None = None) -> RaggedFederatedData:
    """A scale stand-in for a published federated data set, in the ragged layout.

    ``femnist``: 28x28x1 uint8 images, 62 classes, 3,550 writers of log-normal size
    (mean 226.83, std 88.94, LEAF Table 1), 10% of each client's examples held out.
    ``stackoverflow``: next-word prediction, 20 int32 tokens in and 20 out per
    sentence, vocabulary 10,004, 342,477 clients of log-normal training size (mean
    396.58 from TFF's figures; sigma 1.0 assumed), plus 10% test sentences (at least 1).
    See :data:`STAND_INS` for the parameters and their sources. Contents are random with
    a learnable per-client signal (see the generators); the sizes, dtypes and layout are
    the point.

    The counts are drawn first (:func:`stand_in_counts` gives the same), then the pooled
    arrays are allocated once, with the ``width`` zero rows
    :func:`~fedjax_sim.data.federated.ragged_from_clients` leaves after each pool, and
    filled a few MB at a time: the memory used is that of the result plus one chunk.

    Args:
      name: ``femnist`` or ``stackoverflow``.
      num_clients: clients (default the published count). The sizes of K clients are
        the first K of a larger draw with the same seed.
      seed: seed of the sizes and the contents.
      max_examples: cap on a client's drawn size (``femnist``: train + test;
        ``stackoverflow``: training sentences, 1,000 in Reddi et al. 2021).

    Returns:
      The data, NumPy arrays.
    """
    spec = _spec(name)
    k = _check_args(spec, num_clients, max_examples)
    rng = np.random.default_rng(seed)
    train_counts, test_counts = _draw_counts(spec, rng, k, max_examples)
    generate = _GENERATORS[name](rng, k, spec)
    row_bytes = (math.prod(spec.input_shape) * np.dtype(spec.input_dtype).itemsize
                 + math.prod(spec.label_shape) * _LABEL_BYTES)
    chunk_rows = max(1, _CHUNK_BYTES // row_bytes)
    fields: dict[str, Any] = {}
    widths: dict[str, int] = {}
    for split, counts in (("train", train_counts), ("test", test_counts)):
        width = max(1, int(counts.max()))
        total = int(counts.sum())
        if total + width >= np.iinfo(np.int32).max:
            raise ValueError(f"{split}: {total} examples exceed the int32 row index of the "
                             "ragged layout")
        # np.zeros maps zero pages: only the rows written (and the tail read) take memory.
        x = np.zeros((total + width, *spec.input_shape), dtype=spec.input_dtype)
        y = np.zeros((total + width, *spec.label_shape), dtype=np.int32)
        for start, stop, clients in _client_blocks(counts, chunk_rows):
            x[start:stop], y[start:stop] = generate(clients)
        offsets = np.zeros(k, dtype=np.int64)
        np.cumsum(counts[:-1], out=offsets[1:])
        fields.update({f"{split}_x": x, f"{split}_y": y,
                       f"{split}_offsets": offsets.astype(np.int32),
                       f"{split}_counts": counts.astype(np.int32)})
        widths[f"{split}_width"] = width
    return RaggedFederatedData(**fields, **widths, num_classes=spec.num_classes,
                               name=f"{name}_stand_in")


def stand_in_bytes(name: str, *, num_clients: int | None = None, seed: int = 0,
                   max_examples: int | None = None, layout: str = "ragged") -> int:
    """:func:`data_bytes` of ``stand_in(...)`` in ``layout``, from its counts alone."""
    spec = _spec(name)
    train, test = stand_in_counts(name, num_clients, seed, max_examples=max_examples)
    return data_bytes(train, test, spec.input_shape, spec.input_dtype, spec.label_shape,
                      layout=layout)
