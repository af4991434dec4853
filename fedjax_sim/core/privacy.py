"""User-level differential privacy in the round: DP-FedAvg with fixed or adaptive clipping.

McMahan, Ramage, Talwar, Zhang. "Learning Differentially Private Recurrent Language
Models." ICLR 2018 (DP-FedAvg, Algorithm 1 with the fixed-denominator estimator f̃_f).
Andrew, Thakkar, McMahan, Ramaswamy. "Differentially Private Learning with Adaptive
Clipping." NeurIPS 2021 (Algorithm 1: the clip norm follows a quantile of the update
norms through a noised clipped-count and a geometric step).

Each round:

1. **Sampling**, as the accountant assumes it: ``poisson`` takes each client
   independently with probability q = ``join_ratio`` (the cohort's size varies: the round
   trains a fixed number of slots, :func:`poisson_capacity`, and masks the empty ones);
   ``fixed`` takes ``round(q N)`` distinct clients uniformly.
2. Every member trains as the algorithm says; its update Δ_k = upload_k − sent model is
   clipped to L2 norm C over the shared parameters (all of them: the upload is the
   shared part).
3. The clipped updates of the members are summed, Gaussian noise of standard deviation
   σ_Δ C is added once, and the sum is divided by the *expected* cohort size (q N, or the
   fixed size): every client weighs 1, so one client moves the sum by at most C.
4. The noised mean update is added to the sent model; the algorithm's server update
   reads that as the cohort's mean model (the server optimizer steps on it as on any
   mean: DP-FedAdam and the rest are post-processing).

With adaptive clipping each member also reports b_k = [‖Δ_k‖ ≤ C]; the server adds
N(0, σ_b²) to their sum, divides by the expected cohort size and steps
C ← C exp(−η_C (b̃ − γ)). The pair (σ_Δ, σ_b) with σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) costs
what one Gaussian mechanism of multiplier σ costs (Andrew et al., Theorem 1), so the
accountant sees σ alone.

Noise keys are folded from the round key and the configuration's traced values: each
round, each configuration of a sweep and each seed draws its own noise; the same run
draws the same noise again.

Personal parameters (FedPer's head, LG-FedAvg's body, FedOBP's personal elements,
Ditto's and FT's personal models) never leave their client: only the shared part is
uploaded, clipped and noised, and what a client keeps is computed from the noised global
model and its own data. The guarantee covers what the server and anyone after it sees;
it does not cover a client's personal model, which its own data shaped without noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.core.cohort import cohort_size

MODES = ("off", "fixed", "adaptive")
SAMPLINGS = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "pld")

# A Poisson cohort larger than its slots is cut to them; the slots are sized so that this
# happens with at most this probability per round (``dp_truncated`` counts it).
TRUNCATION_PROBABILITY = 1e-9

# Andrew et al.'s choice of the count noise: σ_b = expected cohort / 20.
COUNT_NOISE_DIVISOR = 20.0

# The round metrics a private round adds (the host loop copies them into metrics.jsonl).
METRICS = ("dp_clip_norm_now", "dp_cohort", "dp_unclipped_fraction", "dp_truncated")
# The record fields of the privacy spent (``epsilon_fields``), copied into the summary.
SPENT = ("dp_epsilon", "dp_delta", "dp_noise_multiplier")


def poisson_capacity(num_clients: int, rate: float) -> int:
    """Slots a Poisson cohort trains in: the smallest m with P(Binomial(N, q) > m) at most
    :data:`TRUNCATION_PROBABILITY` (all N at q = 1)."""
    if rate >= 1.0:
        return num_clients
    from scipy.stats import binom

    return int(min(num_clients, max(1, binom.isf(TRUNCATION_PROBABILITY, num_clients, rate))))


def expected_cohort(hp: dict, num_clients: int) -> float:
    """The denominator of the noised mean: q N under Poisson sampling, the fixed size
    otherwise."""
    if hp["dp_sampling"] == "poisson":
        return float(hp["join_ratio"]) * num_clients
    return float(cohort_size(num_clients, hp["join_ratio"]))


def count_noise_multiplier(hp: dict, num_clients: int) -> float:
    """σ_b: ``dp_count_noise_multiplier``, or the expected cohort over 20 (Andrew et al.),
    at least σ: below σ / 2 no update noise would be left, and at σ the update's share
    grows by 15% (σ_Δ = 2σ / √3), which small cohorts can afford better than a count
    drowned in noise can mislead."""
    value = hp.get("dp_count_noise_multiplier")
    if value is not None:
        return value
    return max(expected_cohort(hp, num_clients) / COUNT_NOISE_DIVISOR,
               float(hp["dp_noise_multiplier"]))


class Draw(NamedTuple):
    """A private round's sampling: the slots, which of them hold a sampled client, and
    whether the Poisson cohort was cut to the slots."""

    index: jax.Array | None
    present: jax.Array | None
    truncated: jax.Array


def draw(key: jax.Array, hp: dict, num_clients: int) -> Draw:
    """The cohort of one private round, drawn as the accountant assumes."""
    rate = float(hp["join_ratio"])
    if hp["dp_sampling"] == "fixed":
        from fedjax_sim.core.cohort import sample_cohort

        size = cohort_size(num_clients, rate)
        return Draw(sample_cohort(key, num_clients, size), None, jnp.zeros((), bool))
    if rate >= 1.0:
        return Draw(None, None, jnp.zeros((), bool))
    take_key, order_key = jax.random.split(key)
    chosen = jax.random.bernoulli(take_key, rate, (num_clients,))
    slots = poisson_capacity(num_clients, rate)
    # The chosen clients first, in random order, then the others (masked out).
    priority = chosen.astype(jnp.float32) + jax.random.uniform(order_key, (num_clients,))
    _, index = jax.lax.top_k(priority, slots)
    present = chosen[index]
    return Draw(index.astype(jnp.int32), present, jnp.sum(chosen) > slots)


def noise_key(round_key: jax.Array, hp: dict) -> jax.Array:
    """The round's noise key: the round key folded with the configuration's traced
    values, so that configurations of one sweep draw independent noise."""
    key = jax.random.fold_in(round_key, 0x5EED)
    for name in sorted(hp):
        value = jnp.asarray(hp[name])
        if value.dtype == jnp.float32 and value.ndim == 0:
            key = jax.random.fold_in(key, jax.lax.bitcast_convert_type(value, jnp.uint32))
    return key


def init_state(hp: dict) -> dict:
    """The privacy part of the state: the current clip norm (adaptive clipping moves it)."""
    return {"clip_norm": jnp.asarray(hp["dp_clip_norm"], jnp.float32)}


def privatize(hp: dict, static: dict, num_clients: int, privacy: dict, sent: Any,
              uploads: Any, present: jax.Array | None, key: jax.Array
              ) -> tuple[Any, dict, dict]:
    """Clips, sums and noises the members' updates; steps an adaptive clip norm.

    Args:
      hp: the traced hyperparameters (``dp_noise_multiplier``, ``dp_clip_norm``,
        ``dp_target_quantile``, ``dp_clip_lr``).
      static: the resolved hyperparameters (``dp``, ``dp_sampling``, ``join_ratio``,
        ``dp_count_noise_multiplier``).
      num_clients: N.
      privacy: the state's privacy part (:func:`init_state`).
      sent: the model the members trained from (the uploads' space).
      uploads: the members' uploads, leaves (M, ...).
      present: (M,) bool, the slots holding a sampled client, or None (all).
      key: the round's noise key (:func:`noise_key`).

    Returns:
      ``(sent + noised mean update, new privacy part, metrics)``.
    """
    from fedjax_sim.kernels import dp as dp_kernels

    clip = privacy["clip_norm"]
    deltas = jax.tree.map(lambda u, s: u - s[None], uploads, sent)
    rows = jax.tree.leaves(deltas)[0].shape[0]
    present = jnp.ones((rows,), bool) if present is None else present
    clipped, norms = dp_kernels.clip_rows(deltas, clip)
    expected = expected_cohort(static, num_clients)
    sigma = jnp.asarray(hp["dp_noise_multiplier"], jnp.float32)
    delta_key, count_key = jax.random.split(key)
    unclipped = jnp.sum(present & (norms <= clip))
    members = jnp.sum(present)
    if static["dp"] == "adaptive":
        given = static.get("dp_count_noise_multiplier")
        # count_noise_multiplier with this configuration's (traced) σ.
        sigma_b = (jnp.maximum(expected / COUNT_NOISE_DIVISOR, sigma) if given is None
                   else jnp.float32(given))
        delta_sigma = dp_kernels.split_noise_multiplier(sigma, sigma_b)
        # Centred on the expected cohort: one client moves the count by 1/2, which the
        # split of σ assumes (TensorFlow Privacy's quantile estimator does the same).
        count = dp_kernels.noised_count(norms, present, clip, count_key, sigma_b,
                                        expected_count=expected)
        new_clip = dp_kernels.geometric_clip_update(
            clip, count / expected, hp["dp_target_quantile"], hp["dp_clip_lr"])
    else:
        delta_sigma, new_clip = sigma, clip
    total = dp_kernels.noised_sum(clipped, present, delta_key, delta_sigma * clip)
    merged = jax.tree.map(lambda s, t: s + t / expected, sent, total)
    metrics = {"dp_clip_norm_now": clip, "dp_cohort": members,
               "dp_unclipped_fraction": unclipped / jnp.maximum(members, 1)}
    return merged, {"clip_norm": new_clip}, metrics


class Privacy(NamedTuple):
    """What a private round adds to the skeleton (``core.rounds.federated``).

    Attributes:
      draw: ``(key, num_clients) -> Draw``.
      privatize: ``(hp, privacy, sent, uploads, present, key, num_clients) ->
        (merged, privacy, metrics)``.
    """

    draw: Callable
    privatize: Callable


def make_privacy(static: dict) -> Privacy | None:
    """The private round's parts for the resolved hyperparameters ``static``, or None
    when ``dp`` is off."""
    if static.get("dp", "off") == "off":
        return None

    def draw_fn(key, num_clients):
        return draw(key, static, num_clients)

    def privatize_fn(hp, privacy, sent, uploads, present, key, num_clients):
        return privatize(hp, static, num_clients, privacy, sent, uploads, present, key)

    return Privacy(draw_fn, privatize_fn)


# ---- host side: the accountant's view of a run ------------------------------------------


def delta_for(static: dict, num_clients: int) -> float:
    """δ: ``dp_delta``, or 1 / N."""
    value = static.get("dp_delta")
    return 1.0 / num_clients if value is None else float(value)


def accounting(static: dict, num_clients: int) -> dict:
    """The accountant's arguments besides σ and the steps."""
    return {"delta": delta_for(static, num_clients), "sampling": static["dp_sampling"],
            "rate": float(static["join_ratio"]), "num_clients": int(num_clients),
            "accountant": static["dp_accountant"]}


_EPSILONS: dict = {}


def epsilon_fields(static: dict, noise_multiplier: float, num_clients: int,
                   rounds: int) -> dict:
    """``{"dp_epsilon", "dp_delta", "dp_noise_multiplier"}`` after ``rounds`` rounds, from
    ``core.accountant`` (dp-accounting); ``{}`` when ``dp`` is off."""
    if static.get("dp", "off") == "off":
        return {}
    from fedjax_sim.core import accountant

    args = accounting(static, num_clients)
    cache_key = (float(noise_multiplier), int(rounds), *sorted(args.items()))
    if cache_key not in _EPSILONS:
        _EPSILONS[cache_key] = accountant.epsilon(float(noise_multiplier), steps=int(rounds),
                                                  **args)
    return {"dp_epsilon": _EPSILONS[cache_key], "dp_delta": args["delta"],
            "dp_noise_multiplier": float(noise_multiplier)}


def resolve_budget(algorithm: str, hparams: dict, *, rounds: int,
                   num_clients: int | None, label: Callable[[str], str]) -> dict:
    """The privacy hyperparameters of a run, checked against its budget before anything
    is compiled: with ``dp_target_epsilon`` and no ``dp_noise_multiplier`` the smallest σ
    that meets the target over ``rounds`` rounds is calibrated and recorded; with both,
    a run whose rounds would spend more than the target is refused.

    Args:
      algorithm: the algorithm's registry name.
      hparams: the checked, explicitly given hyperparameters (``dp`` on).
      rounds: the planned rounds.
      num_clients: N, or None where it is known only once the data loads (natural sets).
      label: how messages name an option.

    Returns:
      ``hparams``, with ``dp_noise_multiplier`` set when it was calibrated.

    Raises:
      ValueError: naming the option: a budget no σ meets, rounds beyond the budget, or a
        calibration that needs N (δ or fixed sampling) on a natural data set.
    """
    from fedjax_sim import algorithms

    hparams = _calibrated(algorithm, hparams, rounds=rounds, num_clients=num_clients,
                          label=label)
    static = algorithms.resolve(algorithm, **hparams)
    if static["dp"] == "adaptive" and num_clients is not None:
        from fedjax_sim.kernels import dp as dp_kernels

        try:
            dp_kernels.split_noise_multiplier_host(
                static["dp_noise_multiplier"], count_noise_multiplier(static, num_clients))
        except ValueError as error:
            raise ValueError(f"{label('dp_count_noise_multiplier')}: {error} (default: the "
                             "expected cohort / 20)") from None
    return hparams


def _calibrated(algorithm: str, hparams: dict, *, rounds: int, num_clients: int | None,
                label: Callable[[str], str]) -> dict:
    from fedjax_sim import algorithms
    from fedjax_sim.core import accountant

    target = hparams.get("dp_target_epsilon")
    if target is None:
        return hparams
    static = algorithms.resolve(algorithm, **hparams)
    if num_clients is None:
        if static.get("dp_delta") is None or static["dp_sampling"] == "fixed":
            raise ValueError(
                f"{label('dp_target_epsilon')} on a natural data set needs "
                f"{label('dp_delta')} and {label('dp_sampling')} poisson (the client count "
                "is known only once the data loads)")
        num_clients = 1
    args = accounting(static, num_clients)
    if "dp_noise_multiplier" not in hparams:
        try:
            sigma = accountant.calibrate_noise_multiplier(target, steps=rounds, **args)
        except ValueError as error:
            raise ValueError(f"{label('dp_target_epsilon')}: {error}") from None
        # Rounded up to the float32 the round computes with, so the target still holds.
        rounded = np.float32(sigma)
        if rounded < sigma:
            rounded = np.nextafter(rounded, np.float32(np.inf))
        return {**hparams, "dp_noise_multiplier": float(rounded)}
    sigma = hparams["dp_noise_multiplier"]
    spent = accountant.epsilon(sigma, steps=rounds, **args)
    if spent > target:
        fit = accountant.rounds_within_budget(target, sigma, max_steps=rounds, **args)
        raise ValueError(
            f"{label('rounds')} {rounds} at {label('dp_noise_multiplier')} {sigma:g} spends "
            f"ε = {spent:.3g} > {label('dp_target_epsilon')} {target:g} (δ = "
            f"{args['delta']:.3g}): at most {fit} rounds fit; lower the rounds, raise σ, or "
            f"leave σ out to calibrate it")
    return hparams
