"""Input checks shared by the command line and the Python API.

Every check raises ``ValueError`` whose message names the option as the caller spells it
(``label``: ``--lr`` on the command line, ``lr`` in Python) and what it allows, e.g.
``--lr must be a finite number > 0, got inf``. Nothing here touches JAX, so the checks run
before anything is loaded or compiled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Seeds feed ``np.random.default_rng`` and ``jax.random.key`` and are stacked as uint32
# in sweeps: larger ones would wrap around onto smaller ones.
SEED_LIMIT = 2**32

# Integer hyperparameters end up in int32 arrays and loop bounds.
INT32_MAX = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float | np.integer | np.floating)
            and not isinstance(value, bool | np.bool_))


def int_range(low: int | None, high: int | None = None) -> str:
    """How an integer range reads in messages: "a positive integer", "an integer >= 0"."""
    if high is None:
        return "a positive integer" if low == 1 else f"an integer >= {low}"
    if low is None:
        return f"an integer <= {high}"
    return f"an integer in [{low}, {high}]"


def check_int(label: str, value: Any, low: int | None = 1, high: int | None = None) -> int:
    """Checks that ``value`` is an integer (not a bool) in ``[low, high]``.

    Returns:
      ``value`` as a Python int.

    Raises:
      ValueError: naming ``label`` and the range.
    """
    if (not _is_int(value) or (low is not None and value < low)
            or (high is not None and value > high)):
        raise ValueError(f"{label} must be {int_range(low, high)}, got {value!r}")
    return int(value)


def check_seed(label: str, value: Any) -> int:
    """Checks a seed: an integer >= 0 and < 2**32.

    Raises:
      ValueError: naming ``label``.
    """
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{label} must be an integer >= 0 and < 2**32, got {value!r}")
    return int(value)


def float_range(low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> str:
    """How a real interval reads in messages: "> 0", ">= 0", "in (0, 1)", "in [0, 1)"."""
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_float(label: str, value: Any, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False) -> float:
    """Checks that ``value`` is a finite real number in the given interval.

    A value that is not a number, or is infinite or NaN, is refused as "must be a finite
    number <range>"; a finite one out of range as "must be <range>".

    Returns:
      ``value`` as a Python float.

    Raises:
      ValueError: naming ``label`` and the interval.
    """
    allowed = float_range(low, high, low_open=low_open, high_open=high_open)
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number {allowed}, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise ValueError(f"{label} must be {allowed}, got {value!r}")
    return float(value)


def check_choice(label: str, value: Any, choices: tuple) -> Any:
    """Checks that ``value`` is one of ``choices``.

    Raises:
      ValueError: naming ``label`` and listing the choices.
    """
    if value not in choices:
        raise ValueError(f"{label} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def parse_int(text: str, label: str, low: int | None = 1, high: int | None = None) -> int:
    """Parses command-line text as an integer in ``[low, high]`` (see ``check_int``)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{label} must be {int_range(low, high)}, got {text!r}") from None
    return check_int(label, value, low, high)


def parse_seed(text: str, label: str) -> int:
    """Parses command-line text as a seed (see ``check_seed``)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{label} must be an integer >= 0 and < 2**32, got {text!r}") from None
    return check_seed(label, value)


def parse_list(text: Any, label: str, parse: Callable[[str, str], Any], *,
               unique: bool = False) -> list:
    """Parses a comma-separated command-line list, every entry with ``parse``.

    Args:
      text: the option's text, e.g. ``"0,1,2"``.
      label: the option, e.g. ``--seeds``.
      parse: ``(entry text, entry label) -> value``; raises ValueError on a bad entry. The
        entry label reads ``--seeds entry 2``.
      unique: refuse an entry given twice.

    Returns:
      The parsed values, in order.

    Raises:
      ValueError: an empty list, an empty entry ("0,,1"), a bad entry or, with ``unique``,
        a repeated one.
    """
    text = str(text)
    if not text.strip():
        raise ValueError(f"{label} must name at least one value, got {text!r}")
    entries = [entry.strip() for entry in text.split(",")]
    if "" in entries:  # the list's form first, then its values
        raise ValueError(f"{label} has an empty entry (number {entries.index('') + 1}) in "
                         f"{text!r}")
    values = []
    for i, entry in enumerate(entries, 1):
        value = parse(entry, f"{label} entry {i}")
        if unique and value in values:
            raise ValueError(f"{label} lists {entry} twice in {text!r}")
        values.append(value)
    return values


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_creatable(label: str, path: Path) -> None:
    """Checks that ``path`` (which does not exist) could be created with its parents."""
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise ValueError(f"cannot create {label} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {label} {path}: permission denied in {ancestor}")


def check_input_file(label: str, path: str | os.PathLike) -> Path:
    """Checks that ``path`` is an existing, readable file.

    Raises:
      ValueError: "<label> <path>: no such file", "...: is a directory" or
        "...: permission denied".
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{label} {path}: no such file")
    if path.is_dir():
        raise ValueError(f"{label} {path}: is a directory")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{label} {path}: permission denied")
    return path


def check_input_dir(label: str, path: str | os.PathLike) -> Path:
    """Checks that ``path`` is an existing, readable directory.

    Raises:
      ValueError: "<label> <path>: no such directory", "...: is a file" or
        "...: permission denied".
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{label} {path}: no such directory")
    if not path.is_dir():
        raise ValueError(f"{label} {path}: is a file, not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"{label} {path}: permission denied")
    return path


def check_output_dir(label: str, path: str | os.PathLike) -> Path:
    """Checks, without creating anything, that ``path`` is or can become a writable
    directory.

    Raises:
      ValueError: "<label> <path>: is a file", or "cannot create <label> <path>: ...".
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{label} {path}: is a file")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write to {label} {path}: permission denied")
        return path
    _check_creatable(label, path)
    return path


def check_output_file(label: str, path: str | os.PathLike) -> Path:
    """Checks, without creating anything, that ``path`` can be written as a file.

    Raises:
      ValueError: "<label> <path>: is a directory", or "cannot create <label> <path>: ...".
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{label} {path}: is a directory")
    if path.exists():
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write {label} {path}: permission denied")
        return path
    _check_creatable(label, path)
    return path


__all__ = [
    "INT32_MAX",
    "SEED_LIMIT",
    "check_choice",
    "check_float",
    "check_input_dir",
    "check_input_file",
    "check_int",
    "check_output_dir",
    "check_output_file",
    "check_seed",
    "float_range",
    "int_range",
    "parse_int",
    "parse_list",
    "parse_seed",
]
