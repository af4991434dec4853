"""What every algorithm is: a pure (init, round, evaluate) triple made by a factory.

A factory captures the model and the hyperparameters, optax-style, and returns an
``Algorithm``. ``round`` and ``evaluate`` are pure and jittable; the host loop lives in
``fedjax_sim.runner``.

Hyperparameters are of two kinds. The *traced* ones are numbers that change no shape, no
loop length and no branch of the program; they reach the round as data, in ``hp``, a dict
of scalar arrays (``Algorithm.round_with(state, data, hp)``), so that one compiled round
serves any of their values and a sweep over them is one program:

* common: ``lr``, ``momentum``, ``weight_decay``;
* FedOBP: ``ig_ratio``, ``ema_alpha``; Ditto: ``ditto_lambda``; APFL: ``apfl_alpha``,
  ``apfl_alpha_lr``;
* distillation: ``distill_lr``, ``dsfl_temperature``, ``fccl_lambda``,
  ``fccl_public_lr``, ``feddf_lr``, ``feddf_temperature``.

The *structural* ones are closed over: ``join_ratio`` (it fixes the cohort size),
``local_epochs``, ``local_steps``, ``batch_size`` and every other integer (epochs, steps,
batch sizes, layer counts), every choice (strategies, variants, norms, scopes, losses) and
every boolean. ``HParam.traced`` marks the first kind.

An algorithm is built for its own values and those of ``cover`` (``algorithms.make(...,
cover=[{...}, ...])``, what a sweep passes), and a few parts of the program depend on that
set, never on a single value: where every ``momentum`` (or ``weight_decay``) of the set is
0, it is compiled in as 0 and left out of ``hp``, and the client optimizer is plain SGD
(no momentum buffer, no decay pass: vmapped rounds run 15-18% faster on CPU); otherwise
it is traced, and a 0 among the values gives plain SGD's floats bit for bit (``g + 0·t``
and ``g + 0·w`` are ``g``). FedOBP keeps EMA state when one of its ``ema_alpha`` values is
above 0 and sizes its top-k quantile search for its ``ig_ratio`` values.
``Algorithm.hp`` refuses values outside what the round was built for.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.checks import INT32_MAX
from fedjax_sim.core import privacy as privacy_lib
from fedjax_sim.core.cohort import STRATEGIES, Execution
from fedjax_sim.core.evaluate import score
from fedjax_sim.core.local import weighted_cross_entropy
from fedjax_sim.core.rounds import Method, federated
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.kernels.augment import AUGMENTATIONS
from fedjax_sim.models.base import Model

# Traced hyperparameters as the round receives them: name -> scalar array.
Traced = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Abilities:
    """What an algorithm can do beyond the synchronous round, declared by the algorithm
    (a module's ``ABILITIES``, or ``algorithms.register(..., abilities=...)``) and read by
    the checks instead of lists of names.

    Attributes:
      clock: it runs on the virtual clock (``--system``, ``--condition``); False where the
        server state a clock's partial cohorts would break.
      clock_refusal: why not, when ``clock`` is False (shown in the refusal).
      asynchronous: it also runs under the asynchronous conditions (FedAsync, FedBuff):
        its uploads live in the space of the model the server sends, so a stale one can
        be mixed in.
      heterogeneous: it takes a tuple of models, one architecture per client group
        (``--architectures``).
      batch_norm: it trains batch-normalized models (``Model.has_stats``) correctly: its
        clients train through the standard local step (``local_sgd``), which updates the
        running statistics, and it says how it aggregates them; the others refuse such a
        model in ``make``.
      private: it runs under user-level differential privacy (``dp``, ``core.privacy``):
        each client uploads only a model in the space of what the server sent (the
        model or its shared part) and the server reads nothing else of it, so clipping
        and noising that update covers everything a client sends.
    """

    clock: bool = True
    clock_refusal: str = ""
    asynchronous: bool = False
    heterogeneous: bool = False
    batch_norm: bool = False
    private: bool = False

    def __post_init__(self):
        for name in ("clock", "asynchronous", "heterogeneous", "batch_norm", "private"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Abilities.{name} must be True or False, got "
                                f"{getattr(self, name)!r}")
        if not isinstance(self.clock_refusal, str):
            raise TypeError(f"Abilities.clock_refusal must be a str, got "
                            f"{self.clock_refusal!r}")


# Uploads in the global model's space: the asynchronous conditions can mix stale ones in,
# and differential privacy can clip and noise them.
ASYNCHRONOUS = Abilities(asynchronous=True, private=True)
# ... and trains batch-normalized models through the standard local step.
ASYNCHRONOUS_BN = Abilities(asynchronous=True, batch_norm=True, private=True)


class Algorithm(NamedTuple):
    """A federated algorithm bound to a model and its hyperparameters.

    Attributes:
      name: registry name.
      init: ``(key, data) -> SimState``.
      round: ``(state, data) -> (state, metrics)``; pure, jittable.
      evaluate: ``(state, data) -> (correct[K], loss_sum[K])`` of the model each client
        would use (its personalized model) on its own test set; pure, jittable.
      comm_bytes: ``(data) -> (up, down)`` bytes per round over all sampled clients,
        float32 payloads.
      hparams: the resolved hyperparameters.
      report: optional ``(state) -> dict`` of algorithm-specific facts for ``summary.json``
        (e.g. FedOBP's personalized fraction); called on the host after the last round.
      models: the model(s) it was built for, set by ``algorithms.make`` so that the runner
        can check them against the data (``check_model_fits``); empty when unknown.
      numeric: the traced hyperparameters at their resolved values (an unset optional one,
        e.g. ``apfl_alpha_lr``, at the value it stands for); empty for an algorithm built by
        hand.
      encode: ``(overrides) -> hp``: checks a dict of traced-hyperparameter overrides on
        the host and returns the full ``hp`` that ``round_with`` takes (see :meth:`hp`).
      init_with, round_with, evaluate_with: ``init``, ``round`` and ``evaluate`` with the
        traced hyperparameters as a last argument ``hp``; ``init``, ``round`` and
        ``evaluate`` are these at ``hp()`` (the same floats, bit for bit). ``None`` for an
        algorithm built by hand (the runner then calls the plain ones).
      with_clock: ``(clock) -> Algorithm``, the same algorithm on the virtual clock of a
        ``core.clock.Clock`` (see :func:`clocked`); ``None`` for an algorithm outside the
        standard round skeleton.
      clock: the ``core.clock.Clock`` it runs on, or ``None``.
      abilities: what it can do beyond the synchronous round (:class:`Abilities`), set
        by ``algorithms.make`` from the registry.
    """

    name: str
    init: Callable[[jax.Array, FederatedData], SimState]
    round: Callable[[SimState, FederatedData], tuple[SimState, dict]]
    evaluate: Callable[[SimState, FederatedData], tuple[jax.Array, jax.Array]]
    comm_bytes: Callable[[FederatedData], tuple[int, int]]
    hparams: dict
    report: Callable[[SimState], dict] | None = None
    models: tuple[Model, ...] = ()
    numeric: Mapping[str, float] = types.MappingProxyType({})
    encode: Callable[[Mapping[str, float]], Traced] | None = None
    init_with: Callable[[jax.Array, FederatedData, Traced], SimState] | None = None
    round_with: Callable[[SimState, FederatedData, Traced], tuple[SimState, dict]] | None = None
    evaluate_with: Callable[[SimState, FederatedData, Traced], tuple] | None = None
    with_clock: Callable[[Any], Algorithm] | None = None
    clock: Any = None
    abilities: Abilities = Abilities()

    def hp(self, **overrides: float) -> Traced:
        """The traced hyperparameters ``round_with`` takes: these defaults with
        ``overrides`` (traced hyperparameters only), checked on the host.

        Returns:
          A dict of NumPy scalars (float32; a few algorithms add int32 or bool entries
          derived on the host, e.g. FedOBP's quantile plan); ``{}`` for an algorithm built
          by hand.

        Raises:
          ValueError: an override that is not a traced hyperparameter of this algorithm,
            or a value outside its range or outside what this round was built for.
        """
        if self.encode is None:
            if overrides:
                raise ValueError(f"{self.name} takes no traced hyperparameters, got "
                                 f"{', '.join(overrides)}")
            return {}
        return self.encode(overrides)

    def with_hp(self) -> tuple[Callable, Callable, Callable]:
        """``(init_with, round_with, evaluate_with)``, also for an algorithm built by hand
        (whose functions then ignore ``hp``)."""
        if self.round_with is not None:
            return self.init_with, self.round_with, self.evaluate_with
        return (lambda key, data, hp: self.init(key, data),
                lambda state, data, hp: self.round(state, data),
                lambda state, data, hp: self.evaluate(state, data))


@dataclasses.dataclass(frozen=True)
class HParam:
    """One hyperparameter: its default, type, valid range and help text."""

    name: str
    default: Any
    kind: type
    check: Callable[[Any], bool]
    allowed: str
    help: str
    choices: tuple | None = None
    # A number that reaches the round as data (see the module docstring).
    traced: bool = False
    # For an optional traced float: the hyperparameter whose value it takes when unset.
    fallback: str | None = None
    # 0 leaves a part of the program out (momentum's buffer, the decay pass): when every
    # value an algorithm is built for is 0, the value is compiled in rather than traced.
    zero_off: bool = False
    # The values ``compare --tune --tune-own`` tries for a method's key hyperparameter
    # (one per method; a traced one, so the tuning grid stays one program).
    tune_values: tuple | None = None


def check_hparam(spec: HParam, value: Any, label: str | None = None) -> Any:
    """Checks one hyperparameter value against its spec.

    The type comes first, then, for floats, finiteness (infinity and NaN pass many range
    checks, e.g. ``v > 0``), for integers a bound of 2**31 - 1 (they become int32 arrays and
    loop bounds), and last the spec's own range check.

    Args:
      spec: the hyperparameter.
      value: its value; ``None`` stands for "unset" where the spec allows it.
      label: how the message names it (default ``spec.name``; ``--lr`` on the command line).

    Returns:
      The value, an int turned into a float for float hyperparameters.

    Raises:
      ValueError: naming ``label`` and what the spec allows, e.g.
        "lr must be a finite number > 0, got inf".
    """
    label = label or spec.name
    if value is None and spec.default is not None:
        raise ValueError(f"{label} must be {spec.allowed}, got None")
    if value is not None:
        if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, spec.kind) or (spec.kind is int and isinstance(value, bool)):
            raise ValueError(
                f"{label} must be {spec.allowed} ({spec.kind.__name__}), got {value!r}"
            )
        if spec.kind is float and not math.isfinite(value):
            raise ValueError(f"{label} must be a finite number {spec.allowed}, got {value!r}")
        if spec.kind is int and value > INT32_MAX:
            raise ValueError(f"{label} must be {spec.allowed}, at most 2**31 - 1, got {value!r}")
    if not spec.check(value):
        raise ValueError(f"{label} must be {spec.allowed}, got {value!r}")
    return value


def _positive_int(name, default, help):
    return HParam(name, default, int, lambda v: v >= 1, "a positive integer", help)


def _optional_positive_int(name, help):
    return HParam(
        name, None, int, lambda v: v is None or v >= 1, "a positive integer or unset", help
    )


def _optional_float(name, check, allowed, help):
    return HParam(name, None, float, lambda v: v is None or check(v), f"{allowed} or unset",
                  help)


# User-level differential privacy (``core.privacy``); off by default.
PRIVACY = (
    HParam("dp", "off", str, lambda v: v in privacy_lib.MODES,
           f"one of {privacy_lib.MODES}", "user-level differential privacy (DP-FedAvg): "
           "off, fixed clipping, or adaptive clipping (Andrew et al. 2021)",
           choices=privacy_lib.MODES),
    HParam("dp_sampling", "poisson", str, lambda v: v in privacy_lib.SAMPLINGS,
           f"one of {privacy_lib.SAMPLINGS}", "how a private round samples its cohort: each "
           "client with probability join_ratio (poisson), or round(join_ratio N) clients "
           "(fixed)", choices=privacy_lib.SAMPLINGS),
    HParam("dp_noise_multiplier", 1.0, float, lambda v: v >= 0, ">= 0",
           "σ: the Gaussian noise's standard deviation over the clip norm (unset with "
           "dp_target_epsilon: calibrated)", traced=True),
    HParam("dp_clip_norm", 1.0, float, lambda v: v > 0, "> 0",
           "C: L2 norm each client update is clipped to (adaptive: the initial C)",
           traced=True),
    HParam("dp_target_quantile", 0.5, float, lambda v: 0 <= v <= 1, "in [0, 1]",
           "adaptive clipping: the quantile of the update norms C follows", traced=True),
    HParam("dp_clip_lr", 0.2, float, lambda v: v >= 0, ">= 0",
           "adaptive clipping: the geometric step size of C", traced=True),
    _optional_float("dp_count_noise_multiplier", lambda v: v > 0, "> 0",
                    "adaptive clipping: σ_b of the clipped count (default: the expected "
                    "cohort / 20)"),
    _optional_float("dp_delta", lambda v: 0 < v < 1, "in (0, 1)",
                    "δ of the reported ε (default 1 / number of clients)"),
    _optional_float("dp_target_epsilon", lambda v: v > 0, "> 0",
                    "privacy budget ε: calibrates σ for the planned rounds, or refuses "
                    "rounds that would exceed it"),
    HParam("dp_accountant", "rdp", str, lambda v: v in privacy_lib.ACCOUNTANTS,
           f"one of {privacy_lib.ACCOUNTANTS}", "dp-accounting's accountant: rdp (Rényi) "
           "or pld (privacy loss distributions; poisson sampling only)",
           choices=privacy_lib.ACCOUNTANTS),
)


COMMON = (
    _positive_int("local_epochs", 5, "local epochs per round"),
    _optional_positive_int(
        "local_steps", "fixed local steps per round instead of epochs (batches drawn with "
        "replacement)"
    ),
    _positive_int("batch_size", 32, "local mini-batch size"),
    HParam("lr", 0.01, float, lambda v: v > 0, "> 0", "client learning rate", traced=True),
    HParam("momentum", 0.0, float, lambda v: 0 <= v < 1, "in [0, 1)", "client SGD momentum",
           traced=True, zero_off=True),
    HParam("weight_decay", 0.0, float, lambda v: v >= 0, ">= 0", "client L2 weight decay",
           traced=True, zero_off=True),
    HParam(
        "join_ratio", 1.0, float, lambda v: 0 < v <= 1, "in (0, 1]",
        "fraction of clients sampled per round",
    ),
    HParam(
        "client_strategy", "auto", str, lambda v: v in STRATEGIES, f"one of {STRATEGIES}",
        "how clients run: vmap, sequential map, chunked map, or auto by backend",
        choices=STRATEGIES,
    ),
    _positive_int("chunk_size", 8, "clients per chunk for client_strategy=chunked"),
    *PRIVACY,
    HParam(
        "augment", "none", str, lambda v: v in AUGMENTATIONS, f"one of {AUGMENTATIONS}",
        "augment every local batch in the jitted step: crop_flip is CIFAR's random crop "
        "(padding 4) and horizontal flip, each sample its own draw",
        choices=AUGMENTATIONS,
    ),
)


def client_optimizer(hp: Mapping) -> optax.GradientTransformation:
    """SGD with optional momentum and L2 weight decay (the PFL benchmarks' client optimizer).

    ``lr``, ``momentum`` and ``weight_decay`` may be Python floats or (traced) scalar
    arrays. A momentum or decay that is a Python 0 leaves its part out (plain SGD); an
    array, even one holding 0, keeps it, with plain SGD's floats at 0.
    """
    momentum, decay = hp["momentum"], hp["weight_decay"]
    sgd = optax.sgd(hp["lr"], momentum=None if _compiled_zero(momentum) else momentum)
    if _compiled_zero(decay):
        return sgd
    return optax.chain(optax.add_decayed_weights(decay), sgd)


def _compiled_zero(value: Any) -> bool:
    return isinstance(value, int | float) and value == 0


def cross_entropy_loss(model: Model) -> Callable:
    """``(params, xb, yb, wb) -> weighted mean cross-entropy`` for ``model``.

    Raises:
      ValueError: for a model with running statistics (batch normalization), whose
        training loss is :func:`train_loss`'s: an algorithm that builds its own local loss
        on this one would train it in evaluation mode and never update its statistics.
    """
    if model.has_stats:
        raise ValueError(batch_norm_refusal(model))

    def loss(params, xb, yb, wb):
        return weighted_cross_entropy(model.apply(params, xb), yb, wb)

    return loss


def train_loss(model: Model) -> Callable:
    """The local training loss of ``model``: :func:`cross_entropy_loss` for a model
    without running statistics; for a batch-normalized one,
    ``(params, xb, yb, wb) -> (weighted mean cross-entropy, new_stats)`` in training mode
    (``Model.train``: batch statistics over the rows with weight > 0), the form
    ``core.local.train(..., stats=model.state_names)`` takes."""
    if not model.has_stats:
        return cross_entropy_loss(model)

    def loss(params, xb, yb, wb):
        logits, new_stats = model.train(params, xb, wb)
        return weighted_cross_entropy(logits, yb, wb), new_stats

    return loss


def batch_norm_refusal(model: Model) -> str:
    """The one-line refusal of an algorithm with its own local loss for a model with
    running statistics."""
    return (f"model {model.name} has batch normalization (running statistics in "
            f"{', '.join(model.state_names)}), which this algorithm's own local loss does not "
            "train; algorithms that do: fedbn, fedavg, local, fedprox, scaffold, fedper, "
            "lg_fedavg, fedbabu, fedavg_ft")


def schedule(hp: dict, epochs: int | None = None) -> dict:
    """Keyword arguments of ``core.local`` for this run's local budget (and augmentation,
    when one is set)."""
    extra = {"augment": hp["augment"]} if hp.get("augment", "none") != "none" else {}
    if hp["local_steps"] is not None:
        return {"batch_size": hp["batch_size"], "steps": hp["local_steps"], **extra}
    return {"batch_size": hp["batch_size"], "epochs": hp["local_epochs"] if epochs is None
            else epochs, **extra}


def check_model_fits(model: Model | Sequence[Model], data: FederatedData) -> None:
    """Refuses a model that cannot learn ``data``, before anything is compiled.

    A model needs at least one output per class of the data (more are allowed: the extra
    logits are never a label) and must take the data's input shape.

    Args:
      model: a Model, or a sequence of Models (every one is checked; empty: nothing).
      data: the federated data.

    Raises:
      ValueError: naming the model, its outputs or input shape, and the data's.
    """
    models = (model,) if isinstance(model, Model) else tuple(model)
    for i, m in enumerate(models):
        if not isinstance(m, Model):
            raise ValueError(f"model must be a Model or a sequence of Models, got "
                             f"{type(m).__name__}")
        which = f"model {m.name}" + (f" (architecture {i})" if len(models) > 1 else "")
        if m.num_classes < data.num_classes:
            raise ValueError(
                f"{which} has {m.num_classes} outputs but the data has labels "
                f"0..{data.num_classes - 1} (num_classes={data.num_classes})"
            )
        if tuple(m.input_shape) != tuple(data.input_shape):
            raise ValueError(
                f"{which} takes input shape {tuple(m.input_shape)} but the data's is "
                f"{tuple(data.input_shape)}"
            )


def local_sgd(
    model: Model,
    hp: dict,
    *,
    optimizer: optax.GradientTransformation | None = None,
    loss_fn: Callable | None = None,
    epochs: int | None = None,
) -> Callable:
    """One client's local training with this run's budget:
    ``(params, x, y, n, key) -> (params, mean loss)``.

    For a model with running statistics (batch normalization) every step trains in
    training mode and then replaces the statistics by their moving average
    (``core.local.sgd_step``): algorithms that train through here with the default loss
    support such models, and aggregate the statistics as they aggregate the weights.

    Args:
      optimizer: defaults to ``client_optimizer(hp)`` (pass a ``core.local.frozen`` one to
        train only some layers).
      loss_fn: defaults to the model's weighted cross-entropy (:func:`train_loss`).
      epochs: overrides ``local_epochs`` (ignored when ``local_steps`` is set).

    Raises:
      ValueError: a ``loss_fn`` for a model with running statistics (see
        :func:`cross_entropy_loss`).
    """
    from fedjax_sim.core import local

    if model.has_stats and loss_fn is not None:
        raise ValueError(batch_norm_refusal(model))
    optimizer = optimizer or client_optimizer(hp)
    loss_fn = loss_fn or train_loss(model)
    budget = schedule(hp, epochs=epochs)
    if model.has_stats:
        budget["stats"] = model.state_names

    def train(params, x, y, n, key):
        return local.train(loss_fn, optimizer, params, x, y, n, key, **budget)

    return train


def check_batch_order(batch_order: Any, hp: dict) -> np.ndarray | None:
    """Checks a factory's ``batch_order`` argument against the local budget.

    ``batch_order`` (R, K, E, N_max) fixes every client's sample order per round and epoch
    (``core.local.FixedOrder``, ``core.local.sample_batch_orders``); round ``r`` uses
    ``batch_order[r % R]``. Its K and N_max are checked against the data when the round is
    traced, and its values by ``core.local.check_batch_orders``.

    Returns:
      ``batch_order`` as an int32 NumPy array, or ``None``.

    Raises:
      ValueError: if it is not a 4-D integer array, if ``local_steps`` is set (fixed orders
        are per epoch) or if E differs from ``local_epochs``.
    """
    if batch_order is None:
        return None
    order = np.asarray(batch_order)
    if order.ndim != 4 or not np.issubdtype(order.dtype, np.integer) or order.shape[0] < 1:
        raise ValueError("batch_order must be an integer array (rounds, clients, epochs, "
                         f"N_max) with rounds >= 1, got dtype {order.dtype} and shape "
                         f"{order.shape}")
    if hp["local_steps"] is not None:
        raise ValueError("batch_order needs local_epochs; it cannot be used with local_steps "
                         f"(got local_steps={hp['local_steps']})")
    if order.shape[2] != hp["local_epochs"]:
        raise ValueError(f"batch_order has {order.shape[2]} epochs per round (axis 2); "
                         f"local_epochs is {hp['local_epochs']}")
    return order.astype(np.int32)


def execution(hp: Mapping) -> Execution:
    """The execution strategy of the resolved hyperparameters ``hp`` (``client_strategy``,
    ``chunk_size``), read once per algorithm."""
    return Execution(hp["client_strategy"], hp["chunk_size"])


def numeric_values(specs: Sequence[HParam], hp: Mapping) -> dict[str, float]:
    """The traced hyperparameters of the resolved ``hp`` as floats.

    An unset optional one (``None``) takes the value of its ``fallback`` (e.g.
    ``apfl_alpha_lr`` unset is the client ``lr``).
    """
    values = {}
    for spec in specs:
        if spec.traced:
            value = hp[spec.name]
            if value is None:
                value = hp[spec.fallback]
            values[spec.name] = float(value)
    return values


def as_traced(values: Mapping[str, Any]) -> Traced:
    """``values`` as NumPy float32 scalars (what a round receives as ``hp``)."""
    return {name: np.asarray(value, np.float32) for name, value in values.items()}


def assemble(
    name: str,
    hp: dict,
    specs: Sequence[HParam],
    *,
    init_with: Callable,
    round_with: Callable,
    evaluate_with: Callable,
    comm_bytes: Callable,
    report: Callable | None = None,
    derive: Callable[[dict[str, float]], Traced] | None = None,
    cover: Sequence[Mapping[str, float]] = (),
) -> Algorithm:
    """An ``Algorithm`` from functions that take the traced hyperparameters last.

    Args:
      name: registry name.
      hp: the resolved hyperparameters.
      specs: the algorithm's own ``HPARAMS`` (``COMMON`` is added here).
      init_with, round_with, evaluate_with: ``(..., hp)`` forms of init, round, evaluate.
      comm_bytes, report: as in ``Algorithm``.
      derive: ``(values) -> entries`` added to ``hp`` for the given float values (e.g.
        quantities computed on the host in float64); it may raise ValueError for values
        the round was not built for.
      cover: the other values of the traced hyperparameters the round is built for (each
        the full set of floats, as ``algorithms.resolve_cover`` makes them): a
        ``zero_off`` hyperparameter (``momentum``, ``weight_decay``) that is 0 here and in
        every cover is compiled in as 0 and left out of ``hp``.

    Returns:
      The algorithm; its ``init``, ``round`` and ``evaluate`` run the ``_with`` forms at
      the traced defaults.
    """
    specs = tuple(COMMON) + tuple(specs)
    by_name = {spec.name: spec for spec in specs if spec.traced}
    numeric = numeric_values(specs, hp)
    compiled = {spec.name for spec in specs if spec.zero_off
                and all(values[spec.name] == 0 for values in (numeric, *cover))}
    # Without DP its traced values reach nothing: left out of hp.
    unused = ({spec.name for spec in PRIVACY if spec.traced}
              if hp.get("dp", "off") == "off" else set())

    def encode(overrides: Mapping[str, float]) -> Traced:
        unknown = sorted(set(overrides) - set(by_name))
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)} is not a traced hyperparameter of {name}; traced: "
                f"{', '.join(by_name)} (the others fix the program's structure)")
        checked = {key: check_hparam(by_name[key], value) for key, value in overrides.items()}
        changed = sorted(k for k in unused & set(checked) if checked[k] != numeric[k])
        if changed:
            raise ValueError(f"{changed[0]}: this {name} round was built with dp off (no "
                             "part of the program for it)")
        values = numeric_values(specs, {**hp, **checked})
        for key in sorted(compiled):
            if values[key] != 0:
                raise ValueError(
                    f"{key}={values[key]}: this {name} round was built with {key} 0 only "
                    "(compiled in, no part of the program for it); build it with "
                    "make(..., cover=...) naming this value")
        traced = as_traced({k: v for k, v in values.items()
                            if k not in compiled and k not in unused})
        if derive is not None:
            traced.update(derive(values))
        return traced

    defaults = encode({})
    return Algorithm(
        name,
        lambda key, data: init_with(key, data, defaults),
        lambda state, data: round_with(state, data, defaults),
        lambda state, data: evaluate_with(state, data, defaults),
        comm_bytes, hp, report, (), numeric, encode,
        init_with, round_with, evaluate_with,
    )


def num_params_bytes(model: Model, names: tuple[str, ...] | None = None) -> int:
    """float32 bytes of the model's parameters (of the top-level layers ``names`` if given)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    if names is not None:
        shapes = {n: s for n, s in shapes.items() if n in names}
    return 4 * sum(int(leaf.size) for leaf in jax.tree.leaves(shapes))


def per_round_bytes(hp: dict, up_per_client: int, down_per_client: int) -> Callable:
    """``comm_bytes`` for algorithms whose payload per sampled client is fixed."""
    from fedjax_sim.core.cohort import cohort_size

    def comm_bytes(data: FederatedData) -> tuple[int, int]:
        size = cohort_size(data.num_clients, hp["join_ratio"])
        return size * up_per_client, size * down_per_client

    return comm_bytes


def shared_logits(model: Model) -> Callable:
    """Evaluation logits for algorithms whose clients all use the global model."""
    return lambda _client, params, x: model.apply(params, x)


def federated_algorithm(
    name: str,
    hp: dict,
    specs: Sequence[HParam],
    method: Method,
    *,
    init_with: Callable,
    comm_bytes: Callable,
    report: Callable | None = None,
    evaluate_with: Callable | None = None,
    batch_order: Any = None,
    derive: Callable | None = None,
    cover: Sequence[Mapping[str, float]] = (),
    clock: Any = None,
) -> Algorithm:
    """An algorithm made of its own parts (``method``, a ``core.rounds.Method``) in the
    shared round skeleton, with this run's participation and execution strategy.

    Args:
      name, hp, specs, comm_bytes, report, derive, cover: as in :func:`assemble`.
      method: the client update, server update and personalized logits.
      init_with: ``(key, data, hp) -> SimState``.
      evaluate_with: replaces the skeleton's evaluation (e.g. :func:`finetuned_evaluate`).
      batch_order: optional host sample orders (see :func:`check_batch_order`).
      clock: optional ``core.clock.Clock``: the round runs on the virtual clock (prefer
        :func:`clocked`, which checks it first).
    """
    init_with_arg, report_arg = init_with, report
    privacy = privacy_lib.make_privacy(hp) if clock is None else None
    round_with, default_evaluate = federated(
        method, join_ratio=hp["join_ratio"], execution=execution(hp),
        batch_order=check_batch_order(batch_order, hp), clock=clock,
        budget=(hp["local_epochs"], hp["local_steps"], hp["batch_size"]),
        comm_bytes=comm_bytes, privacy=privacy,
    )
    if privacy is not None:
        init_with = _with_privacy_state(init_with)
    step_bytes = comm_bytes
    if clock is not None:
        from fedjax_sim.core import clock as clock_lib

        init_with = clock_lib.clocked_init(method, init_with, clock)
        report = _with_participation(report)
        if clock.asynchronous:
            step_bytes = _step_bytes(comm_bytes, hp["join_ratio"], clock)
    algorithm = assemble(name, hp, specs, init_with=init_with, round_with=round_with,
                         evaluate_with=evaluate_with or default_evaluate,
                         comm_bytes=step_bytes, report=report, derive=derive, cover=cover)

    def with_clock(new_clock):
        return federated_algorithm(
            name, hp, specs, method, init_with=init_with_arg, comm_bytes=comm_bytes,
            report=report_arg, evaluate_with=evaluate_with, batch_order=batch_order,
            derive=derive, cover=cover, clock=new_clock)

    return algorithm._replace(with_clock=with_clock, clock=clock)


def _with_privacy_state(init_with: Callable) -> Callable:
    def init(key, data, traced):
        return init_with(key, data, traced).replace(privacy=privacy_lib.init_state(traced))

    return init


def _step_bytes(comm_bytes: Callable, join_ratio: float, clock: Any) -> Callable:
    """``comm_bytes`` of one asynchronous server step: the B arrivals it merges (and the B
    models it sends to the clients it dispatches in their place), not a cohort."""
    from fedjax_sim.core.cohort import cohort_size

    def step_bytes(data: FederatedData) -> tuple[int, int]:
        up, down = comm_bytes(data)
        size = cohort_size(data.num_clients, join_ratio)
        arrivals = clock.buffer(size)
        return up // size * arrivals, down // size * arrivals

    return step_bytes


def _with_participation(report: Callable | None) -> Callable:
    from fedjax_sim.core.clock import participation_report

    def combined(state):
        own = report(state) if report is not None else {}
        return {**own, **participation_report(state)}

    return combined


def check_clock_support(name: str, abilities: Abilities, condition: str,
                        asynchronous: bool) -> None:
    """Refuses an algorithm the virtual clock cannot serve under ``condition``, from its
    declared :class:`Abilities`.

    Raises:
      ValueError: naming the algorithm, the condition and why.
    """
    if not abilities.clock:
        raise ValueError(f"algorithm {name} cannot run under condition {condition}: "
                         f"{abilities.clock_refusal or 'it does not run on the clock'}")
    if asynchronous and not abilities.asynchronous:
        raise ValueError(f"algorithm {name} cannot run under the asynchronous condition "
                         f"{condition}: it needs uploads in the space of the global model "
                         "(an algorithm declares it with Abilities(asynchronous=True))")


def clocked(algorithm: Algorithm, clock: Any, num_clients: int) -> Algorithm:
    """``algorithm`` on the virtual clock of ``clock`` (``core.clock.Clock``), checked
    for a run of ``num_clients`` clients before anything is compiled.

    Raises:
      ValueError: an algorithm outside the standard round skeleton (grouped
        architectures, distillation), one whose :class:`Abilities` refuse the clock or
        the condition, or a bad clock setting (``core.clock.check_clock``).
    """
    from fedjax_sim.core.clock import check_clock, get_condition
    from fedjax_sim.core.cohort import cohort_size

    condition = get_condition(clock.condition)
    if algorithm.with_clock is None:
        raise ValueError(f"algorithm {algorithm.name} cannot run under condition "
                         f"{clock.condition}: it does not aggregate client updates through "
                         "the standard round")
    check_clock_support(algorithm.name, algorithm.abilities, clock.condition,
                        condition.asynchronous)
    check_clock(clock, num_clients, cohort_size(num_clients, algorithm.hparams["join_ratio"]))
    return algorithm.with_clock(clock)._replace(models=algorithm.models,
                                                abilities=algorithm.abilities)


def finetuned_evaluate(model: Model, hp: dict, epochs: int) -> Callable:
    """``evaluate_with`` that first fine-tunes the global model on each client's own
    training data for ``epochs`` epochs (FedAvg+FT, FedBABU). The state is left untouched:
    every evaluation fine-tunes afresh from the current global model."""
    from fedjax_sim.core import local

    loss_fn = train_loss(model)
    budget = schedule(hp, epochs=epochs)
    if model.has_stats:
        budget["stats"] = model.state_names
    run = execution(hp)

    def evaluate_with(state: SimState, data: FederatedData, traced: Traced):
        keys = jax.random.split(jax.random.fold_in(state.key, 1), data.num_clients)
        (train_rows, train_pool), (test_rows, test_pool) = (
            data.client_rows("train"), data.client_rows("test"))
        unpack_train, unpack_test = data.unpacker("train"), data.unpacker("test")

        def one_client(shared, train_row, test_row, key):
            traced, global_params, train_pool, test_pool = shared
            x, y, n = unpack_train(train_pool, train_row)
            optimizer = client_optimizer({**hp, **traced})
            params, _ = local.train(loss_fn, optimizer, global_params, x, y, n, key,
                                    **budget)
            tx, ty, tn = unpack_test(test_pool, test_row)
            return score(model.apply(params, tx), ty, tn)

        return run.map(one_client, (train_rows, test_rows, keys),
                       shared=(traced, state.server["params"], train_pool, test_pool))

    return evaluate_with


def zeros_init(model, server_key: str, client_key: str):
    """``init_with`` of an algorithm whose state is the global model, a zero tree
    ``server_key`` beside it (with ``weight``, the total training samples) and a zero
    tree ``client_key`` per client (SCAFFOLD's control variates, FedDyn's ``h`` and
    gradients)."""
    from fedjax_sim.core.state import SimState
    from fedjax_sim.kernels.aggregation import broadcast

    def init_with(key, data, traced):
        del traced
        state_key, model_key = jax.random.split(key)
        params = model.init(model_key)
        zeros = jax.tree.map(jnp.zeros_like, params)
        weight = jnp.sum(jnp.asarray(data.train_counts, jnp.float32))
        server = {"params": params, server_key: zeros, "weight": weight}
        clients = {client_key: broadcast(zeros, data.num_clients)}
        return SimState.create(state_key, server, clients, data.num_clients)

    return init_with
