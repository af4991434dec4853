"""Splitting a parameter dict into a shared part and a personal part, and merging back.

Models in this package keep parameters as a dict of top-level layers, and a model's head
is a set of top-level names, so base/head decoupling (FedPer, FedRep, FedBABU, LG-FedAvg)
is a split by name: no copies of the parts that stay where they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def take(params: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The sub-dict of ``params`` holding the top-level layers ``names``."""
    names = set(names)
    return {name: sub for name, sub in params.items() if name in names}


def drop(params: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The sub-dict of ``params`` without the top-level layers ``names``."""
    names = set(names)
    return {name: sub for name, sub in params.items() if name not in names}


def merge(*parts: Mapping[str, Any]) -> dict[str, Any]:
    """Union of disjoint sub-dicts (later parts win on a clash)."""
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    return merged
