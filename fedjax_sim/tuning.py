"""Choosing each method's hyperparameters on validation rows, never on the test set.

``compare --tune`` runs, per method, a small grid on the tuning seeds with
``eval_split="val"``: every run trains on the training rows less the validation rows
(``--val-fraction``) and is scored on the validation rows. The grid is the method's
learning rate (:data:`DEFAULT_LRS`), and with ``--tune-own`` also its own key
hyperparameter (:func:`own_grid`: FedOBP's ``ig_ratio``, Ditto's ``ditto_lambda``,
FedProx's ``mu``, declared by the method as ``HParam.tune_values``). Per method, the
configuration with the best mean validation accuracy over the tuning seeds is chosen (the
first in grid order on a tie); the statistic is the *final* round's accuracy (default), or
each run's *best* evaluation round (``--tune-statistic best``). The comparison then runs
the chosen values on the reporting seeds and scores the test rows: the test rows are never
read for a choice. The grid runs through the sweep engine (``sweep.run_sweep``), so a
method's configurations and seeds share one compiled program. A comparison has one data
setting, so the choice is per method and per data setting.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedjax_sim import algorithms
from fedjax_sim.spec import ExperimentSpec

DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
# The validation share a tuned comparison holds out of every client's training rows.
DEFAULT_VAL_FRACTION = 0.1
TUNE_FOLDER = "tune"
STATISTICS = ("final", "best")


class Tuning(NamedTuple):
    """What the tuner chose.

    Attributes:
      chosen: per algorithm, the chosen values (``{"lr": 0.1}``, with ``--tune-own`` also
        its own key hyperparameter).
      scores: per algorithm, per configuration (:func:`describe`), the mean validation
        accuracy over the tuning seeds (None where every seed diverged).
      folder: the tuning sweep's folder.
      statistic: ``final`` or ``best``.
    """

    chosen: dict[str, dict[str, float]]
    scores: dict[str, dict[str, float | None]]
    folder: Path
    statistic: str = "final"


def own_grid(algorithm: str) -> tuple[str, tuple] | None:
    """``(name, values)`` of the key hyperparameter ``algorithm`` declares for tuning
    (``HParam.tune_values``), or None."""
    for spec in algorithms.hparam_specs(algorithm):
        if spec.tune_values:
            return spec.name, tuple(spec.tune_values)
    return None


def describe(values: dict[str, Any]) -> str:
    """``lr 0.1, ig_ratio 0.99``: a configuration as the table and messages show it."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in values.items())


def check_tuning(lrs: Sequence[float], seeds: Sequence[int], statistic: str = "final"
                 ) -> None:
    """A non-empty grid of positive, finite, distinct learning rates and seeds, and a
    known statistic."""
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
    if statistic not in STATISTICS:
        raise ValueError(f"--tune-statistic must be one of {', '.join(STATISTICS)}, got "
                         f"{statistic!r}")


def configurations(algorithm: str, lrs: Sequence[float], own: bool) -> list[dict]:
    """The tuning grid of ``algorithm``: its learning rates, and with ``own`` the values
    of its own key hyperparameter (learning rates varying slowest)."""
    axes = {"lr": [float(lr) for lr in lrs]}
    found = own_grid(algorithm) if own else None
    if found is not None:
        axes[found[0]] = list(found[1])
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def tuning_specs(specs: Sequence[ExperimentSpec], lrs: Sequence[float],
                 seeds: Sequence[int], own: bool = False) -> list[ExperimentSpec]:
    """Per algorithm of ``specs`` (its settings from its first spec), one spec per
    configuration (:func:`configurations`) and tuning seed, scored on the validation
    rows."""
    firsts: dict[str, ExperimentSpec] = {}
    for spec in specs:
        firsts.setdefault(spec.algorithm, spec)
    grid = []
    for spec in firsts.values():
        hparams = dict(spec.hparams)
        for values in configurations(spec.algorithm, lrs, own):
            for seed in seeds:
                grid.append(spec.replace(seed=seed, eval_split="val",
                                         hparams=tuple({**hparams, **values}.items()),
                                         output=None, overwrite=False))
    return grid


def _score(record: dict, statistic: str, folder: Path | None) -> float | None:
    """A run's validation accuracy: its final one, or its best evaluation's (read from
    its metrics.jsonl); None for a run that did not complete."""
    if record.get("status") != "complete" or record.get("accuracy") is None:
        return None
    if statistic == "final":
        return float(record["accuracy"])
    if "best_accuracy" in record:
        return float(record["best_accuracy"])
    lines = (folder / record["path"] / "metrics.jsonl").read_text().splitlines()
    return max(float(json.loads(line)["accuracy"]) for line in lines if line.strip())


def choose(records: Sequence[dict], grids: dict[str, list[dict]], *,
           statistic: str = "final", folder: Path | None = None
           ) -> tuple[dict[str, dict], dict[str, dict[str, float | None]]]:
    """Per algorithm, the configuration of the best mean validation accuracy over its
    complete runs (a diverged run counts as no score; the first in grid order on a tie)
    and every configuration's mean.

    Args:
      records: the tuning sweep's results.jsonl records.
      grids: per algorithm, its configurations in grid order (:func:`configurations`).
      statistic: ``final`` or ``best`` (each run's best evaluation round).
      folder: the tuning sweep's folder (``best`` reads the runs' metrics.jsonl).

    Raises:
      ValueError: an algorithm whose every run diverged.
    """
    runs: dict[tuple[str, str], list[float]] = {}
    for record in records:
        values = {k: record["lr"] if k == "lr" else record["values"].get(k, record.get(k))
                  for k in grids[record["algorithm"]][0]}
        score = _score(record, statistic, folder)
        key = (record["algorithm"], describe({k: float(v) for k, v in values.items()}))
        runs.setdefault(key, [])
        if score is not None:
            runs[key].append(score)
    chosen, scores = {}, {}
    for algorithm, grid in grids.items():
        labels = [describe(values) for values in grid]
        scores[algorithm] = {label: (float(np.mean(runs[(algorithm, label)]))
                                     if runs.get((algorithm, label)) else None)
                             for label in labels if (algorithm, label) in runs}
        scored = [(value, -i) for i, label in enumerate(labels)
                  if (value := scores[algorithm].get(label)) is not None]
        if not scored:
            raise ValueError(f"tuning: every run of {algorithm} diverged at every "
                             f"configuration of its grid; give smaller --tune-lrs")
        chosen[algorithm] = dict(grid[-max(scored)[1]])
    return chosen, scores


def tune(specs: Sequence[ExperimentSpec], *, lrs: Sequence[float] = DEFAULT_LRS,
         seeds: Sequence[int], output: Path, own: bool = False, statistic: str = "final",
         log: Callable[[str], None] | None = None) -> Tuning:
    """Runs the tuning grid of ``specs`` into ``output/tune`` and chooses.

    Args:
      specs: the comparison's specs (every one with ``val_fraction > 0``).
      lrs: the learning rates tried.
      seeds: the tuning seeds.
      output: the comparison's folder.
      own: also tune each method's own key hyperparameter (:func:`own_grid`).
      statistic: ``final`` or ``best``.
      log: progress lines.

    Returns:
      A :class:`Tuning`.
    """
    from fedjax_sim.sweep import run_sweep

    check_tuning(lrs, seeds, statistic)
    if any(spec.val_fraction <= 0 for spec in specs):
        raise ValueError("tuning needs validation rows: give --val-fraction > 0")
    folder = Path(output) / TUNE_FOLDER
    result = run_sweep(tuning_specs(specs, lrs, seeds, own), output=folder, log=log)
    grids = {name: configurations(name, lrs, own)
             for name in dict.fromkeys(spec.algorithm for spec in specs)}
    chosen, scores = choose(result.records, grids, statistic=statistic, folder=folder)
    return Tuning(chosen, scores, folder, statistic)


def tuned(specs: Sequence[ExperimentSpec], chosen: dict[str, dict]) -> list[ExperimentSpec]:
    """``specs`` with each algorithm's chosen values, scored on the test rows."""
    return [spec.replace(eval_split="test",
                         hparams=tuple({**dict(spec.hparams), **chosen[spec.algorithm]}
                                       .items()))
            for spec in specs]
