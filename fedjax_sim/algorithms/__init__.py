"""Algorithm registry: ``make(name, model, **hparams)`` validates and builds an algorithm.

Each algorithm lives in its own module, with its paper in the module docstring, a factory
``(model, **hparams) -> Algorithm`` and a tuple ``HPARAMS`` of its own hyperparameters;
the common ones (local budget, optimizer, participation, execution strategy) are
``base.COMMON``.

Numeric hyperparameters marked ``traced`` (see ``base``) reach the round as data:
``Algorithm.round_with(state, data, hp)`` with ``hp = algorithm.hp(lr=..., ...)``; one
compiled round serves every value of them. ``traced_names(name)`` lists them.

``DISTILLATION`` lists the algorithms that also need a public data set, passed as
``make(name, model, public=PublicData(...))`` (see ``fedjax_sim.data.public``); FedMD and
FCCL also accept a sequence of models (heterogeneous architectures) for ``model``.
"""

from __future__ import annotations

from types import ModuleType

from fedjax_sim.algorithms import (
    apfl,
    ditto,
    dsfl,
    fccl,
    fedavg,
    fedavg_ft,
    fedbabu,
    feddf,
    fedmd,
    fedobp,
    fedper,
    fedrep,
    lg_fedavg,
    local,
)
from fedjax_sim.algorithms.base import (
    COMMON,
    Algorithm,
    HParam,
    check_hparam,
    check_model_fits,
    numeric_values,
)
from fedjax_sim.models.base import Model

_MODULES: dict[str, ModuleType] = {
    "fedavg": fedavg,
    "local": local,
    "fedavg_ft": fedavg_ft,
    "fedper": fedper,
    "fedrep": fedrep,
    "fedbabu": fedbabu,
    "lg_fedavg": lg_fedavg,
    "ditto": ditto,
    "apfl": apfl,
    "fedobp": fedobp,
}

ALGORITHMS: tuple[str, ...] = tuple(_MODULES)

# Federated distillation: these take public data (``uses_public``).
_MODULES.update({"dsfl": dsfl, "fedmd": fedmd, "fccl": fccl, "feddf": feddf})
DISTILLATION: tuple[str, ...] = ("dsfl", "fedmd", "fccl", "feddf")


def hparam_specs(name: str) -> tuple[HParam, ...]:
    """The common hyperparameters followed by the algorithm's own."""
    return COMMON + _module(name).HPARAMS


def traced_names(name: str) -> tuple[str, ...]:
    """The traced hyperparameters of algorithm ``name`` (those ``Algorithm.hp`` takes)."""
    return tuple(spec.name for spec in hparam_specs(name) if spec.traced)


def _module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(
            f"algorithm must be one of {', '.join(ALGORITHMS + DISTILLATION)}; got {name!r}")
    return _MODULES[name]


def uses_public(name: str) -> bool:
    """Whether algorithm ``name`` needs public data (``make(..., public=...)``)."""
    return getattr(_module(name), "USES_PUBLIC", False)


def resolve(name: str, **hparams) -> dict:
    """Checks ``hparams`` against the algorithm's specs and fills in defaults.

    Raises:
      ValueError: unknown algorithm or hyperparameter, wrong type, a float that is
        infinite or NaN, or a value out of range; the message names the parameter and what
        it allows (see ``base.check_hparam``).
    """
    specs = {spec.name: spec for spec in hparam_specs(name)}
    unknown = sorted(set(hparams) - set(specs))
    if unknown:
        raise ValueError(
            f"{name} has no hyperparameter {', '.join(unknown)}; valid: {', '.join(specs)}"
        )
    return {key: check_hparam(spec, hparams.get(key, spec.default))
            for key, spec in specs.items()}


def takes_batch_order(name: str) -> bool:
    """Whether algorithm ``name`` accepts ``make(..., batch_order=...)``: host-drawn sample
    orders (R, K, E, N_max) replacing the random batch order (``core.local.FixedOrder``)."""
    return getattr(_module(name), "TAKES_BATCH_ORDER", False)


def resolve_cover(name: str, hparams: dict, cover) -> tuple[dict[str, float], ...]:
    """Checks ``cover`` (dicts of traced-hyperparameter overrides) against the algorithm's
    specs and returns each as the full set of traced values over the resolved ``hparams``.

    Raises:
      ValueError: a cover that is not a sequence of dicts, a key that is not a traced
        hyperparameter of ``name``, or a value out of range (named ``cover[i].key``).
    """
    if cover is None:
        return ()
    if isinstance(cover, dict | str | bytes) or not all(isinstance(c, dict) for c in cover):
        raise ValueError(f"cover must be a list of dicts of traced hyperparameters, got "
                         f"{cover!r}")
    specs = hparam_specs(name)
    traced = {spec.name: spec for spec in specs if spec.traced}
    out = []
    for i, overrides in enumerate(cover):
        unknown = sorted(set(overrides) - set(traced))
        if unknown:
            raise ValueError(f"cover[{i}]: {', '.join(unknown)} is not a traced hyperparameter "
                             f"of {name}; traced: {', '.join(traced)}")
        checked = {key: check_hparam(traced[key], value, f"cover[{i}].{key}")
                   for key, value in overrides.items()}
        out.append(numeric_values(specs, {**hparams, **checked}))
    return tuple(out)


def make(name: str, model: Model, *, public=None, batch_order=None, cover=None,
         **hparams) -> Algorithm:
    """Builds algorithm ``name`` for ``model`` after validating ``hparams``.

    ``public`` (a ``PublicData``) is required by the ``DISTILLATION`` algorithms and refused
    by the others. ``batch_order`` (see ``takes_batch_order``) is accepted by FedAvg and
    FedPer only. ``cover`` lists other values of the traced hyperparameters (dicts of
    overrides) that ``round_with`` must accept besides these (a sweep's configurations):
    the program depends on that set where a value leaves a part out (``momentum`` and
    ``weight_decay`` all 0, see ``base``; FedOBP's EMA and quantile search). The result
    records ``model`` (``Algorithm.models``), which the runner checks against the data.
    """
    module = _module(name)
    resolved = resolve(name, **hparams)
    covered = resolve_cover(name, resolved, cover)
    extra = {}
    if batch_order is not None:
        if not takes_batch_order(name):
            raise ValueError(f"{name} takes no batch_order; algorithms that do: " + ", ".join(
                n for n in ALGORITHMS + DISTILLATION if takes_batch_order(n)))
        extra["batch_order"] = batch_order
    extra["cover"] = covered
    if uses_public(name):
        algorithm = getattr(module, name)(model, public=public, **extra, **resolved)
    elif public is not None:
        raise ValueError(f"{name} takes no public data")
    else:
        algorithm = getattr(module, name)(model, **extra, **resolved)
    for i, overrides in enumerate(cover or ()):
        try:  # the algorithm's own checks of traced values (e.g. FedOBP's)
            algorithm.hp(**overrides)
        except ValueError as error:
            raise ValueError(f"cover[{i}]: {error}") from None
    if isinstance(model, Model):
        return algorithm._replace(models=(model,))
    if isinstance(model, list | tuple):
        return algorithm._replace(models=tuple(model))
    return algorithm


__all__ = ["ALGORITHMS", "DISTILLATION", "Algorithm", "HParam", "check_hparam",
           "check_model_fits", "hparam_specs", "make", "resolve", "resolve_cover",
           "takes_batch_order", "traced_names", "uses_public"]
