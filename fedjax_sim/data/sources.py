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

Images are float32 in [0, 1] with a trailing channel axis; labels are int32.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import numpy as np

SOURCES = (
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
      x: (N, *input_shape) float32.
      y: (N,) int32 labels in [0, num_classes).
      num_classes: number of labels.
      name: data set name (with the tfds config where there is one, e.g. ``emnist/balanced``).
      groups: (N,) int64 natural client id of every example, or None when the source has none.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    groups: np.ndarray | None = None

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
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(SOURCES)}")
    unknown = sorted(set(options or {}) - set(SOURCE_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(SOURCE_OPTIONS[name]) or "none"
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
      FileNotFoundError: naming the data set and the folder that should hold it.
    """
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
      ValueError: unknown name or option, or a bad option value.
      FileNotFoundError: a tfds data set is not prepared under ``data_dir``.
    """
    check_source(name, options)
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
    xs, ys = [], []
    for k in range(num_clients):
        if iid:
            v, w, b = np.full(dim, b_mean[k]), w_shared, b_shared
        else:
            v = rng.normal(b_mean[k], 1.0, dim)
            w = rng.normal(u[k], 1.0, (dim, num_classes))
            b = rng.normal(u[k], 1.0, num_classes)
        x = v + rng.standard_normal((counts[k], dim)) * sigma_sqrt
        xs.append(x)
        # argmax of softmax(z) is argmax of z.
        ys.append(np.argmax(x @ w + b, axis=1))
    return Pooled(
        x=np.concatenate(xs).astype(np.float32),
        y=np.concatenate(ys).astype(np.int32),
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
    x = np.concatenate(parts_x).astype(np.float32)
    x /= 255.0
    if x.ndim == 3:  # grayscale images stored without a channel axis
        x = x[..., None]
    return Pooled(x=x, y=np.concatenate(parts_y), num_classes=num_classes, name=full_name)
