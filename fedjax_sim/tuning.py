"""Choosing each method's learning rate on validation rows, never on the test set.

``compare --tune`` runs, per method, a small grid (its learning rate, by default
:data:`DEFAULT_LRS`) on the tuning seeds with ``eval_split="val"``: every run trains on
the training rows less the validation rows (``--val-fraction``) and is scored on the
validation rows. The configuration with the best mean *final-round* validation accuracy
(sample-weighted, over the tuning seeds; the first in grid order on a tie) is chosen per
method; the comparison then runs the chosen values on the reporting seeds and scores the
test rows. The test rows are never read for a choice. The grid runs through the sweep
engine (``sweep.run_sweep``), so a method's learning rates and seeds share one compiled
program.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedjax_sim.spec import ExperimentSpec

DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
# The validation share a tuned comparison holds out of every client's training rows.
DEFAULT_VAL_FRACTION = 0.1
TUNE_FOLDER = "tune"


class Tuning(NamedTuple):
    """What the tuner chose.

    Attributes:
      chosen: per algorithm, the chosen learning rate.
      scores: per algorithm, per learning rate, the mean final validation accuracy over
        the tuning seeds (None where every seed diverged).
      folder: the tuning sweep's folder.
    """

    chosen: dict[str, float]
    scores: dict[str, dict[float, float | None]]
    folder: Path


def check_tuning(lrs: Sequence[float], seeds: Sequence[int]) -> None:
    """A non-empty grid of positive, finite, distinct learning rates and seeds."""
    if not lrs:
        raise ValueError("--tune-lrs needs at least one learning rate")
    for lr in lrs:
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not (
                math.isfinite(lr) and lr > 0):
            raise ValueError(f"--tune-lrs must hold finite numbers > 0, got {lr!r}")
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"--tune-lrs lists a learning rate twice: {list(lrs)}")
    if not seeds:
        raise ValueError("--tune-seeds needs at least one seed")


def tuning_specs(specs: Sequence[ExperimentSpec], lrs: Sequence[float],
                 seeds: Sequence[int]) -> list[ExperimentSpec]:
    """Per algorithm of ``specs`` (its settings from its first spec), one spec per
    learning rate and tuning seed, scored on the validation rows."""
    firsts: dict[str, ExperimentSpec] = {}
    for spec in specs:
        firsts.setdefault(spec.algorithm, spec)
    grid = []
    for spec in firsts.values():
        hparams = dict(spec.hparams)
        for lr in lrs:
            for seed in seeds:
                grid.append(spec.replace(seed=seed, eval_split="val",
                                         hparams=tuple({**hparams, "lr": lr}.items()),
                                         output=None, overwrite=False))
    return grid


def choose(records: Sequence[dict], lrs: Sequence[float]
           ) -> tuple[dict[str, float], dict[str, dict[float, float | None]]]:
    """Per algorithm, the learning rate of the best mean final validation accuracy over
    its complete runs (a diverged run counts as no score; the first in ``lrs`` order on a
    tie) and every learning rate's mean.

    Raises:
      ValueError: an algorithm whose every run diverged.
    """
    by: dict[str, dict[float, list[float]]] = {}
    for record in records:
        lr = float(record["lr"])
        runs = by.setdefault(record["algorithm"], {}).setdefault(lr, [])
        if record.get("status") == "complete" and record.get("accuracy") is not None:
            runs.append(float(record["accuracy"]))
    chosen, scores = {}, {}
    for algorithm, per_lr in by.items():
        scores[algorithm] = {lr: (float(np.mean(per_lr[lr])) if per_lr.get(lr) else None)
                             for lr in map(float, lrs) if lr in per_lr}
        scored = [(value, -i, lr) for i, (lr, value) in enumerate(scores[algorithm].items())
                  if value is not None]
        if not scored:
            raise ValueError(f"tuning: every run of {algorithm} diverged at every learning "
                             f"rate of {list(lrs)}; give smaller --tune-lrs")
        chosen[algorithm] = max(scored)[2]
    return chosen, scores


def tune(specs: Sequence[ExperimentSpec], *, lrs: Sequence[float] = DEFAULT_LRS,
         seeds: Sequence[int], output: Path, log: Callable[[str], None] | None = None
         ) -> Tuning:
    """Runs the tuning grid of ``specs`` into ``output/tune`` and chooses.

    Args:
      specs: the comparison's specs (every one with ``val_fraction > 0``).
      lrs: the learning rates tried.
      seeds: the tuning seeds.
      output: the comparison's folder.
      log: progress lines.

    Returns:
      A :class:`Tuning`.
    """
    from fedjax_sim.sweep import run_sweep

    check_tuning(lrs, seeds)
    if any(spec.val_fraction <= 0 for spec in specs):
        raise ValueError("tuning needs validation rows: give --val-fraction > 0")
    folder = Path(output) / TUNE_FOLDER
    result = run_sweep(tuning_specs(specs, lrs, seeds), output=folder, log=log)
    chosen, scores = choose(result.records, lrs)
    return Tuning(chosen, scores, folder)


def tuned(specs: Sequence[ExperimentSpec], chosen: dict[str, float]) -> list[ExperimentSpec]:
    """``specs`` with each algorithm's chosen learning rate, scored on the test rows."""
    return [spec.replace(eval_split="test",
                         hparams=tuple({**dict(spec.hparams), "lr": chosen[spec.algorithm]}
                                       .items()))
            for spec in specs]
