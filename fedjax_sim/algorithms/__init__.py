"""Algorithm registry: ``make(name, model, **hparams)`` validates and builds an algorithm.

Each algorithm lives in its own module, with its paper in the module docstring, a factory
``(model, *, cover=(), **hparams) -> Algorithm`` and a tuple ``HPARAMS`` of its own
hyperparameters; the common ones (local budget, optimizer, participation, execution
strategy) are ``base.COMMON``.

Your own algorithm joins the registry with :func:`register` (``register(name, factory,
hparams)``) and then works wherever a built-in name does: ``make``, specs, config files,
sweeps, and the command line (``--plugin MODULE``, with a flag per hyperparameter). The
baselines FedProx, SCAFFOLD and FedOpt and IncFL are written this way (``fedprox.py``,
``scaffold.py``, ``fedopt.py``, ``incfl.py``). Installed packages add theirs through the entry-point
group ``fedjax_sim.algorithms`` (:data:`ENTRY_POINT_GROUP`), loaded on the first look-up.

Numeric hyperparameters marked ``traced`` (see ``base``) reach the round as data:
``Algorithm.round_with(state, data, hp)`` with ``hp = algorithm.hp(lr=..., ...)``; one
compiled round serves every value of them. ``traced_names(name)`` lists them.

``ALGORITHMS`` and ``DISTILLATION`` (read live: registered algorithms are in them) list
the names; ``DISTILLATION`` the algorithms that also need a public data set, passed as
``make(name, model, public=PublicData(...))`` (see ``fedjax_sim.data.public``); FedMD and
FCCL also accept a sequence of models (heterogeneous architectures) for ``model``.
"""

from __future__ import annotations

import dataclasses
import keyword
import types
import warnings
from collections.abc import Callable, Sequence

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
    Abilities,
    Algorithm,
    HParam,
    check_hparam,
    check_model_fits,
    numeric_values,
)
from fedjax_sim.models.base import Model

# The entry-point group a package names its algorithms in (``pyproject.toml``:
# ``[project.entry-points."fedjax_sim.algorithms"] name = "package.module[:register]"``).
ENTRY_POINT_GROUP = "fedjax_sim.algorithms"


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One registered algorithm."""

    name: str
    factory: Callable[..., Algorithm]
    hparams: tuple[HParam, ...]
    uses_public: bool = False
    takes_batch_order: bool = False
    abilities: Abilities = dataclasses.field(default_factory=Abilities)


_REGISTRY: dict[str, _Entry] = {}


def _builtin(module: types.ModuleType, *, uses_public: bool = False) -> None:
    name = module.__name__.rsplit(".", 1)[1]
    _REGISTRY[name] = _Entry(name, getattr(module, name), tuple(module.HPARAMS), uses_public,
                             getattr(module, "TAKES_BATCH_ORDER", False),
                             getattr(module, "ABILITIES", Abilities()))


for _module in (fedavg, local, fedavg_ft, fedper, fedrep, fedbabu, lg_fedavg, ditto, apfl,
                fedobp):
    _builtin(_module)
# Federated distillation: these take public data (``uses_public``).
for _module in (dsfl, fedmd, fccl, feddf):
    _builtin(_module, uses_public=True)
del _module

# Names that can never be registered again; the algorithms written as plug-ins (FedProx,
# SCAFFOLD, FedOpt, IncFL) join them once this module has imported them (at its end).
_BUILTIN: frozenset[str] = frozenset(_REGISTRY)
_entry_points_loaded = False


def register(
    name: str,
    factory: Callable[..., Algorithm],
    hparams: Sequence[HParam] = (),
    *,
    uses_public: bool = False,
    abilities: Abilities | None = None,
    replace: bool = False,
) -> None:
    """Adds an algorithm to the registry, where it works as the built-in ones do: ``make``,
    ``hparam_specs``, ``resolve``, ``resolve_cover``, ``uses_public``, experiment specs,
    config files, sweeps and the command line (``fedjax-sim run --plugin MODULE
    --algorithm NAME``, with a ``--flag`` per hyperparameter).

    Args:
      name: the registry name, a Python identifier (it names config tables and output
        folders).
      factory: ``factory(model, *, cover=(), **hp) -> Algorithm``; ``hp`` holds every
        resolved hyperparameter, the common ones (``base.COMMON``) and ``hparams``, and,
        with ``uses_public``, ``public`` (a ``PublicData``). Build the result with
        ``base.federated_algorithm`` (or ``base.assemble``) passing ``hparams`` as its
        ``specs`` and ``cover`` on, so that the traced hyperparameters reach the round as
        data.
      hparams: the algorithm's own hyperparameters (``base.COMMON`` is added). A name used
        by another algorithm must keep that one's type, default and ``traced`` flag: a
        config key or command-line flag means one thing.
      uses_public: the algorithm needs public data (``make(..., public=...)``; listed in
        ``DISTILLATION``).
      abilities: what it can do beyond the synchronous round (``base.Abilities``: the
        virtual clock, the asynchronous conditions, heterogeneous models); the default
        runs on the clock's synchronous conditions only.
      replace: replace an algorithm registered earlier under ``name`` (never a built-in).
        Registering the same factory, hyperparameters and ``uses_public`` again is a no-op.

    Raises:
      ValueError: a name that is not an identifier, a built-in name, a name registered
        already without ``replace``, a factory that is not callable, ``hparams`` that are
        not ``HParam`` s (or repeat a name, shadow a common one, conflict with another
        algorithm's, or have a default outside their own range).
    """
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"algorithm name must be a Python identifier (letters, digits, "
                         f"underscores, not starting with a digit), got {name!r}")
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in algorithm and cannot be registered again; "
                         "choose another name")
    abilities = Abilities() if abilities is None else abilities
    if not isinstance(abilities, Abilities):
        raise ValueError(f"abilities of algorithm {name!r} must be a base.Abilities, got "
                         f"{type(abilities).__name__}")
    existing = _REGISTRY.get(name)
    if existing is not None and (existing.factory, existing.hparams, existing.uses_public,
                                 existing.abilities) == (factory, tuple(hparams), uses_public,
                                                         abilities):
        return  # the same registration again (a plug-in loaded twice in one process)
    if name in _REGISTRY and not replace:
        raise ValueError(f"algorithm {name!r} is registered already; pass replace=True to "
                         "replace it")
    if not callable(factory):
        raise ValueError(f"factory of algorithm {name!r} must be callable "
                         f"(model, *, cover=(), **hp) -> Algorithm, got "
                         f"{type(factory).__name__}")
    if isinstance(hparams, HParam | str | bytes) or not isinstance(hparams, Sequence):
        raise ValueError(f"hparams of algorithm {name!r} must be a tuple of HParam, got "
                         f"{type(hparams).__name__}")
    specs = tuple(hparams)
    _check_specs(name, specs)
    if not isinstance(uses_public, bool):
        raise ValueError(f"uses_public must be True or False, got {uses_public!r}")
    _REGISTRY[name] = _Entry(name, factory, specs, uses_public, abilities=abilities)


def _check_specs(name: str, specs: tuple) -> None:
    common = {spec.name for spec in COMMON}
    others = {spec.name: (entry.name, spec) for entry in _REGISTRY.values()
              if entry.name != name for spec in entry.hparams}
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, HParam):
            raise ValueError(f"hparams[{i}] of algorithm {name!r} must be an HParam, got "
                             f"{type(spec).__name__}")
        if not spec.name.isidentifier():
            raise ValueError(f"hparams[{i}] of algorithm {name!r}: the name must be an "
                             f"identifier, got {spec.name!r}")
        if spec.name in common or spec.name in seen:
            raise ValueError(f"algorithm {name!r} defines hyperparameter {spec.name!r} "
                             + ("that every algorithm has (base.COMMON)" if spec.name in common
                                else "twice"))
        seen.add(spec.name)
        if spec.name in others:
            owner, other = others[spec.name]
            if ((spec.kind, spec.default, spec.traced)
                    != (other.kind, other.default, other.traced)):
                raise ValueError(
                    f"algorithm {name!r}: hyperparameter {spec.name!r} is also {owner}'s, "
                    f"with type {other.kind.__name__}, default {other.default!r}, "
                    f"traced={other.traced}; give it the same or another name")
        if spec.traced and spec.kind is not float:
            raise ValueError(f"algorithm {name!r}: traced hyperparameter {spec.name!r} must "
                             f"be a float (traced values reach the round as float32)")
        try:
            check_hparam(spec, spec.default, f"{name}: the default of {spec.name}")
        except ValueError as error:
            raise ValueError(str(error)) from None


def unregister(name: str) -> None:
    """Removes an algorithm added by :func:`register` (not a built-in one).

    Raises:
      ValueError: a built-in or unknown name.
    """
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in algorithm and cannot be removed")
    if name not in _REGISTRY:
        raise ValueError(f"no algorithm {name!r} is registered")
    del _REGISTRY[name]


def load_entry_points() -> None:
    """Imports the algorithms installed packages name in the entry-point group
    ``fedjax_sim.algorithms``, once. Each entry point is a module that registers its
    algorithms when imported, or a callable (``module:function``) that registers when
    called. One that fails to load is reported as a warning and skipped, so that one broken
    package does not stop every run. Called by every registry look-up."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True  # first: an entry point may look names up itself
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = point.load()
            if callable(loaded) and not isinstance(loaded, types.ModuleType):
                loaded()
        except Exception as error:  # any failure of third-party code
            warnings.warn(f"fedjax_sim algorithm entry point {point.name!r} ({point.value}) "
                          f"failed to load: {type(error).__name__}: {error}", RuntimeWarning,
                          stacklevel=2)


def names(*, public: bool | None = None) -> tuple[str, ...]:
    """Registered algorithm names, built-in ones first: every one, or with ``public`` those
    that do (True) or do not (False) need public data."""
    load_entry_points()
    return tuple(n for n, e in _REGISTRY.items() if public is None or e.uses_public == public)


def __getattr__(attribute: str):
    # ALGORITHMS and DISTILLATION are read live, so that algorithms registered later (and
    # installed ones, loaded on first use) are listed wherever they are read.
    if attribute == "ALGORITHMS":
        return names(public=False)
    if attribute == "DISTILLATION":
        return names(public=True)
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


def _entry(name: str) -> _Entry:
    if not isinstance(name, str) or name not in _REGISTRY:
        load_entry_points()
    if name not in _REGISTRY:
        raise ValueError(f"algorithm must be one of {', '.join(_REGISTRY)}; got {name!r}")
    return _REGISTRY[name]


def hparam_specs(name: str) -> tuple[HParam, ...]:
    """The common hyperparameters followed by the algorithm's own."""
    return COMMON + _entry(name).hparams


def traced_names(name: str) -> tuple[str, ...]:
    """The traced hyperparameters of algorithm ``name`` (those ``Algorithm.hp`` takes)."""
    return tuple(spec.name for spec in hparam_specs(name) if spec.traced)


def uses_public(name: str) -> bool:
    """Whether algorithm ``name`` needs public data (``make(..., public=...)``)."""
    return _entry(name).uses_public


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


def check_private(name: str, resolved: dict) -> None:
    """Refuses ``dp`` on for an algorithm that does not declare ``Abilities.private``.

    Raises:
      ValueError: naming the algorithm and those that run under differential privacy.
    """
    if resolved.get("dp", "off") != "off" and not _entry(name).abilities.private:
        able = ", ".join(n for n in names() if abilities(n).private)
        raise ValueError(f"{name} does not run under differential privacy (dp="
                         f"{resolved['dp']}): what its clients send is not one model update "
                         f"that clipping and noise cover; algorithms that do: {able}")


def takes_batch_order(name: str) -> bool:
    """Whether algorithm ``name`` accepts ``make(..., batch_order=...)``: host-drawn sample
    orders (R, K, E, N_max) replacing the random batch order (``core.local.FixedOrder``)."""
    return _entry(name).takes_batch_order


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


def _check_model(model) -> None:
    """Refuses a ``model`` that is not a ``Model`` or a non-empty list / tuple of them."""
    models = model if isinstance(model, list | tuple) else (model,)
    if models and all(isinstance(m, Model) for m in models):
        return
    hint = (f" (a model name such as {model!r} is not accepted: build the model with "
            "fedjax_sim.models.make_model(name, input_shape, num_classes))"
            if isinstance(model, str) else "")
    if not isinstance(model, list | tuple):
        got = f"{type(model).__name__} {model!r}"
    elif models:
        got = f"a {type(model).__name__} of " + ", ".join(type(m).__name__ for m in models)
    else:
        got = f"an empty {type(model).__name__}"
    raise TypeError(f"model must be a fedjax_sim.models.Model (FedMD and FCCL also take a "
                    f"non-empty list of Models), got {got}{hint}")


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

    Raises:
      TypeError: for a built-in algorithm, a ``model`` that is not a ``Model`` (nor a
        non-empty list or tuple of them).
      ValueError: an unknown name or a bad hyperparameter.
    """
    entry = _entry(name)
    if name in _BUILTIN:  # a registered factory checks the models it accepts itself
        _check_model(model)
    resolved = resolve(name, **hparams)
    if resolved.get("augment", "none") != "none":
        for m in model if isinstance(model, tuple | list) else (model,):
            shape = getattr(m, "input_shape", ())
            if len(shape) != 3:
                raise ValueError(f"augment={resolved['augment']!r} needs image inputs "
                                 f"(H, W, C); the model takes {tuple(shape)}: set augment "
                                 "to 'none'")
    models = model if isinstance(model, tuple | list) else (model,)
    if any(getattr(m, "has_stats", False) for m in models) and not entry.abilities.batch_norm:
        able = ", ".join(n for n in names() if abilities(n).batch_norm)
        raise ValueError(f"{name} does not train batch-normalized models (--model "
                         f"{next(m.name for m in models if m.has_stats)}): its clients do not "
                         f"update running statistics; algorithms that do: {able}")
    check_private(name, resolved)
    if resolved.get("dp", "off") != "off" and any(getattr(m, "has_stats", False)
                                                  for m in models):
        raise ValueError(f"dp={resolved['dp']} does not run batch-normalized models: their "
                         "running statistics would be clipped and noised with the weights")
    covered = resolve_cover(name, resolved, cover)
    extra = {}
    if batch_order is not None:
        if not takes_batch_order(name):
            raise ValueError(f"{name} takes no batch_order; algorithms that do: " + ", ".join(
                n for n in names() if takes_batch_order(n)))
        extra["batch_order"] = batch_order
    extra["cover"] = covered
    if entry.uses_public:
        algorithm = entry.factory(model, public=public, **extra, **resolved)
    elif public is not None:
        raise ValueError(f"{name} takes no public data")
    else:
        algorithm = entry.factory(model, **extra, **resolved)
    if not isinstance(algorithm, Algorithm):
        raise ValueError(f"the factory of algorithm {name!r} returned "
                         f"{type(algorithm).__name__}, not an Algorithm")
    for i, overrides in enumerate(cover or ()):
        try:  # the algorithm's own checks of traced values (e.g. FedOBP's)
            algorithm.hp(**overrides)
        except ValueError as error:
            raise ValueError(f"cover[{i}]: {error}") from None
    algorithm = algorithm._replace(abilities=entry.abilities)
    if isinstance(model, Model):
        return algorithm._replace(models=(model,))
    if isinstance(model, list | tuple):
        return algorithm._replace(models=tuple(model))
    return algorithm


def abilities(name: str) -> Abilities:
    """What algorithm ``name`` declares it can do (``base.Abilities``).

    Raises:
      ValueError: an unknown name.
    """
    return _entry(name).abilities


# The standard baselines and IncFL, written as plug-ins through ``register`` (as a user
# would); importing them registers them, and from here on their names are built-in ones too.
from fedjax_sim.algorithms import (  # noqa: E402, F401
    fedala,
    fedamp,
    fedbn,
    feddyn,
    fedopt,
    fedproto,
    fedprox,
    fedrod,
    incfl,
    moon,
    perfedavg,
    pfedhn,
    pfedme,
    scaffold,
)

_BUILTIN = frozenset(_REGISTRY)

__all__ = ["ALGORITHMS", "DISTILLATION", "ENTRY_POINT_GROUP", "Abilities", "Algorithm",
           "HParam", "abilities",
           "check_hparam", "check_model_fits", "hparam_specs", "load_entry_points", "make",
           "names", "register", "resolve", "resolve_cover", "takes_batch_order",
           "traced_names", "unregister", "uses_public"]
