"""Per-client data in two layouts: padded arrays (K, N_max, ...) (``FederatedData``) and
pooled arrays with per-client offsets (``RaggedFederatedData``), read the same way by the
round through ``client_rows`` / ``unpacker``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_sim.data.partition import _client_list


@struct.dataclass
class FederatedData:
    """Per-client data, padded to a common length so that kernels never see ragged arrays.

    Row ``k`` holds client ``k``; entries at positions ``>= counts[k]`` are padding (zeros)
    and must be masked out by whoever reads them.

    Attributes:
      train_x: (K, N_max, *input_shape) float32.
      train_y: (K, N_max) int32.
      train_counts: (K,) int32, number of real training examples per client.
      test_x: (K, T_max, *input_shape) float32.
      test_y: (K, T_max) int32.
      test_counts: (K,) int32.
      num_classes: number of labels (static).
      name: data set name (static).
    """

    train_x: jax.Array
    train_y: jax.Array
    train_counts: jax.Array
    test_x: jax.Array
    test_y: jax.Array
    test_counts: jax.Array
    num_classes: int = struct.field(pytree_node=False)
    name: str = struct.field(pytree_node=False, default="")

    @property
    def num_clients(self) -> int:
        return self.train_x.shape[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[2:])

    layout = "padded"

    @property
    def label_shape(self) -> tuple[int, ...]:
        return tuple(self.train_y.shape[2:])

    def width(self, split: str) -> int:
        """The padded length of ``split`` (N_max or T_max)."""
        return getattr(self, f"{split}_x").shape[1]

    def client_rows(self, split: str) -> tuple[Any, Any]:
        """``(rows, pool)`` as :meth:`RaggedFederatedData.client_rows`: here the rows are
        the padded arrays themselves and there is no pool."""
        return tuple(getattr(self, f"{split}_{part}") for part in ("x", "y", "counts")), ()

    def unpacker(self, split: str) -> Callable:
        """``unpack(pool, row) -> (x, y, n)`` with the inputs decoded."""
        del split
        return _padded_unpack


def _host(value: Any) -> np.ndarray | None:
    """A NumPy view of an array, or None for a jax.Array this process cannot read whole
    (a multi-process run's sharded data: only its shape can be checked here)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return None
    return np.asarray(value)


def _clients(mask: np.ndarray) -> str:
    """``"client 3"`` or ``"clients 3, 5, 8"`` for the True entries of a (K,) mask."""
    return _client_list(np.flatnonzero(mask).tolist())


def check_federated_data(data: Any) -> FederatedData:
    """Checks that ``data`` is well-formed ``FederatedData`` before anything is compiled.

    Checked: every array has the client axis K first and the documented rank; train and
    test inputs share one input shape; labels and counts are integers; ``0 <= counts <=``
    the padded length; every client has at least one training and one test example;
    ``num_classes >= 2``; the labels of the real rows lie in ``[0, num_classes)``; the
    inputs (padding included, as masked rows still enter the arithmetic) are finite.
    Values of a ``jax.Array`` that this process cannot read whole (a multi-process run)
    are not checked, only shapes.

    Args:
      data: the federated data, NumPy or jax arrays.

    Returns:
      ``data``, unchanged.

    Raises:
      ValueError: the first problem found, naming the data set, the array and the clients.
    """
    if isinstance(data, RaggedFederatedData):
        return check_ragged_data(data)
    if not isinstance(data, FederatedData):
        raise ValueError(f"data must be a FederatedData or RaggedFederatedData, got "
                         f"{type(data).__name__}")
    what = f"data {data.name!r}" if data.name else "data"
    num_classes = data.num_classes
    if (isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer)
            or num_classes < 2):
        raise ValueError(f"{what}: num_classes must be an integer >= 2, got {num_classes!r}")
    x_shape = np.shape(data.train_x)
    if len(x_shape) < 2 or x_shape[0] < 1:
        raise ValueError(f"{what}: train_x must have shape (K, N_max, *input_shape) with "
                         f"K >= 1, got {x_shape}")
    k = x_shape[0]
    for split in ("train", "test"):
        x, y, counts = (getattr(data, f"{split}_{part}") for part in ("x", "y", "counts"))
        length = np.shape(x)[1] if np.ndim(x) >= 2 else None
        layouts = {
            f"{split}_x": ((k, length, *data.input_shape),
                           "K clients, padded length, the input shape of train_x"),
            f"{split}_y": ((k, length), f"K clients, the padded length of {split}_x"),
            f"{split}_counts": ((k,), "one count per client"),
        }
        for name, value in ((f"{split}_x", x), (f"{split}_y", y), (f"{split}_counts", counts)):
            expected, layout = layouts[name]
            if length is None or tuple(np.shape(value)) != expected:
                raise ValueError(f"{what}: {name} has shape {tuple(np.shape(value))}, expected "
                                 f"{expected} ({layout}; K={k})")
        for name, value, kind, words in (
            (f"{split}_x", x, np.number, "numbers"),
            (f"{split}_y", y, np.integer, "integers"),
            (f"{split}_counts", counts, np.integer, "integers"),
        ):
            dtype = np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)
            if not np.issubdtype(dtype, kind):
                raise ValueError(f"{what}: {name} must hold {words}, got dtype {dtype}")
        counts_h, y_h, x_h = _host(counts), _host(y), _host(x)
        if counts_h is not None:
            if (counts_h < 0).any() or (counts_h > length).any():
                bad = (counts_h < 0) | (counts_h > length)
                raise ValueError(f"{what}: {split}_counts must lie in [0, {length}] (the "
                                 f"padded length {split}_x.shape[1]); {_clients(bad)} "
                                 f"{'has' if bad.sum() == 1 else 'have'} "
                                 f"{counts_h[bad][:10].tolist()}")
            if (counts_h < 1).any():
                empty = counts_h < 1
                raise ValueError(f"{what}: {_clients(empty)} "
                                 f"{'has' if empty.sum() == 1 else 'have'} no {split} "
                                 "examples; every client needs at least one train and one "
                                 "test example")
        if counts_h is not None and y_h is not None:
            valid = np.arange(length)[None, :] < counts_h[:, None]
            out = valid & ((y_h < 0) | (y_h >= num_classes))
            if out.any():
                rows = out.any(axis=1)
                labels = np.unique(y_h[out])
                raise ValueError(f"{what}: {split}_y of {_clients(rows)} holds label(s) "
                                 f"{labels[:10].tolist()} outside [0, {num_classes}) "
                                 f"(num_classes={num_classes})")
        if x_h is not None and not np.isfinite(x_h).all():
            rows = ~np.isfinite(x_h.reshape(k, -1)).all(axis=1)
            raise ValueError(f"{what}: {split}_x of {_clients(rows)} holds NaN or infinite "
                             "values")
    return data


def host_inputs(x: Any) -> np.ndarray:
    """float32 inputs on the host: uint8 images divided by 255 (the floats
    :func:`decode_inputs` gives in the step), anything else cast."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) * np.float32(UINT8_SCALE)
    return x.astype(np.float32)


def build_federated(pooled: Any, splits: Sequence[tuple[np.ndarray, np.ndarray]]) -> FederatedData:
    """Gathers every client's train and test examples into padded arrays.

    Args:
      pooled: a ``Pooled`` data set (anything with ``x``, ``y``, ``num_classes``, ``name``).
      splits: per client, ``(train, test)`` indices into the pooled arrays.

    Returns:
      ``FederatedData`` holding NumPy arrays, padded with zeros to the largest client
      (at least one row, so that shapes are never empty).
    """
    if len(splits) == 0:
        raise ValueError("splits must hold at least one client")
    x = host_inputs(pooled.x)
    y = np.asarray(pooled.y, dtype=np.int32)

    def pad(index_lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        counts = np.array([len(idx) for idx in index_lists], dtype=np.int32)
        width = max(1, int(counts.max()))
        out_x = np.zeros((len(index_lists), width, *x.shape[1:]), dtype=np.float32)
        out_y = np.zeros((len(index_lists), width), dtype=np.int32)
        for k, idx in enumerate(index_lists):
            idx = np.asarray(idx, dtype=np.int64)
            out_x[k, : len(idx)] = x[idx]
            out_y[k, : len(idx)] = y[idx]
        return out_x, out_y, counts

    train_x, train_y, train_counts = pad([train for train, _ in splits])
    test_x, test_y, test_counts = pad([test for _, test in splits])
    return FederatedData(
        train_x=train_x,
        train_y=train_y,
        train_counts=train_counts,
        test_x=test_x,
        test_y=test_y,
        test_counts=test_counts,
        num_classes=int(pooled.num_classes),
        name=str(pooled.name),
    )


# --- The ragged layout ---------------------------------------------------------------

# uint8 images are read as x * (1 / 255) in float32, on the host and in the step alike (a
# product, not a quotient: XLA may turn a division by a constant into one).
UINT8_SCALE = 1.0 / 255.0


def decode_inputs(x: jax.Array) -> jax.Array:
    """Inputs as a model reads them, from their stored dtype.

    ``uint8`` (images kept at a quarter of float32's size) becomes float32 in [0, 1];
    other integers (tokens) become int32; floats are read as stored. Applied inside the
    jitted step to the rows a client reads, so the resident data keeps its own dtype.
    """
    dtype = jnp.dtype(x.dtype)
    if dtype == jnp.uint8:
        return x.astype(jnp.float32) * jnp.float32(UINT8_SCALE)
    if jnp.issubdtype(dtype, jnp.integer):
        return x.astype(jnp.int32)
    return x


@struct.dataclass
class RaggedFederatedData:
    """Per-client data as pooled arrays with per-client offsets: memory O(total examples).

    Client ``k``'s training examples are rows ``train_offsets[k] : train_offsets[k] +
    train_counts[k]`` of ``train_x`` / ``train_y`` (likewise for test). Inside the jitted
    round each client's rows are read by one dynamic slice of static length
    ``train_width`` (the largest client), rows past its count zeroed, so a client function
    sees exactly what the padded :class:`FederatedData` would give it (the same floats)
    while only the examples themselves stay resident. Every pool ends with ``width``
    rows of zeros so that the last client's slice stays in bounds.

    Attributes:
      train_x: (P_train, *input_shape) pooled inputs in their stored dtype (uint8 images,
        int32 tokens, float32 features).
      train_y: (P_train, *label_shape) int32 labels (``label_shape`` is () for
        classification, (L,) for next-token prediction; a negative label is a pad token,
        neither trained nor scored).
      train_offsets / train_counts: (K,) int32 first row and number of rows per client.
      test_x / test_y / test_offsets / test_counts: the same for the test sets.
      num_classes: number of labels (static).
      name: data set name (static).
      train_width / test_width: static, the largest client's count (at least 1).
    """

    train_x: jax.Array
    train_y: jax.Array
    train_offsets: jax.Array
    train_counts: jax.Array
    test_x: jax.Array
    test_y: jax.Array
    test_offsets: jax.Array
    test_counts: jax.Array
    num_classes: int = struct.field(pytree_node=False)
    name: str = struct.field(pytree_node=False, default="")
    train_width: int = struct.field(pytree_node=False, default=1)
    test_width: int = struct.field(pytree_node=False, default=1)

    layout = "ragged"

    @property
    def num_clients(self) -> int:
        return self.train_counts.shape[-1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def label_shape(self) -> tuple[int, ...]:
        return tuple(self.train_y.shape[1:])

    def width(self, split: str) -> int:
        """The static padded length a client function sees for ``split``."""
        return self.train_width if split == "train" else self.test_width

    def client_rows(self, split: str) -> tuple[Any, Any]:
        """``(rows, pool)``: per-client leaves (K, ...) and what every client reads from.

        Map ``rows`` over the client axis, hand ``pool`` to every client as a shared
        (replicated) argument, and read one client's examples with ``unpacker(split)``.
        """
        return ((getattr(self, f"{split}_offsets"), getattr(self, f"{split}_counts")),
                (getattr(self, f"{split}_x"), getattr(self, f"{split}_y")))

    def unpacker(self, split: str) -> Callable:
        """``unpack(pool, row) -> (x, y, n)``: one client's examples, padded to the
        split's width with zero rows, inputs decoded (:func:`decode_inputs`)."""
        width = self.width(split)

        def unpack(pool, row):
            (pool_x, pool_y), (offset, count) = pool, row
            valid = jnp.arange(width) < count
            x = jax.lax.dynamic_slice_in_dim(pool_x, offset, width)
            y = jax.lax.dynamic_slice_in_dim(pool_y, offset, width)
            x = jnp.where(valid.reshape(-1, *([1] * (x.ndim - 1))), x, jnp.zeros((), x.dtype))
            y = jnp.where(valid.reshape(-1, *([1] * (y.ndim - 1))), y, jnp.zeros((), y.dtype))
            return decode_inputs(x), y, count

        return unpack


def _padded_unpack(pool, row):
    del pool
    x, y, n = row
    return decode_inputs(x), y, n


AnyFederatedData = FederatedData | RaggedFederatedData


def client_examples(data: Any, split: str, index: jax.Array | None = None) -> tuple:
    """``(x, y, n)`` of the clients ``index`` (all when ``None``), each padded to the
    split's width: (M, width, ...) arrays, in either layout.

    Materializes M padded clients: meant for cohorts and groups, not for all K clients of
    a large ragged set (map over ``client_rows`` for that).
    """
    rows, pool = data.client_rows(split)
    if index is not None:
        rows = jax.tree.map(lambda a: a[index], rows)
    unpack = data.unpacker(split)
    return jax.vmap(lambda row: unpack(pool, row))(rows)


def _pool(parts: Sequence[np.ndarray], width: int, dtype: Any, shape: tuple) -> np.ndarray:
    """The parts stacked, followed by ``width`` rows of zeros (room for the last slice)."""
    total = sum(len(p) for p in parts)
    out = np.zeros((total + width, *shape), dtype=dtype)
    start = 0
    for part in parts:
        out[start:start + len(part)] = part
        start += len(part)
    return out


def ragged_from_clients(
    train: Sequence[tuple[Any, Any]],
    test: Sequence[tuple[Any, Any]],
    *,
    num_classes: int,
    name: str = "",
) -> RaggedFederatedData:
    """Pools per-client arrays into :class:`RaggedFederatedData`, keeping their dtype.

    Args:
      train: per client ``(x_k, y_k)``: x (n_k, *input_shape) of one dtype for all
        clients (uint8 images, int16 / int32 tokens, or floats, stored as float32),
        y (n_k, *label_shape) integers.
      test: the same for the test sets, one entry per client.
      num_classes: number of labels (vocabulary size for next-token prediction).
      name: data set name.

    Returns:
      The pooled data (NumPy arrays).
    """
    if len(train) != len(test) or len(train) == 0:
        raise ValueError(f"train and test must hold one entry per client, at least one; got "
                         f"{len(train)} and {len(test)}")
    fields: dict[str, Any] = {}
    widths = {}
    for split, parts in (("train", train), ("test", test)):
        xs = [np.asarray(x) for x, _ in parts]
        ys = [np.asarray(y) for _, y in parts]
        counts = np.array([len(x) for x in xs], dtype=np.int64)
        if any(len(x) != len(y) for x, y in zip(xs, ys, strict=True)):
            raise ValueError(f"{split}: every client's x and y must have the same length")
        x_dtype = np.result_type(*[x.dtype for x in xs])
        if np.issubdtype(x_dtype, np.floating):
            x_dtype = np.float32
        elif np.issubdtype(x_dtype, np.integer) and x_dtype.itemsize > 4:
            x_dtype = np.int32  # tokens: int16 or int32 as given, never int64
        width = max(1, int(counts.max()))
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        if offsets[-1] + width >= np.iinfo(np.int32).max:
            raise ValueError(f"{split}: {int(counts.sum())} examples exceed the int32 row "
                             "index of the ragged layout")
        fields[f"{split}_x"] = _pool(xs, width, x_dtype, xs[0].shape[1:])
        fields[f"{split}_y"] = _pool(ys, width, np.int32, ys[0].shape[1:])
        fields[f"{split}_offsets"] = offsets.astype(np.int32)
        fields[f"{split}_counts"] = counts.astype(np.int32)
        widths[f"{split}_width"] = width
    return RaggedFederatedData(**fields, **widths, num_classes=int(num_classes),
                               name=str(name))


def build_ragged(pooled: Any, splits: Sequence[tuple[np.ndarray, np.ndarray]]
                 ) -> RaggedFederatedData:
    """:func:`build_federated` in the ragged layout: every client's rows copied once into
    the pooled train and test arrays, inputs in the source's own dtype."""
    x, y = np.asarray(pooled.x), np.asarray(pooled.y)
    return ragged_from_clients(
        [(x[np.asarray(tr, np.int64)], y[np.asarray(tr, np.int64)]) for tr, _ in splits],
        [(x[np.asarray(te, np.int64)], y[np.asarray(te, np.int64)]) for _, te in splits],
        num_classes=int(pooled.num_classes), name=str(pooled.name))


def to_padded(data: RaggedFederatedData) -> FederatedData:
    """The same clients in the padded layout (for tests and small sets)."""
    fields = {}
    for split in ("train", "test"):
        x, y, n = (np.asarray(a) for a in client_examples(data, split))
        fields.update({f"{split}_x": x, f"{split}_y": y, f"{split}_counts": n})
    return FederatedData(**fields, num_classes=data.num_classes, name=data.name)


def scored_counts(data: Any, split: str = "test") -> np.ndarray:
    """(K,) what each client's accuracy divides by: its examples, or with token labels
    its non-pad tokens (labels >= 0), as :func:`fedjax_sim.core.evaluate.score` counts."""
    counts = np.asarray(getattr(data, f"{split}_counts"))
    if not data.label_shape:
        return counts
    y = np.asarray(getattr(data, f"{split}_y"))
    scored = (y >= 0).reshape(*y.shape[: y.ndim - len(data.label_shape)], -1).sum(-1)
    if data.layout == "padded":
        valid = np.arange(y.shape[1])[None, :] < counts[:, None]
        return (scored * valid).sum(1).astype(np.int64)
    offsets = np.asarray(data.test_offsets if split == "test" else data.train_offsets)
    cumulative = np.concatenate([[0], np.cumsum(scored)])
    return (cumulative[offsets + counts] - cumulative[offsets]).astype(np.int64)


def stack_ragged(splits: Sequence[RaggedFederatedData]) -> RaggedFederatedData:
    """Several ragged splits of one data set with a leading split axis: each pool padded
    with zero rows to one length, widths the largest (a client still reads only its own
    ``count`` rows)."""
    fields: dict[str, Any] = {}
    widths = {}
    for split in ("train", "test"):
        width = max(s.width(split) for s in splits)
        length = max(int(np.asarray(getattr(s, f"{split}_counts")).sum()) for s in splits) + width
        for part in ("x", "y"):
            leaves = [np.asarray(getattr(s, f"{split}_{part}")) for s in splits]
            fields[f"{split}_{part}"] = np.stack([
                np.pad(a, [(0, length - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
                for a in leaves])
        for part in ("offsets", "counts"):
            fields[f"{split}_{part}"] = np.stack(
                [np.asarray(getattr(s, f"{split}_{part}")) for s in splits])
        widths[f"{split}_width"] = width
    return splits[0].replace(**fields, **widths)


def check_ragged_data(data: RaggedFederatedData) -> RaggedFederatedData:
    """:func:`check_federated_data` for the ragged layout: offsets and counts (K,) of
    integers, every client's rows inside its pool with room for the width after them, at
    least one train and one test example per client, labels in ``[0, num_classes)`` (or
    negative, pad tokens, where labels are sequences), finite float inputs.

    Raises:
      ValueError: the first problem found, naming the data set, the array and the clients.
    """
    what = f"data {data.name!r}" if data.name else "data"
    num_classes = data.num_classes
    if (isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer)
            or num_classes < 2):
        raise ValueError(f"{what}: num_classes must be an integer >= 2, got {num_classes!r}")
    k = int(np.shape(data.train_counts)[0]) if np.ndim(data.train_counts) == 1 else -1
    if k < 1:
        raise ValueError(f"{what}: train_counts must have shape (K,) with K >= 1, got "
                         f"{np.shape(data.train_counts)}")
    for split in ("train", "test"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        width = data.width(split)
        for part in ("offsets", "counts"):
            value = getattr(data, f"{split}_{part}")
            if tuple(np.shape(value)) != (k,) or not np.issubdtype(np.asarray(value).dtype,
                                                                   np.integer):
                raise ValueError(f"{what}: {split}_{part} must be (K,) = ({k},) integers, got "
                                 f"shape {np.shape(value)}")
        if np.shape(y)[:1] != np.shape(x)[:1]:
            raise ValueError(f"{what}: {split}_y has {np.shape(y)[0]} rows, {split}_x "
                             f"{np.shape(x)[0]}")
        if np.shape(x)[1:] != data.input_shape:
            raise ValueError(f"{what}: {split}_x has input shape {np.shape(x)[1:]}, train_x "
                             f"{data.input_shape}")
        if not np.issubdtype(np.asarray(y).dtype, np.integer):
            raise ValueError(f"{what}: {split}_y must hold integers, got {np.asarray(y).dtype}")
        offsets, counts = (_host(getattr(data, f"{split}_{p}")) for p in ("offsets", "counts"))
        if offsets is None or counts is None:
            continue
        if (counts < 1).any():
            raise ValueError(f"{what}: {_clients(counts < 1)} has no {split} examples; every "
                             "client needs at least one train and one test example")
        outside = (offsets < 0) | (offsets + width > np.shape(x)[0]) | (counts > width)
        if outside.any():
            raise ValueError(f"{what}: {split} rows of {_clients(outside)} lie outside the "
                             f"pool of {np.shape(x)[0]} rows (offset + width {width})")
        y_h = _host(y)
        if y_h is not None:
            low = -np.inf if data.label_shape else 0
            bad = (y_h >= num_classes) | (y_h < low)
            if bad.any():
                raise ValueError(f"{what}: {split}_y holds label(s) "
                                 f"{np.unique(y_h[bad])[:10].tolist()} outside "
                                 f"[0, {num_classes}) (num_classes={num_classes})")
        x_h = _host(x)
        if x_h is not None and np.issubdtype(x_h.dtype, np.floating) and \
                not np.isfinite(x_h).all():
            raise ValueError(f"{what}: {split}_x holds NaN or infinite values")
    return data


LAYOUTS = ("auto", "padded", "ragged")

# ``auto`` keeps the padded layout while it costs at most this many bytes beyond the
# pooled examples: small sets stay as they always ran; large or skewed ones go ragged.
PADDED_SLACK_BYTES = 64 * 2**20


def check_layout(layout: Any) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`.

    Raises:
      ValueError: naming ``data_layout`` and the allowed values.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"data_layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def choose_layout(train_counts: Any, test_counts: Any, example_bytes: int,
                  layout: str = "auto") -> str:
    """The layout ``auto`` stands for: ``padded`` while padding every client to the
    largest costs at most :data:`PADDED_SLACK_BYTES` more than the examples themselves
    (today's small sets, where it is the faster path on CPU), else ``ragged``."""
    if check_layout(layout) != "auto":
        return layout
    slack = 0
    for counts in (np.asarray(train_counts), np.asarray(test_counts)):
        slack += (counts.size * int(max(1, counts.max(initial=1))) - int(counts.sum()))
    return "padded" if slack * int(example_bytes) <= PADDED_SLACK_BYTES else "ragged"


def build_layout(pooled: Any, splits: Sequence[tuple[np.ndarray, np.ndarray]],
                 layout: str = "auto") -> FederatedData | RaggedFederatedData:
    """:func:`build_federated` or :func:`build_ragged`, as :func:`choose_layout` says."""
    example_bytes = 4 * int(np.prod(np.shape(pooled.x)[1:], dtype=np.int64))
    chosen = choose_layout([len(tr) for tr, _ in splits], [len(te) for _, te in splits],
                           example_bytes, layout)
    return build_ragged(pooled, splits) if chosen == "ragged" else build_federated(pooled,
                                                                                   splits)
