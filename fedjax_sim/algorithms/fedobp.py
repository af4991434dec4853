"""FedOBP: element-wise personalization chosen by an Optimal Brain Damage saliency.

Chen et al. "FedOBP: Federated Optimal Brain Personalization through Cloud-Edge Element-wise
Decoupling." arXiv:2604.16574, 2026.

The server stores, for every client k, θ_k: the client's full model as it came out of its
last local training (the initial model before its first round). At the start of a round,
with θ_g the current global model, every element of θ_k gets an importance score computed
from the two stored models only (no data, no gradients), e.g. |(θ_k − θ_g) ⊙ θ_k|: the
OBD saliency ½ h θ² with the Fisher approximation h ≈ g² and the gradient g approximated
by the local–global drift. One quantile τ_k = quantile(scores_k, ig_ratio) over all of
client k's (in-scope) elements splits the model: elements scoring above τ_k keep the
client's value, the rest take the global value. A sampled client receives that mixed model,
trains ALL its parameters (FedAvg local training) and uploads the full model; the server
stores it as the new θ_k and runs plain FedAvg over all elements. Clients are evaluated on
their mixed model.

Reading of the reference code (FL-bench fork ``uglyghost/FedOBP``,
``src/client/fedobp.py``, ``set_parameters`` / ``package``), followed here:

1. ``set_parameters`` gets the current global model (the aggregate of the previous round)
   and the client's ``postrain_state_dict`` entry, i.e. θ_k after its last training
   (initialized to the initial model). Scores: v1 |(θ_k − θ_g) ⊙ θ_k| (``drift_param``,
   the default), v2 (θ_k − θ_g)² (``drift_sq``).
2. Optional EMA per client: the first time a client is scored its EMA is the score itself,
   afterwards ``(1 − a)·I + a·I_ema``; the EMA is of the raw scores, normalization comes
   after it.
3. Normalization: ``layer`` min-max per tensor, ``global`` min-max over all in-scope
   elements (the default; affine, so the mask only changes by float rounding), or none.
4. ONE quantile per client over the concatenation of all in-scope scores; an element with
   score <= τ takes the global value, the others keep θ_k. Out-of-scope tensors (with
   ``CLS``: everything but the classifier) always take the global value.
5. The client trains the whole mixed model; ``package`` uploads the full model and stores
   it as the client's new θ_k; the server aggregates all elements by FedAvg with weights
   equal to the training set sizes.
6. Testing calls ``set_parameters`` with the current global model and evaluates the mixed
   model without training.

Where this implementation decides something the reference leaves open:

* ``ig_ratio = 0`` personalizes every in-scope element. The quantile rule would still send
  the element(s) at the minimum score to the global value; making q = 0 the exact limit
  (personalized fraction 1 − q = 1) gives Local training with ``obp_scope=all`` and FedPer
  with ``obp_scope=head``. ``ig_ratio = 1`` needs no special case: nothing scores above the
  maximum, so every client receives θ_g and FedOBP is FedAvg.
* Evaluation does not advance the EMA: it scores with the EMA step the client would take if
  sampled next, without storing it (the reference also updates the EMA when testing, which
  would make results depend on how often one evaluates).
* ``obp_variant = "fisher"`` is the client-side comparison (FedDPA's score, not FedOBP's):
  right after local training the client computes the diagonal empirical Fisher of its new
  θ_k on its own training data and uploads it with the model; the server masks with it.
  It needs client data and per-example gradients; before a client's first round its Fisher
  is zero (it has nothing to personalize yet).
* ``obp_variant = "random"`` is the control: scores are a random permutation of the ranks
  0..n−1 of the client's in-scope elements, freshly drawn per client and round, so the mask
  has exactly the size the quantile rule gives n untied scores (the saliency mask's size,
  which is smaller only by saliency scores tied at τ) but is placed uniformly at random.
  It skips the normalization (ranks need none) and refuses an EMA.

Traced hyperparameters: ``ig_ratio`` and ``ema_alpha`` reach the round in ``hp``. The
quantile's plan (which two order statistics, interpolated with which weight) is computed
from ``ig_ratio`` on the host in float64, as numpy computes it, and travels in ``hp``
(``ig_ratio/lo``, ``ig_ratio/hi``, ``ig_ratio/weight``, ``ig_ratio/upper``), as does
``1 - ema_alpha`` (``ema_alpha/keep``). The program depends on the values it was built for
(the ``ig_ratio`` and ``ema_alpha`` of ``make``, and those of ``make(..., cover=...)``):
its top-k search finds the most order statistics any of them needs, it keeps EMA state if
any ``ema_alpha`` is above 0 (``ema_alpha = 0`` then gives the floats of a round without
EMA), and it handles ``ig_ratio = 0`` if one of them is 0. ``Algorithm.hp`` refuses
other values.

Shapes: the state's client part holds ``params`` (K, ...) (θ_k), and as needed ``ema``
(tuple of in-scope leaves (K, ...)), ``seen`` (K,) bool, ``fisher`` (tuple of in-scope
leaves (K, ...)) and ``id`` (K,) int32 (the random control's per-client key).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.algorithms.base import (
    ASYNCHRONOUS,
    Algorithm,
    HParam,
    as_traced,
    federated_algorithm,
    local_sgd,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.core.rounds import Method
from fedjax_sim.core.state import SimState
from fedjax_sim.kernels import obp
from fedjax_sim.kernels.aggregation import broadcast

# The quantile plan and the blockwise top-k search of the kernel, which takes q as a static
# Python float; here q is traced and the plan is computed on the host.
from fedjax_sim.kernels.obp import TOP_K_MAX_FRACTION, _quantile_plan, _top_m_values
from fedjax_sim.models.base import Model

VARIANTS = (*obp.VARIANTS, "random")
DRIFT_VARIANTS = ("drift_param", "drift_sq")

# Stream of the random control's keys, folded into the state's key (not split from it, so
# the cohort and training keys stay exactly those of FedAvg).
_RANDOM_STREAM = 0x0B9
# Examples per chunk of the per-example gradients of the Fisher variant (memory bound).
_FISHER_CHUNK = 32

# Uploads in the global model's space: the asynchronous conditions can mix stale ones in.
ABILITIES = ASYNCHRONOUS
HPARAMS = (
    HParam("ig_ratio", 0.9999, float, lambda v: 0 <= v <= 1, "in [0, 1]",
           "FedOBP: quantile q of each client's element scores; elements above it stay "
           "personal (about 1 - q of them); 1 = FedAvg, 0 = all personal", traced=True,
           tune_values=(0.9999, 0.99, 0.9)),
    HParam("obp_variant", "drift_param", str, lambda v: v in VARIANTS,
           f"one of {', '.join(VARIANTS)}",
           "FedOBP: element score; drift_param |(θk-θg)θk| and drift_sq (θk-θg)² use the "
           "stored models only (server side); fisher is the client-side comparison (Fisher "
           "diagonal on client data); random is the control (random mask of the same size)",
           choices=VARIANTS),
    HParam("ema_alpha", 0.0, float, lambda v: 0 <= v < 1, "in [0, 1)",
           "FedOBP: EMA weight a of the old scores, I <- (1-a) I + a I_old; 0 = off",
           traced=True),
    HParam("obp_norm", "global", str, lambda v: v in obp.NORMS,
           f"one of {', '.join(obp.NORMS)}",
           "FedOBP: min-max normalization of the scores before the quantile",
           choices=obp.NORMS),
    HParam("obp_scope", "all", str, lambda v: v in obp.SCOPES,
           f"one of {', '.join(obp.SCOPES)}",
           "FedOBP: which tensors may be personalized: all, or the classifier head only",
           choices=obp.SCOPES),
)

PyTree = Any


class Personalizer(NamedTuple):
    """FedOBP's server-side step for a batch of clients, bound to a model and hparams.

    Attributes:
      apply: ``(rows, global_params, key, traced=None) -> (mixed, mask, scores)``;
        ``rows`` is a client state with leaves (B, ...) (any B: all K clients, or one),
        ``key`` the state's key (used by the random control only), ``traced`` the traced
        hyperparameters (``Algorithm.hp``; ``None``: those the step was built with).
        ``mixed`` is what each client receives, ``mask`` True where it keeps its own
        element, ``scores`` the in-scope scores after the EMA step (the new EMA when the
        client is sampled).
      scoped: indices of the in-scope leaves in ``jax.tree.leaves(params)`` order.
      names: ``"layer/leaf"`` name of every parameter leaf.
      sizes: elements of every parameter leaf.
      encode: ``(values) -> entries``: the ``hp`` entries derived on the host from the
        float ``ig_ratio`` and ``ema_alpha`` of ``values``.
      ema: whether the step blends scores with an EMA (the state keeps ``ema``, ``seen``).

    Raises (``encode``):
      ValueError: values the step was not built for.
    """

    apply: Callable[..., tuple[PyTree, PyTree, tuple]]
    scoped: tuple[int, ...]
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    encode: Callable[[Mapping[str, float]], dict]
    ema: bool


def _leaf_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _threshold(parts: list[jax.Array], hp: Mapping, top: int, method: str) -> jax.Array:
    """Per-client quantile τ_k of the (K, n_l) score pieces, as
    ``kernels.obp.quantile_threshold`` computes it, with the plan read from ``hp``.

    Args:
      parts: in-scope scores, float32 (K, n_l), Σ n_l = n.
      hp: ``ig_ratio/lo``, ``ig_ratio/hi`` (the two order statistics, ascending ranks),
        ``ig_ratio/weight`` and ``ig_ratio/upper`` (numpy's interpolation, see
        :func:`_plan`).
      top: static; with ``method="top_k"`` the search keeps the ``top`` largest values,
        at least ``n - lo`` for every plan the step accepts.
      method: static, ``"top_k"`` or ``"sort"``.
    """
    n = sum(p.shape[1] for p in parts)
    if method == "top_k":
        ordered = _top_m_values(parts, top)  # ordered[:, j] is rank n - 1 - j
        a = jax.lax.dynamic_index_in_dim(ordered, n - 1 - hp["ig_ratio/lo"], 1, False)
        b = jax.lax.dynamic_index_in_dim(ordered, n - 1 - hp["ig_ratio/hi"], 1, False)
    else:
        ordered = jnp.sort(parts[0] if len(parts) == 1 else jnp.concatenate(parts, 1), 1)
        a = jax.lax.dynamic_index_in_dim(ordered, hp["ig_ratio/lo"], 1, False)
        b = jax.lax.dynamic_index_in_dim(ordered, hp["ig_ratio/hi"], 1, False)
    # numpy's lerp in float32, anchored at b for weights >= 0.5; the barriers keep the
    # products out of an FMA (as in the kernel).
    d = b - a
    scaled = jax.lax.optimization_barrier(d * hp["ig_ratio/weight"])
    return jnp.where(hp["ig_ratio/upper"], b - scaled, a + scaled)


def _plan(n: int, q: float) -> tuple[int, int, np.float32, bool]:
    """``(lo, hi, weight, upper)`` of numpy's linear q-quantile of n values: the ranks of
    the two order statistics and the float32 weight of the interpolation, anchored at the
    upper one when ``upper``."""
    lo, hi, t = _quantile_plan(n, q)
    upper = t >= 0.5
    return lo, hi, np.float32(1.0 - t if upper else t), upper


def personalizer(model: Model, hp: dict, cover: Sequence[Mapping[str, float]] = ()
                 ) -> Personalizer:
    """Builds the score → EMA → normalization → quantile mask → mix step.

    Args:
      model: the model (its ``head`` defines ``obp_scope="head"``).
      hp: resolved hyperparameters (``ig_ratio``, ``obp_variant``, ``ema_alpha``,
        ``obp_norm``, ``obp_scope``).
      cover: other values of ``ig_ratio`` and ``ema_alpha`` (dicts holding both) the step
        must accept through ``apply(..., traced)``.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    with_path, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    names = tuple(_leaf_name(p) for p, _ in with_path)
    sizes = tuple(math.prod(s.shape) for _, s in with_path)
    if hp["obp_scope"] == "head":
        flags = treedef.flatten_up_to(model.head_mask(shapes))
    else:
        flags = [True] * len(names)
    scoped = tuple(i for i, f in enumerate(flags) if f)
    variant, norm = hp["obp_variant"], hp["obp_norm"]
    n = sum(sizes[i] for i in scoped)
    settings = [{"ig_ratio": hp["ig_ratio"], "ema_alpha": hp["ema_alpha"]}, *cover]
    ema_on = variant != "random" and any(c["ema_alpha"] > 0 for c in settings)
    zero_q = any(c["ig_ratio"] == 0.0 for c in settings)
    # The most order statistics from the top any accepted q needs (0: no quantile at all,
    # every q is 0 and every in-scope element is personal).
    top = max((n - _plan(n, c["ig_ratio"])[0] for c in settings if c["ig_ratio"] != 0.0),
              default=0)
    method = "top_k" if top <= TOP_K_MAX_FRACTION * n else "sort"

    def encode(values):
        q, alpha = values["ig_ratio"], values["ema_alpha"]
        if alpha > 0 and variant == "random":
            raise ValueError("ema_alpha must be 0 with obp_variant='random' (the control "
                             f"draws a fresh random mask every round), got {alpha}")
        if alpha > 0 and not ema_on:
            raise ValueError(f"ema_alpha={alpha}: this fedobp round keeps no EMA state (all "
                             "its ema_alpha values are 0); build it with make(..., cover=...) "
                             "naming this value")
        if (q == 0.0 and not zero_q) or (q != 0.0 and n - _plan(n, q)[0] > top):
            raise ValueError(f"ig_ratio={q} is outside the values this fedobp round was built "
                             "for; build it with make(..., cover=...) naming this value")
        # ig_ratio = 0 takes no quantile; any valid plan stands in for it.
        lo, hi, weight, upper = _plan(n, 1.0 if q == 0.0 else q)
        return {"ig_ratio/lo": np.int32(lo), "ig_ratio/hi": np.int32(hi),
                "ig_ratio/weight": weight, "ig_ratio/upper": np.bool_(upper),
                # 1 - a as the kernel's EMA takes it from a Python float.
                "ema_alpha/keep": np.float32(1.0 - alpha)}

    first = settings[0]
    defaults = {**as_traced(first), **encode(first)}

    def apply(rows, global_params, key, traced=None):
        traced = defaults if traced is None else traced
        client_leaves = treedef.flatten_up_to(rows["params"])
        global_leaves = treedef.flatten_up_to(global_params)
        mine = [client_leaves[i] for i in scoped]
        theirs = [global_leaves[i] for i in scoped]
        if variant in DRIFT_VARIANTS:
            raw = obp.obp_scores(mine, theirs, variant)
        elif variant == "fisher":
            raw = obp.obp_scores(mine, theirs, variant, fisher=list(rows["fisher"]))
        else:
            # Random ranks: a permutation of 0..n-1 over the client's in-scope elements, so
            # no two scores tie and the mask has exactly the size of untied saliency scores.
            total = sum(math.prod(x.shape[1:]) for x in mine)
            flat = jax.vmap(lambda i: jax.random.permutation(
                jax.random.fold_in(key, i), total).astype(jnp.float32))(rows["id"])
            cuts = np.cumsum([math.prod(x.shape[1:]) for x in mine])[:-1].tolist()
            raw = [part.reshape(x.shape) for part, x in
                   zip(jnp.split(flat, cuts, axis=1), mine, strict=True)]
        if ema_on:
            keep, alpha = traced["ema_alpha/keep"], traced["ema_alpha"]
            seen = rows["seen"]
            raw = [jnp.where(seen.reshape((-1,) + (1,) * (r.ndim - 1)), keep * r + alpha * e, r)
                   for r, e in zip(raw, rows["ema"], strict=True)]
        normed = raw if variant == "random" else obp.minmax_normalize(raw, norm)
        if top == 0:
            masks = [jnp.ones(x.shape, bool) for x in normed]
        else:
            k = jnp.shape(normed[0])[0]
            parts = [jnp.asarray(x, jnp.float32).reshape(k, -1) for x in normed]
            tau = _threshold([p for p in parts if p.shape[1]], traced, top, method)
            masks = [jnp.asarray(x, jnp.float32) > tau.reshape((-1,) + (1,) * (x.ndim - 1))
                     for x in normed]
            if zero_q:
                masks = [jnp.where(traced["ig_ratio"] == 0.0, True, m) for m in masks]
        full = [jnp.zeros(jnp.shape(x), bool) for x in client_leaves]
        for j, i in enumerate(scoped):
            full[i] = masks[j]
        mask = jax.tree.unflatten(treedef, full)
        return obp.mix(mask, rows["params"], global_params), mask, tuple(raw)

    return Personalizer(apply, scoped, names, sizes, encode, ema_on)


def random_key(state: SimState) -> jax.Array:
    """The random control's key for the masks clients receive from ``state``."""
    return jax.random.fold_in(state.key, _RANDOM_STREAM)


def personalized_models(model: Model, hp: dict, state: SimState) -> tuple[PyTree, PyTree]:
    """What every client would receive (and is evaluated on) at ``state``.

    Args:
      model: the model.
      hp: the algorithm's resolved hyperparameters (``Algorithm.hparams``).
      state: a FedOBP state.

    Returns:
      ``(mixed, mask)``: params with leaves (K, ...) and the bool mask (True = personal).
    """
    step = personalizer(model, hp)

    def compute(st):
        mixed, mask, _ = step.apply(st.clients, st.server["params"], random_key(st))
        return mixed, mask

    # One compiled program instead of dozens of eagerly dispatched kernels.
    return jax.jit(compute)(state)


def fisher_fn(model: Model, scoped: tuple[int, ...]) -> Callable:
    """``(params, x, y, n) -> tuple`` of the in-scope leaves of one client's diagonal
    empirical Fisher, mean over its ``n`` real training examples, in chunks of examples."""

    def per_example(params, xi, yi):
        logits = model.apply(params, xi[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi)

    def fisher(params, x, y, n):
        n_max = x.shape[0]
        chunk = min(n_max, _FISHER_CHUNK)
        pieces = -(-n_max // chunk)
        pad = pieces * chunk - n_max
        weights = (jnp.arange(pieces * chunk) < n).astype(jnp.float32)
        xs = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        ys = jnp.pad(y, [(0, pad)] + [(0, 0)] * (y.ndim - 1))

        def body(total, chunk_data):
            xc, yc, wc = chunk_data
            f = obp.empirical_fisher(per_example, params, xc, yc, wc)
            return jax.tree.map(lambda t, v: t + jnp.sum(wc) * v, total, f), None

        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        total, _ = jax.lax.scan(body, zeros, (
            xs.reshape(pieces, chunk, *x.shape[1:]),
            ys.reshape(pieces, chunk, *y.shape[1:]),
            weights.reshape(pieces, chunk),
        ))
        leaves = jax.tree.leaves(total)
        count = jnp.maximum(n, 1).astype(jnp.float32)
        return tuple(leaves[i] / count for i in scoped)

    return fisher


def fedobp(model: Model, *, cover: Sequence[Mapping[str, float]] = (), **hp) -> Algorithm:
    """FedOBP bound to ``model``; ``hp`` holds the common and FedOBP hyperparameters.

    ``cover``: other values of the traced hyperparameters (dicts of floats holding at
    least ``ig_ratio`` and ``ema_alpha``) that ``round_with`` must accept (see the module
    docstring); ``algorithms.make`` fills them in.
    """
    variant, alpha = hp["obp_variant"], hp["ema_alpha"]
    if variant == "random" and alpha > 0:
        raise ValueError("ema_alpha must be 0 with obp_variant='random' (the control draws "
                         f"a fresh random mask every round), got {alpha}")
    step = personalizer(model, hp, cover)
    client_fisher = fisher_fn(model, step.scoped) if variant == "fisher" else None

    def in_scope_zeros(params, num_clients):
        leaves = jax.tree.leaves(params)
        return tuple(jnp.zeros((num_clients, *jnp.shape(leaves[i])), jnp.float32)
                     for i in step.scoped)

    def init_with(key, data, traced):
        del traced
        state_key, model_key = jax.random.split(key)  # as FedAvg: same initial model
        params = model.init(model_key)
        k = data.num_clients
        clients = {"params": broadcast(params, k)}
        if variant == "random":
            clients["id"] = jnp.arange(k, dtype=jnp.int32)
        if step.ema:
            clients["ema"] = in_scope_zeros(params, k)
            clients["seen"] = jnp.zeros((k,), bool)
        if client_fisher is not None:
            clients["fisher"] = in_scope_zeros(params, k)
        return SimState.create(state_key, {"params": params}, clients, k)

    def send(traced, state, round_key):
        # The global model and the mask key: the client builds the mask it trains from
        # with both. Under an asynchronous condition the clock keeps this pair per client
        # from its dispatch, so a client whose update arrives steps later still trains on
        # the mask of the model it was sent (core.clock, ClockState.start).
        del traced
        return round_key, (state.server["params"], random_key(state)), None

    def client_update(traced, received, own, x, y, n, key):
        global_params, mask_key = received
        rows = jax.tree.map(lambda a: a[None], own)
        mixed, _, scores = step.apply(rows, global_params, mask_key, traced)
        start = jax.tree.map(lambda a: a[0], mixed)
        params, loss = local_sgd(model, {**hp, **traced})(start, x, y, n, key)
        new = {"params": params}
        if "id" in own:
            new["id"] = own["id"]
        if step.ema:
            new["ema"] = tuple(s[0] for s in scores)
            new["seen"] = jnp.ones((), bool)
        if client_fisher is not None:
            new["fisher"] = client_fisher(params, x, y, n)
        return params, new, loss  # the server runs plain FedAvg over all elements

    def eval_inputs(traced, state):
        mixed, _, _ = step.apply(state.clients, state.server["params"], random_key(state),
                                 traced)
        return mixed, None

    @jax.jit
    def mask_counts(state):
        _, mask, _ = step.apply(state.clients, state.server["params"], random_key(state))
        return jax.tree.leaves(jax.tree.map(
            lambda m: jnp.sum(m.reshape(m.shape[0], -1), axis=1, dtype=jnp.int32), mask))

    def report(state):
        counts = np.stack([np.asarray(c) for c in mask_counts(state)], axis=1)  # (K, leaves)
        return mask_report(counts, step.names, step.sizes)

    size = num_params_bytes(model)
    up = size
    if client_fisher is not None:  # the client also sends its Fisher scores
        up += 4 * sum(step.sizes[i] for i in step.scoped)
    method = Method(client_update, lambda own, _, x: model.apply(own, x), broadcast=send,
                    eval_inputs=eval_inputs)
    return federated_algorithm("fedobp", hp, HPARAMS, method, init_with=init_with,
                               comm_bytes=per_round_bytes(hp, up, size), report=report,
                               derive=step.encode, cover=cover)


def mask_report(counts: np.ndarray, names: tuple[str, ...], sizes: tuple[int, ...]) -> dict:
    """Summary fields from per-client, per-leaf counts of personalized elements.

    Args:
      counts: (K, L) personalized elements of client k in leaf l.
      names: L leaf names.
      sizes: L leaf sizes.

    Returns:
      ``personalized_fraction`` (mean over clients of the personalized share of all
      elements), ``personalized_elements`` (mean count per client), ``num_params`` and
      ``personalized_by_layer``: per leaf, its ``elements``, mean ``personalized`` count per
      client, ``fraction`` of the leaf personalized and ``share`` of all personalized
      elements that sit in it.
    """
    counts = np.asarray(counts, np.float64)
    total = int(sum(sizes))
    per_client = counts.sum(axis=1)
    mean_counts = counts.mean(axis=0)
    everything = float(mean_counts.sum())
    return {
        "personalized_fraction": float(np.mean(per_client / max(total, 1))),
        "personalized_elements": float(per_client.mean()),
        "num_params": total,
        "personalized_by_layer": {
            name: {
                "elements": int(size),
                "personalized": float(c),
                "fraction": float(c / size) if size else 0.0,
                "share": float(c / everything) if everything else 0.0,
            }
            for name, size, c in zip(names, sizes, mean_counts, strict=True)
        },
    }
