"""The model interface every algorithm sees: init, apply, and which parameters form the head."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

Params = Any


@dataclasses.dataclass(frozen=True)
class Model:
    """A classifier as a pair of pure functions over a plain parameter dict.

    Attributes:
      name: registry name (``mlp``, ``cnn``, ``resnet``, ...).
      input_shape: one example's shape, without the batch axis, e.g. ``(28, 28, 1)``.
      num_classes: number of output logits.
      head: top-level parameter names that form the classifier head (the personal part in
        FedPer/FedRep, the frozen part in FedBABU).
      init_fn: ``key -> params``.
      apply_fn: ``(params, x[B, *input_shape]) -> logits[B, num_classes]``.
      layers: the top-level parameter names in the order the forward pass uses them, input
        first and the head last (LG-FedAvg shares the last ones); empty when unknown.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    head: tuple[str, ...]
    init_fn: Callable[[jax.Array], Params] = dataclasses.field(repr=False)
    apply_fn: Callable[[Params, jax.Array], jax.Array] = dataclasses.field(repr=False)
    layers: tuple[str, ...] = ()

    def init(self, key: jax.Array) -> Params:
        return self.init_fn(key)

    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        return self.apply_fn(params, x)

    def head_mask(self, params: Params) -> Params:
        """Boolean pytree shaped like ``params``: True on the head's leaves."""
        return {
            name: jax.tree.map(lambda _, h=name in self.head: h, sub)
            for name, sub in params.items()
        }
