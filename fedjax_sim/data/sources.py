"""Data set sources: each returns one pooled set of examples in a fixed, documented order.

Partitions (and partition files) are lists of indices into this pooled order, so the order
of every source is part of its contract:

- ``digits``: scikit-learn's ``load_digits()`` in its own order (1,797 8x8 images, pixel
  values divided by 16). Offline; the default source.
- ``mnist1d``: the MNIST-1D generator (Greydanus 2020, the ``mnist1d`` package's
  ``make_dataset``; its download path is never used). The generator's ``x`` (train) rows
  followed by its ``x_test`` rows, which together are the generator's own shuffled order.
  ``num_samples // 10 * 10`` sequences of length 40.
- ``synthetic``: FedProx synthetic(alpha, beta) (Li et al., "Federated Optimization in
  Heterogeneous Networks", MLSys 2020). Generator client 0's samples, then client 1's, and
  so on; ``groups`` holds that client id.
- ``mnist``, ``fashion_mnist``, ``emnist`` (config ``balanced`` by default), ``cifar10``,
  ``cifar100``, ``svhn_cropped``: TensorFlow Datasets, read with ``tfds.data_source``
  (ArrayRecord files prepared beforehand; nothing is ever downloaded). The ``train`` split
  in record order followed by the ``test`` split in record order. Record order is fixed
  when tfds prepares a data set version, so a partition file stays valid for that version.

- ``npz:PATH``: your own data, a NumPy ``.npz`` file (``np.savez``) holding ``x`` (N, ...)
  inputs, ``y`` (N,) integer labels in ``[0, num_classes)`` and optionally ``client`` (N,)
  natural client ids (integers or strings; the ``natural`` partition makes one client per
  id, in sorted id order) and a scalar ``num_classes`` (default ``max(y) + 1``). The file's
  row order. Inputs are cast to float32 as they are (scale them yourself); images want a
  trailing channel axis, (N, H, W, C).
- registered sources (:func:`register_source`): whatever their loader returns, checked as
  an npz file's arrays are.

Images have a trailing channel axis; tfds images stay uint8 (read as x / 255, float32 in
[0, 1], by every model), the offline sources are float32; labels are int32.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# ``npz:PATH`` names a NumPy .npz file of your own (see the module docstring).
NPZ_PREFIX = "npz:"

_BUILTIN_SOURCES = (
    "digits",
    "mnist1d",
    "synthetic",
    "mnist",
    "fashion_mnist",
    "emnist",
    "cifar10",
    "cifar100",
    "svhn_cropped",
)

# Options each source accepts (``seed`` only matters for the generated sources).
SOURCE_OPTIONS: dict[str, tuple[str, ...]] = {
    "digits": (),
    "mnist1d": ("num_samples", "seed"),
    "synthetic": ("alpha", "beta", "num_clients", "dim", "num_classes", "iid", "seed"),
    "mnist": (),
    "fashion_mnist": (),
    "emnist": ("config",),
    "cifar10": (),
    "cifar100": ("label_key",),
    "svhn_cropped": (),
}

# Sources added by ``register_source``: name -> loader.
_REGISTERED: dict[str, Callable[..., Any]] = {}


def is_source(name: Any) -> bool:
    """Whether ``name`` names a source: a built-in or registered one, or ``npz:PATH``."""
    return isinstance(name, str) and (
        name in _BUILTIN_SOURCES or name in _REGISTERED
        or (name.startswith(NPZ_PREFIX) and len(name) > len(NPZ_PREFIX)))


class SourceNames(Sequence):
    """The source names, read live: the built-in ones, the registered ones, and
    ``npz:PATH`` (the form of every npz file). ``name in SOURCES`` is :func:`is_source`,
    so it holds for any ``npz:...`` name."""

    def _names(self) -> tuple[str, ...]:
        return (*_BUILTIN_SOURCES, *_REGISTERED, NPZ_PREFIX + "PATH")

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name: object) -> bool:
        return is_source(name)

    def __add__(self, other):
        return self._names() + tuple(other)

    def __repr__(self) -> str:
        return repr(self._names())


SOURCES = SourceNames()


def register_source(name: str, loader: Callable[..., Any], *, options: Sequence[str] = (),
                    replace: bool = False) -> None:
    """Adds a data source, usable wherever the built-in ones are (``make_federated_data``,
    the ``dataset`` and ``public_dataset`` of experiment specs, ``--dataset NAME``).

    Args:
      name: the source's name, a Python identifier.
      loader: ``loader(**options) -> Pooled`` or a dict of arrays as an npz source holds:
        ``x`` (N, ...), ``y`` (N,) integer labels, optionally ``client`` (N,) natural
        client ids and ``num_classes``. Called once per load, with the ``source_options``
        given to ``make_federated_data``; it must return the same examples in the same
        order every time (partition files index into that order).
      options: the names of the keyword options ``loader`` takes.
      replace: replace a source registered earlier under ``name`` (never a built-in).

    Raises:
      ValueError: a name that is not an identifier, a built-in name, ``npz``, a name
        registered already without ``replace``, a loader that is not callable, options
        that are not identifiers.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"source name must be a Python identifier, got {name!r}")
    if name in _BUILTIN_SOURCES or name == "npz":
        raise ValueError(f"{name!r} is a built-in data source and cannot be registered again; "
                         "choose another name")
    if name in _REGISTERED and not replace:
        raise ValueError(f"data source {name!r} is registered already; pass replace=True to "
                         "replace it")
    if not callable(loader):
        raise ValueError(f"loader of data source {name!r} must be callable, got "
                         f"{type(loader).__name__}")
    if isinstance(options, str) or not all(isinstance(o, str) and o.isidentifier()
                                           for o in options):
        raise ValueError(f"options of data source {name!r} must be a tuple of option names, "
                         f"got {options!r}")
    _REGISTERED[name] = loader
    SOURCE_OPTIONS[name] = tuple(options)


def unregister_source(name: str) -> None:
    """Removes a source added by :func:`register_source`.

    Raises:
      ValueError: a built-in or unknown name.
    """
    if name not in _REGISTERED:
        raise ValueError(f"no data source {name!r} is registered"
                         + (" (built-in sources cannot be removed)"
                            if name in _BUILTIN_SOURCES else ""))
    del _REGISTERED[name]
    del SOURCE_OPTIONS[name]


def has_natural_ids(name: str) -> bool | None:
    """Whether source ``name`` gives natural client ids: True or False for the built-in
    ones, None where only loading tells (npz files, registered sources)."""
    if name in _BUILTIN_SOURCES:
        return name == "synthetic"
    return None


_TFDS_SOURCES = ("mnist", "fashion_mnist", "emnist", "cifar10", "cifar100", "svhn_cropped")

# (pooled train + test size, number of classes) of the tfds sources, so that impossible
# settings can be refused before anything is read.
_TFDS_SIZES: dict[str, tuple[int, int]] = {
    "mnist": (70_000, 10),
    "fashion_mnist": (70_000, 10),
    "emnist/balanced": (131_600, 47),
    "emnist/byclass": (814_255, 62),
    "emnist/bymerge": (814_255, 47),
    "emnist/digits": (280_000, 10),
    "emnist/mnist": (70_000, 10),
    "cifar10": (60_000, 10),
    "cifar100": (60_000, 100),
    "cifar100:coarse_label": (60_000, 20),
    "svhn_cropped": (99_289, 10),
}

_MNIST1D_SEED = 42  # the seed of the published MNIST-1D data set
_SYNTHETIC_SEED = 0


@dataclasses.dataclass(frozen=True)
class Pooled:
    """All examples of a data set in one canonical order (see the module docstring).

    Attributes:
      x: (N, *input_shape) float32, or uint8 images (read as x / 255).
      y: (N,) int32 labels in [0, num_classes).
      num_classes: number of labels.
      name: data set name (with the tfds config where there is one, e.g. ``emnist/balanced``).
      groups: (N,) int64 natural client id of every example, or None when the source has none.
      group_ids: the source's own client id of each value of ``groups`` (``group_ids[g]``
        for ``g``), for messages; None when the ids are ``groups`` themselves.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    groups: np.ndarray | None = None
    group_ids: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return int(self.y.shape[0])


def check_source(name: str, options: dict[str, Any] | None = None) -> None:
    """Checks a source name and its option names without loading anything.

    Args:
      name: one of ``SOURCES``.
      options: keyword options meant for ``load_source``.

    Raises:
      ValueError: unknown source or option.
    """
    if not is_source(name):
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(SOURCES)}")
    allowed_options = () if name.startswith(NPZ_PREFIX) else SOURCE_OPTIONS[name]
    unknown = sorted(set(options or {}) - set(allowed_options))
    if unknown:
        allowed = ", ".join(allowed_options) or "none"
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; allowed: {allowed}"
        )


def known_size(name: str, options: dict[str, Any] | None = None) -> tuple[int, int] | None:
    """Pooled size and class count of a source, when known without loading it.

    Args:
      name: one of ``SOURCES``.
      options: the source's options.

    Returns:
      ``(num_samples, num_classes)``, or None where it depends on generated data.
    """
    options = options or {}
    if name == "digits":
        return 1797, 10
    if name == "mnist1d":
        num_samples = options.get("num_samples", 5000)
        if isinstance(num_samples, int | np.integer):
            return int(num_samples) // 10 * 10, 10
        return None
    if name == "emnist":
        return _TFDS_SIZES.get(f"emnist/{options.get('config', 'balanced')}")
    if name == "cifar100" and options.get("label_key", "label") == "coarse_label":
        return _TFDS_SIZES["cifar100:coarse_label"]
    return _TFDS_SIZES.get(name)


def check_prepared(name: str, data_dir: str | os.PathLike | None = None,
                   options: dict[str, Any] | None = None) -> None:
    """Checks, before tfds is asked, that a tfds source has a folder under ``data_dir``.

    tfds logs warnings and raises one of several exception types on a missing data set;
    this check (the command line runs it before anything loads) turns the common case,
    nothing prepared there, into one clear error. Other sources, and remote directories
    (``gs://...``), pass unchecked.

    Args:
      name: one of ``SOURCES``.
      data_dir: as in ``load_source`` (None: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      options: the source's options (``config`` for emnist).

    Raises:
      FileNotFoundError: naming the data set and the folder that should hold it (for
        ``npz:PATH``, the file).
    """
    if isinstance(name, str) and name.startswith(NPZ_PREFIX):
        path = name[len(NPZ_PREFIX):]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset {name}: no file {path}")
        return
    if name not in _TFDS_SOURCES:
        return
    where = root = os.fspath(data_dir) if data_dir is not None else None
    if root is None:
        root = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
        where = f"TFDS_DATA_DIR={root}" if os.environ.get("TFDS_DATA_DIR") else root
    if "://" in root:
        return
    folder = f"emnist/{(options or {}).get('config', 'balanced')}" if name == "emnist" else name
    if not os.path.isdir(os.path.join(root, folder)):
        raise FileNotFoundError(
            f"tfds data set {folder!r} is not prepared under {where} (no folder "
            f"{os.path.join(root, folder)}); nothing is downloaded: prepare it with `tfds build "
            f"{folder} --file_format=array_record --data_dir DIR` and pass --data-dir DIR "
            "(data_dir=...)")


def load_source(
    name: str, *, data_dir: str | None = None, seed: int | None = None, **options: Any
) -> Pooled:
    """Loads one data set, train and test pooled, in its canonical order.

    Args:
      name: one of ``SOURCES``.
      data_dir: tfds data directory holding prepared ArrayRecord files (tfds sources only;
        None means tfds' default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      seed: generator seed of the generated sources; None keeps each one's canonical seed
        (42 for ``mnist1d``, the published data set; 0 for ``synthetic``). Ignored by the
        others.
      **options: per source. ``mnist1d``: ``num_samples`` (5000). ``synthetic``: ``alpha``
        (1.0), ``beta`` (1.0), ``num_clients`` (30), ``dim`` (60), ``num_classes`` (10),
        ``iid`` (False). ``emnist``: ``config`` ("balanced"). ``cifar100``: ``label_key``
        ("label", or "coarse_label" for the 20 superclasses).

    Returns:
      The pooled data set.

    Raises:
      ValueError: unknown name or option, or a bad option value; an npz file or registered
        source whose arrays are refused by :func:`pooled_from_arrays`.
      FileNotFoundError: a tfds data set is not prepared under ``data_dir``; no npz file.
    """
    check_source(name, options)
    if name.startswith(NPZ_PREFIX):
        return load_npz(name[len(NPZ_PREFIX):])
    if name in _REGISTERED:
        return _load_registered(name, options)
    if name == "digits":
        return _load_digits()
    if name == "mnist1d":
        return _load_mnist1d(seed=_MNIST1D_SEED if seed is None else seed, **options)
    if name == "synthetic":
        return make_synthetic(seed=_SYNTHETIC_SEED if seed is None else seed, **options)
    return _load_tfds(name, data_dir=data_dir, **options)


def _load_digits() -> Pooled:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    return Pooled(x=x, y=bunch.target.astype(np.int32), num_classes=10, name="digits")


def _load_mnist1d(*, seed: int, num_samples: int = 5000) -> Pooled:
    if not isinstance(num_samples, int | np.integer) or num_samples < 10:
        raise ValueError(f"mnist1d num_samples must be an integer >= 10, got {num_samples!r}")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    # The generator seeds the global NumPy and `random` states; put them back afterwards
    # so that loading data does not change anyone else's random stream.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[..., None]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int32)
    return Pooled(x=x, y=y, num_classes=10, name="mnist1d")


def make_synthetic(
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    num_clients: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    seed: int = _SYNTHETIC_SEED,
) -> Pooled:
    """FedProx synthetic(alpha, beta) data (Li et al., MLSys 2020, section 5.1).

    For client k: u_k ~ N(0, alpha²), B_k ~ N(0, beta²); W_k ~ N(u_k, 1) of shape
    (dim, num_classes) and b_k ~ N(u_k, 1); v_k ~ N(B_k, 1) per coordinate; x ~ N(v_k, Σ)
    with Σ diagonal, Σ_jj = j^-1.2; y = argmax(W_k x + b_k). The number of samples of
    client k is floor(LogNormal(4, 2)) + 50. alpha controls how much the local models
    differ, beta how much the local inputs differ. As in the FedProx generator, alpha and
    beta are standard deviations. With ``iid`` every client shares one W, b ~ N(0, 1) and
    v_k = B_k in every coordinate (the paper's synthetic IID uses alpha = beta = 0).

    Args:
      alpha: model heterogeneity, >= 0.
      beta: input heterogeneity, >= 0.
      num_clients: number of generator clients (natural groups).
      dim: input dimension.
      num_classes: number of labels.
      iid: share one labelling model across clients.
      seed: generator seed.

    Returns:
      Pooled data with x (N, dim), ordered client by client, and ``groups`` = client id.
    """
    for key, value in (("alpha", alpha), ("beta", beta)):
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"synthetic {key} must be >= 0, got {value}")
    for key, value, low in (
        ("num_clients", num_clients, 1),
        ("dim", dim, 1),
        ("num_classes", num_classes, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"synthetic {key} must be an integer >= {low}, got {value!r}")
    rng = np.random.default_rng(seed)
    counts = rng.lognormal(4.0, 2.0, num_clients).astype(np.int64) + 50
    u = rng.normal(0.0, alpha, num_clients)
    b_mean = rng.normal(0.0, beta, num_clients)
    sigma_sqrt = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
    if iid:
        w_shared = rng.normal(0.0, 1.0, (dim, num_classes))
        b_shared = rng.normal(0.0, 1.0, num_classes)
    # Streamed: the pooled arrays are allocated once from the drawn counts and filled
    # client by client, so the peak is the pooled data plus one client's float64 rows.
    # The draws and their order are those of the former list-and-concatenate version,
    # and writing float64 into float32 rounds as astype does: the output is the same.
    total = int(counts.sum())
    x_pool = np.empty((total, dim), dtype=np.float32)
    y_pool = np.empty(total, dtype=np.int32)
    start = 0
    for k in range(num_clients):
        if iid:
            v, w, b = np.full(dim, b_mean[k]), w_shared, b_shared
        else:
            v = rng.normal(b_mean[k], 1.0, dim)
            w = rng.normal(u[k], 1.0, (dim, num_classes))
            b = rng.normal(u[k], 1.0, num_classes)
        stop = start + int(counts[k])
        x = v + rng.standard_normal((counts[k], dim)) * sigma_sqrt
        x_pool[start:stop] = x
        # argmax of softmax(z) is argmax of z.
        y_pool[start:stop] = np.argmax(x @ w + b, axis=1)
        del x
        start = stop
    return Pooled(
        x=x_pool,
        y=y_pool,
        num_classes=int(num_classes),
        name="synthetic",
        groups=np.repeat(np.arange(num_clients, dtype=np.int64), counts),
    )


def _load_tfds(
    name: str, *, data_dir: str | None, config: str = "balanced", label_key: str = "label"
) -> Pooled:
    import tensorflow_datasets as tfds

    full_name = f"emnist/{config}" if name == "emnist" else name
    if name == "cifar100" and label_key not in ("label", "coarse_label"):
        raise ValueError(f"cifar100 label_key must be 'label' or 'coarse_label', got {label_key!r}")
    parts_x, parts_y, num_classes = [], [], None
    for split in ("train", "test"):
        try:
            source = tfds.data_source(full_name, split=split, data_dir=data_dir, download=False)
        except Exception as err:
            # tfds raises KeyError, NotImplementedError, AssertionError, ... depending on
            # what is missing; all of them mean the prepared files are not there.
            where = data_dir or "tfds' default directory ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
            raise FileNotFoundError(
                f"cannot read tfds data set {full_name!r} split {split!r} from {where}: {err}\n"
                "Nothing is downloaded. Prepare it in ArrayRecord format on a machine with "
                f"network access (e.g. `tfds build {full_name} --file_format=array_record "
                "--data_dir DIR`) and pass that directory with --data-dir (data_dir=...)."
            ) from err
        num_classes = int(source.dataset_info.features[label_key].num_classes)
        n = len(source)
        x, y = None, np.empty(n, np.int32)
        for i in range(n):
            example = source[i]
            image = np.asarray(example["image"])
            if x is None:
                x = np.empty((n, *image.shape), np.uint8)
            x[i] = image
            y[i] = example[label_key]
        if x is not None:
            parts_x.append(x)
            parts_y.append(y)
    if not parts_x:
        raise FileNotFoundError(f"tfds data set {full_name!r} has no examples under {data_dir}")
    # Kept as uint8 (a quarter of float32): the ragged layout stores them so and divides
    # by 255 in the step; the padded layout and public sets decode on the host.
    x = np.concatenate(parts_x)
    if x.ndim == 3:  # grayscale images stored without a channel axis
        x = x[..., None]
    return Pooled(x=x, y=np.concatenate(parts_y), num_classes=num_classes, name=full_name)


def load_npz(path: str | os.PathLike) -> Pooled:
    """Loads your own data from a NumPy ``.npz`` file (the ``npz:PATH`` source).

    Args:
      path: a file written by ``np.savez`` / ``np.savez_compressed`` with arrays ``x``,
        ``y`` and optionally ``client`` and ``num_classes`` (see :func:`pooled_from_arrays`).
        Object arrays are refused (nothing is unpickled).

    Returns:
      The pooled data set, named after the file.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a file NumPy cannot read as npz, or arrays that
        :func:`pooled_from_arrays` refuses; the message names the file.
    """
    path = os.fspath(path)
    what = f"dataset {NPZ_PREFIX}{path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("it holds one array, not an npz archive of named arrays")
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{what}: cannot read it as an .npz file of arrays (np.savez): "
                         f"{error}") from None
    return pooled_from_arrays(arrays, what=what, name=os.path.basename(path))


def pooled_from_arrays(arrays: Mapping[str, Any], *, what: str = "data",
                       name: str = "data") -> Pooled:
    """Checks your own arrays and makes them a pooled data set.

    Args:
      arrays: ``x`` (N, ...) numeric inputs (at least one feature axis), ``y`` (N,)
        integer labels in ``[0, num_classes)``, optionally ``client`` (N,) natural client
        ids (integers or strings) and ``num_classes`` (an integer >= 2; default
        ``max(y) + 1``). Other keys are refused (a misspelt name would be ignored).
      what: how messages name the data (``dataset npz:PATH``).
      name: the data set's name.

    Returns:
      ``Pooled`` with float32 ``x``, int32 ``y`` and, with ``client``, ``groups`` the
      index of each example's id among the sorted distinct ids.

    Raises:
      ValueError: a missing or unknown array, labels that are not integers or fall outside
        ``[0, num_classes)``, ``x``, ``y`` or ``client`` of different lengths, inputs that
        are not finite numbers, fewer than 2 classes.
    """
    if not isinstance(arrays, Mapping):
        raise ValueError(f"{what}: expected a Pooled or a dict of arrays x, y (optional "
                         f"client, num_classes), got {type(arrays).__name__}")
    held = ", ".join(sorted(arrays)) or "nothing"
    for key in ("x", "y"):
        if key not in arrays:
            raise ValueError(f"{what} has no array {key!r} (it holds: {held}); it needs x "
                             "(N, ...) inputs and y (N,) integer labels, optionally client "
                             "(N,) client ids and num_classes")
    unknown = sorted(set(arrays) - {"x", "y", "client", "num_classes"})
    if unknown:
        raise ValueError(f"{what}: unknown array(s) {', '.join(unknown)}; the arrays are x, y "
                         "and optionally client and num_classes")
    x, y = np.asarray(arrays["x"]), np.asarray(arrays["y"])
    if y.ndim != 1:
        raise ValueError(f"{what}: y must be one label per example, shape (N,), got shape "
                         f"{y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: y must hold integer class labels, got dtype {y.dtype} "
                         "(cast whole-number labels with y.astype(int))")
    if x.ndim < 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) \
            or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{what}: x must be real numbers of shape (N, features...), got dtype "
                         f"{x.dtype} and shape {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: x has {x.shape[0]} examples but y has {y.shape[0]} labels; "
                         "they must have the same length")
    if y.shape[0] < 2:
        raise ValueError(f"{what}: needs at least 2 examples, got {y.shape[0]}")
    if "num_classes" in arrays:
        given = np.asarray(arrays["num_classes"])
        if given.shape != () or not np.issubdtype(given.dtype, np.integer) or given < 2:
            raise ValueError(f"{what}: num_classes must be one integer >= 2, got "
                             f"{arrays['num_classes']!r}")
        num_classes = int(given)
    else:
        num_classes = int(y.max()) + 1
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what}: labels must be in [0, {num_classes}) (num_classes="
                         f"{num_classes}); {int(bad.sum())} are not, e.g. y[{first}] = "
                         f"{int(y[first])}")
    if num_classes < 2:
        raise ValueError(f"{what}: needs at least 2 classes; every label is 0 (set "
                         "num_classes if some classes are absent)")
    x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise ValueError(f"{what}: x must be finite float32 numbers; it has NaN or infinite "
                         "values (or values beyond float32's range)")
    groups = group_ids = None
    if "client" in arrays:
        client = np.asarray(arrays["client"])
        if client.ndim != 1 or client.shape[0] != y.shape[0]:
            raise ValueError(f"{what}: client must hold one client id per example, shape "
                             f"({y.shape[0]},), got shape {client.shape}")
        if not (np.issubdtype(client.dtype, np.integer) or client.dtype.kind in "US"):
            raise ValueError(f"{what}: client ids must be integers or strings, got dtype "
                             f"{client.dtype}")
        group_ids, groups = np.unique(client, return_inverse=True)
        groups = groups.astype(np.int64).reshape(-1)
    return Pooled(x=x32, y=y.astype(np.int32), num_classes=num_classes, name=name,
                  groups=groups, group_ids=group_ids)


def _load_registered(name: str, options: dict[str, Any]) -> Pooled:
    out = _REGISTERED[name](**options)
    what = f"dataset {name} (registered source)"
    if isinstance(out, Pooled):
        arrays = {"x": out.x, "y": out.y, "num_classes": np.int64(out.num_classes)}
        if out.groups is not None:
            arrays["client"] = out.groups if out.group_ids is None else out.group_ids[
                np.asarray(out.groups)]
        return pooled_from_arrays(arrays, what=what, name=out.name)
    return pooled_from_arrays(out, what=what, name=name)
