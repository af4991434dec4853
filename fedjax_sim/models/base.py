"""The model interface every algorithm sees: init, apply, and which parameters form the head.

A model with batch normalization keeps its running statistics in the same parameter dict,
under the top-level entries ``Model.state_names`` (``"batch_stats"``), and adds a
training-mode forward pass, ``Model.train_fn``, that normalizes with the batch's own
statistics and returns the updated running ones. ``apply`` is always evaluation mode.
"""

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
      train_fn: for a model with running statistics, the training-mode forward pass
        ``(params, x[B, ...], weights[B]) -> (logits, new_stats)``: each normalization layer
        uses the mean and variance of the rows with weight > 0 (padded rows, weight 0, take
        no part), and ``new_stats`` (``{name: subtree}`` for every name in ``state_names``)
        holds the running statistics after one exponential-moving-average update. ``None``
        for a model without statistics, whose training and evaluation are both ``apply``.
      state_names: top-level parameter entries that hold running statistics: never
        trained by gradient, replaced by ``train_fn``'s ``new_stats`` after every step.
      norm_layers: top-level parameter names of the normalization layers' affine
        parameters (``scale``, ``bias``), which FedBN keeps on the clients with the
        statistics.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    head: tuple[str, ...]
    init_fn: Callable[[jax.Array], Params] = dataclasses.field(repr=False)
    apply_fn: Callable[[Params, jax.Array], jax.Array] = dataclasses.field(repr=False)
    layers: tuple[str, ...] = ()
    train_fn: Callable[[Params, jax.Array, jax.Array], tuple[jax.Array, Params]] | None = (
        dataclasses.field(default=None, repr=False))
    state_names: tuple[str, ...] = ()
    norm_layers: tuple[str, ...] = ()

    def __post_init__(self):
        if bool(self.state_names) != (self.train_fn is not None):
            raise ValueError(f"model {self.name}: train_fn and state_names go together (a "
                             "model with running statistics needs both, one without neither)")

    @property
    def has_stats(self) -> bool:
        """Whether the parameters hold running statistics (batch normalization)."""
        return bool(self.state_names)

    def init(self, key: jax.Array) -> Params:
        return self.init_fn(key)

    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        return self.apply_fn(params, x)

    def train(self, params: Params, x: jax.Array, weights: jax.Array) -> tuple[jax.Array, Params]:
        """The training-mode forward pass (see ``train_fn``).

        Raises:
          ValueError: for a model without running statistics.
        """
        if self.train_fn is None:
            raise ValueError(f"model {self.name} has no training mode apart from apply")
        return self.train_fn(params, x, weights)

    def head_mask(self, params: Params) -> Params:
        """Boolean pytree shaped like ``params``: True on the head's leaves."""
        return {
            name: jax.tree.map(lambda _, h=name in self.head: h, sub)
            for name, sub in params.items()
        }
