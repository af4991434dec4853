"""The checks of run and sweep arguments, made before anything is placed or compiled."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedjax_sim.algorithms.base import Algorithm, check_model_fits
from fedjax_sim.checks import check_int, check_seed
from fedjax_sim.core.cohort import strategy_override
from fedjax_sim.data.federated import (
    AnyFederatedData,
    check_federated_data,
)
from fedjax_sim.runner.loop import (
    Events,
)


def validate_run_options(*, rounds: int, eval_every: int, checkpoint_every: int = 0) -> None:
    """Raises ValueError naming the option on a bad loop setting."""
    for name, value, low in (("rounds", rounds, 1), ("eval_every", eval_every, 1),
                             ("checkpoint_every", checkpoint_every, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


DIVERGENCE_POLICIES = ("stop", "warn")


def validate_divergence_policy(on_divergence: str) -> None:
    if on_divergence not in DIVERGENCE_POLICIES:
        raise ValueError(f"on_divergence must be one of {', '.join(DIVERGENCE_POLICIES)}, "
                         f"got {on_divergence!r}")


def _check_local_accuracies(label: str, local_accuracies: Any, num_clients: int) -> None:
    """One accuracy per client, each in [0, 1] or NaN (a client without test data)."""
    import reprlib

    local = np.array(local_accuracies, dtype=object)
    if local.shape != (num_clients,) or not all(
            isinstance(a, float | int | np.floating | np.integer) and not isinstance(
                a, bool | np.bool_) and (0 <= a <= 1 or a != a) for a in local):
        raise ValueError(f"{label} must be a list of {num_clients} accuracies (one per "
                         f"client), each in [0, 1] or NaN, got {reprlib.repr(local_accuracies)}")


def _check_run(algorithm: Any, data: Any, *, events: Any, local_accuracies: Any, rounds: Any,
               eval_every: Any, checkpoint_every: Any, rounds_per_call: Any, seed: Any,
               devices: Any, on_divergence: Any, resume: bool, output: Any) -> None:
    """:func:`run`'s arguments, checked before anything is placed or compiled."""
    for label, value, kind, what in (("algorithm", algorithm, Algorithm, "an Algorithm "
                                      "(from fedjax_sim.algorithms.make)"),
                                     ("data", data, AnyFederatedData, "a FederatedData or "
                                      "RaggedFederatedData"),
                                     ("events", events, Events | None, "an Events or None")):
        if not isinstance(value, kind):
            raise TypeError(f"{label} must be {what}, got {type(value).__name__}")
    check_federated_data(data)
    if local_accuracies is not None:
        _check_local_accuracies("local_accuracies", local_accuracies, data.num_clients)
    check_model_fits(algorithm.models, data)
    validate_run_options(rounds=rounds, eval_every=eval_every, checkpoint_every=checkpoint_every)
    check_int("rounds_per_call", rounds_per_call, 1)
    check_seed("seed", seed)
    if devices is not None:
        check_int("devices", devices, 1)
    strategy_override()  # a malformed FEDJAX_SIM_STRATEGY fails here, not while tracing
    validate_divergence_policy(on_divergence)
    if resume and output is None:
        raise ValueError("resume needs an output folder to resume from")


def sweep_configs(
    name: str,
    hparams: dict,
    *,
    seeds: list[int] | None = None,
    lrs: list[float] | None = None,
    configs: list[dict] | None = None,
    num_splits: int = 1,
) -> list[tuple[int, dict, int]]:
    """The configurations of a sweep as ``(seed, overrides, split)``, checked on the host.

    Args:
      name: algorithm name.
      hparams: the algorithm's other hyperparameters (checked by the caller).
      seeds: seeds; every configuration runs once per seed (seeds varying fastest).
      lrs: learning rates: the configurations ``{"lr": lr}`` (``configs`` must be unset).
      configs: dicts of traced-hyperparameter overrides, each with its ``seed`` unless
        ``seeds`` is given, and optionally ``split``: the index of its data split.
      num_splits: how many data splits there are (``split`` is in ``[0, num_splits)``).

    Returns:
      One ``(seed, overrides, split)`` per configuration.

    Raises:
      ValueError: naming the entry: an empty or repeated list entry, a bad seed, split or
        value, a key that is not a traced hyperparameter of ``name``, ``lrs`` with
        ``configs``, a configuration without a seed, or two identical configurations.
    """
    from fedjax_sim import algorithms

    specs = {spec.name: spec for spec in algorithms.hparam_specs(name) if spec.traced}
    seeds, configs = _checked_axes(specs, seeds, lrs, configs)
    triples = []
    for i, config in enumerate(configs):
        overrides, split = _checked_config(name, specs, i, config, num_splits)
        if seeds is not None:
            if "seed" in config:
                raise ValueError(f"configs[{i}] sets a seed and seeds is given; give one")
            triples += [(s, overrides, split) for s in seeds]
        elif "seed" not in config:
            raise ValueError(f"configs[{i}] has no seed (give it one, or give seeds)")
        else:
            triples.append((check_seed(f"configs[{i}].seed", config["seed"]), overrides,
                            split))
    resolved = [(seed, split, algorithms.resolve(name, **{**hparams, **overrides}))
                for seed, overrides, split in triples]
    for j, entry in enumerate(resolved):
        if entry in resolved[:j]:
            where = f", split {entry[1]}" if num_splits > 1 else ""
            raise ValueError(f"configuration {j} (seed {entry[0]}, {triples[j][1]}{where}) "
                             f"repeats configuration {resolved.index(entry)} (each runs "
                             "once)")
    return triples


def _checked_axes(specs: dict, seeds: Any, lrs: Any, configs: Any
                  ) -> tuple[list[int] | None, list[dict]]:
    """``seeds`` checked, and the configurations (``configs``, or one per learning rate
    of ``lrs``, or one without overrides)."""
    from fedjax_sim.algorithms.base import check_hparam

    if seeds is not None:
        if isinstance(seeds, str | bytes) or not seeds:
            raise ValueError(f"seeds must be a non-empty list of seeds, got {seeds!r}")
        seeds = [check_seed(f"seeds[{i}]", s) for i, s in enumerate(seeds)]
        _refuse_repeats("seeds", seeds)
    if configs is None:
        if seeds is None:
            raise ValueError("seeds must be a non-empty list of seeds, got None")
        if lrs is None:
            return seeds, [{}]
        if isinstance(lrs, str | bytes) or not lrs:
            raise ValueError(f"lrs must be a non-empty list of learning rates, got {lrs!r}")
        lrs = [check_hparam(specs["lr"], lr, f"lrs[{i}]") for i, lr in enumerate(lrs)]
        _refuse_repeats("lrs", lrs)
        return seeds, [{"lr": lr} for lr in lrs]
    if lrs is not None:
        raise ValueError("give lrs or configs, not both (a config may set lr)")
    if isinstance(configs, dict | str | bytes) or not configs or not all(
            isinstance(c, dict) for c in configs):
        raise ValueError(f"configs must be a non-empty list of dicts, got {configs!r}")
    return seeds, configs


def _checked_config(name: str, specs: dict, i: int, config: dict, num_splits: int
                    ) -> tuple[dict, int]:
    """Configuration ``i``'s traced overrides (checked) and its split."""
    from fedjax_sim.algorithms.base import check_hparam

    overrides = {k: v for k, v in config.items() if k not in ("seed", "split")}
    unknown = sorted(set(overrides) - set(specs))
    if unknown:
        raise ValueError(
            f"configs[{i}]: {', '.join(unknown)} is not a traced hyperparameter of "
            f"{name}; a sweep varies {', '.join(specs)} (run the others separately)")
    overrides = {k: check_hparam(specs[k], v, f"configs[{i}].{k}")
                 for k, v in overrides.items()}
    split = config.get("split", 0)
    if not isinstance(split, int) or isinstance(split, bool) or not 0 <= split < num_splits:
        raise ValueError(f"configs[{i}].split must be an integer in [0, {num_splits}) "
                         f"(one of the data splits), got {split!r}")
    return overrides, split


def _refuse_repeats(label: str, values: list) -> None:
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ValueError(f"{label} lists {repeated[0]!r} twice (each configuration runs once)")


def _check_sweep(name: str, model: Any, splits: list, *, hparams: dict, seeds: Any, lrs: Any,
                 configs: Any, rounds: Any, eval_every: Any, rounds_per_call: Any,
                 devices: Any, on_divergence: Any, output: Any, config_strategy: Any,
                 per_config: dict) -> list[tuple[int, dict, int]]:
    """:func:`sweep`'s arguments, checked before anything compiles; its configurations."""
    from fedjax_sim import algorithms

    if not splits:
        raise ValueError("data must be FederatedData or a non-empty list of splits")
    for split in splits:
        check_federated_data(split)
        check_model_fits(model, split)
    validate_run_options(rounds=rounds, eval_every=eval_every)
    check_int("rounds_per_call", rounds_per_call, 1)
    if devices is not None:
        check_int("devices", devices, 1)
    validate_divergence_policy(on_divergence)
    if output is not None and per_config["outputs"] is not None:
        raise ValueError("give output (one sweep folder) or outputs (one per "
                         "configuration), not both")
    if config_strategy not in ("auto", "vmap", "map"):
        raise ValueError(f"config_strategy must be auto, vmap or map, got {config_strategy!r}")
    if algorithms.uses_public(name):
        raise ValueError(f"sweep does not support {name}: it needs public data")
    triples = sweep_configs(name, hparams, seeds=seeds, lrs=lrs, configs=configs,
                            num_splits=len(splits))
    for label, values in per_config.items():
        if values is not None and len(values) != len(triples):
            raise ValueError(f"{label} must have one entry per configuration "
                             f"({len(triples)}), got {len(values)}")
    for c, local in enumerate(per_config["local_accuracies"] or ()):
        split = triples[c][2]
        _check_local_accuracies(f"local_accuracies[{c}]", local, splits[split].num_clients)
    return triples
