"""The simulator's side of the data-sharing game: v(m) measured as one batched program,
models trained on given contributions, and shaped models delivered and measured."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.checks import check_float, check_int, check_seed
from fedjax_sim.core.cohort import client_map
from fedjax_sim.data.federated import FederatedData, check_federated_data
from fedjax_sim.incentives.game import ValueCurve, _frozen, curve_from_points

# The contribution levels of the value curve: each keeps this fraction of every client's
# training rows.
DEFAULT_LEVELS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


def check_levels(levels: Any) -> tuple[float, ...]:
    """``levels``, checked: a non-empty, strictly increasing sequence of fractions in
    (0, 1]."""
    try:
        values = tuple(float(f) for f in levels)
    except (TypeError, ValueError):
        raise ValueError(f"levels must be a sequence of fractions in (0, 1], got {levels!r}"
                         ) from None
    if (not values or not all(np.isfinite(f) and 0 < f <= 1 for f in values)
            or any(b <= a for a, b in itertools.pairwise(values))):
        raise ValueError(f"levels must be a non-empty, strictly increasing sequence of "
                         f"fractions in (0, 1], got {list(values)}")
    return values


def level_counts(counts: Any, level: float) -> np.ndarray:
    """``⌈level · n_k⌉`` for every client count ``n_k`` (int32, at least 1 where
    ``n_k >= 1``)."""
    return np.ceil(level * np.asarray(counts, np.float64) - 1e-9).astype(np.int32)


def with_train_counts(data: FederatedData, counts: Any, *, label: str = "counts"
                      ) -> FederatedData:
    """``data`` whose clients train on their first ``counts[k]`` training rows only.

    The arrays are unchanged: ``FederatedData`` already treats the rows at and beyond a
    client's count as padding that is never read, so only the counts change (and every
    such split stacks with the others without padding). The test sets are kept whole.

    Raises:
      ValueError: naming ``label``: counts not integers in ``[1, n_k]``.
    """
    counts = np.asarray(counts)
    full = np.asarray(data.train_counts)
    if counts.shape != full.shape or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"{label} must hold one integer per client ({full.size}), got "
                         f"shape {counts.shape} and dtype {counts.dtype}")
    bad = (counts < 1) | (counts > full)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{label} must be in [1, n_k] (a client trains on at least one of "
                         f"its own rows), got {int(counts[k])} for client {k} (n_k = "
                         f"{int(full[k])})")
    return data.replace(train_counts=counts.astype(np.int32))


def shuffle_rows(data: FederatedData, seed: int = 0) -> FederatedData:
    """``data`` with every client's real training rows in a random order (padding stays
    last; the test sets are unchanged).

    The data loaders keep a client's rows in the pooled data's order, so "the first
    ``⌈f n_k⌉`` rows" (``level_splits``) or "the last rows" (``hold_out``) could follow
    whatever order the source has (e.g. a source's own train part before its test part);
    after a shuffle they are uniform random subsets.
    """
    check_seed("seed", seed)
    check_federated_data(data)
    rng = np.random.default_rng(seed)
    x, y = np.array(data.train_x), np.array(data.train_y)
    for k, n in enumerate(np.asarray(data.train_counts)):
        order = rng.permutation(int(n))
        x[k, :n], y[k, :n] = x[k, order], y[k, order]
    return data.replace(train_x=x, train_y=y)


def hold_out(data: FederatedData, fraction: float) -> tuple[FederatedData, FederatedData]:
    """Sets aside the last ``⌊fraction · n_k⌋`` training rows of every client.

    Args:
      data: the federated data.
      fraction: share of each client's training rows held out, in (0, 1).

    Returns:
      ``(kept, held)``: ``data`` training on the other rows only (its arrays unchanged, the
      counts lowered), and the held-out rows as the training rows of a second
      ``FederatedData`` (with ``data``'s test sets), e.g. to calibrate ``deliver`` on rows
      no model trained on.

    Raises:
      ValueError: naming ``fraction``: out of range, or leaving a client without a kept
        or a held-out row.
    """
    fraction = check_float("fraction", fraction, 0.0, 1.0, low_open=True, high_open=True)
    check_federated_data(data)
    n = np.asarray(data.train_counts)
    held = np.floor(fraction * n + 1e-9).astype(np.int32)
    if (held < 1).any() or (held >= n).any():
        k = int(np.flatnonzero((held < 1) | (held >= n))[0])
        raise ValueError(f"fraction={fraction} holds out {int(held[k])} of the {int(n[k])} "
                         f"training rows of client {k}; every client needs at least one "
                         "held-out and one kept row")
    width = int(held.max())
    x, y = np.asarray(data.train_x), np.asarray(data.train_y)
    held_x = np.zeros((n.size, width, *x.shape[2:]), x.dtype)
    held_y = np.zeros((n.size, width), y.dtype)
    for k in range(n.size):
        held_x[k, :held[k]] = x[k, n[k] - held[k]:n[k]]
        held_y[k, :held[k]] = y[k, n[k] - held[k]:n[k]]
    kept = data.replace(train_counts=(n - held).astype(np.int32))
    return kept, data.replace(train_x=held_x, train_y=held_y, train_counts=held)


def level_splits(data: FederatedData, levels: Sequence[float] = DEFAULT_LEVELS
                 ) -> list[FederatedData]:
    """One ``FederatedData`` per contribution level: every client keeps its first
    ``⌈f · n_k⌉`` training rows (see ``with_train_counts``).

    Raises:
      ValueError: naming ``levels``: bad fractions, or two levels that keep the same rows.
    """
    levels = check_levels(levels)
    check_federated_data(data)
    counts = [level_counts(data.train_counts, f) for f in levels]
    for i in range(1, len(levels)):
        if counts[i].sum() == counts[i - 1].sum():
            raise ValueError(f"levels {levels[i - 1]} and {levels[i]} keep the same "
                             f"{int(counts[i].sum())} training rows of this data; drop one")
    return [with_train_counts(data, c, label="levels") for c in counts]


def _sweep(data: list[FederatedData], model, configs: list[dict], *, algorithm: str,
           hparams: dict | None, rounds: int, progress: bool, keep_states: bool
           ) -> list[dict]:
    from fedjax_sim.runner import sweep

    return sweep(algorithm, model, data, configs=configs, rounds=rounds, eval_every=rounds,
                 hparams=hparams, progress=progress, keep_states=keep_states)


def value_curve(data: FederatedData, model, *, levels: Sequence[float] = DEFAULT_LEVELS,
                algorithm: str = "fedavg", hparams: dict | None = None, rounds: int = 30,
                seeds: Sequence[int] = (0,), progress: bool = False) -> ValueCurve:
    """Measures v(m): the global model's test accuracy after training on m samples.

    Level ``f`` keeps the first ``⌈f · n_k⌉`` training rows of every client
    (``level_splits``), so ``m = Σ_k ⌈f · n_k⌉``; all levels and seeds run as one batched
    program (``runner.sweep`` over the level splits). v at a level is the global model's
    sample-weighted accuracy over all clients' (whole) test sets (the summary's
    ``accuracy``), averaged over ``seeds``; ``v(0) = 1 / num_classes`` (chance). The game
    reads the running maximum of these points, linear in between.

    Args:
      data: the federated data (every client's full training set, n_k rows).
      model: the model.
      levels: contribution fractions, strictly increasing in (0, 1].
      algorithm: a ``runner.sweep`` algorithm that evaluates a global model (FedAvg by
        default).
      hparams: its hyperparameters.
      rounds: training rounds (one evaluation at the end).
      seeds: training seeds; v is their mean.
      progress: show a progress bar.

    Returns:
      The ValueCurve (``m[0] = 0`` and one point per level).

    Raises:
      ValueError: naming ``levels``, ``seeds`` or ``rounds``, or from ``runner.sweep``,
        before anything compiles.
    """
    levels = check_levels(levels)
    check_int("rounds", rounds, 1)
    if isinstance(seeds, int | str) or not seeds:
        raise ValueError(f"seeds must be a non-empty list of seeds, got {seeds!r}")
    seeds = [check_seed(f"seeds[{i}]", s) for i, s in enumerate(seeds)]
    splits = level_splits(data, levels)
    configs = [{"seed": s, "split": i} for i in range(len(levels)) for s in seeds]
    out = _sweep(splits, model, configs, algorithm=algorithm, hparams=hparams, rounds=rounds,
                 progress=progress, keep_states=False)
    acc = np.array([s["accuracy"] for s in out], np.float64).reshape(len(levels), len(seeds))
    m = [0] + [int(np.asarray(s.train_counts).sum()) for s in splits]
    chance = 1.0 / data.num_classes
    return curve_from_points(m, np.concatenate([[chance], acc.mean(axis=1)]),
                             num_classes=data.num_classes, levels=levels)


@dataclasses.dataclass(frozen=True, eq=False)
class Trained:
    """A global model trained on given contributions.

    Attributes:
      params: the global model's parameters.
      counts: (K,) the training rows each client contributed.
      accuracy: its sample-weighted test accuracy over all clients.
    """

    params: Any
    counts: np.ndarray
    accuracy: float


def contribution_counts(data: FederatedData, contributions: Any) -> np.ndarray:
    """Contributions (real numbers of samples) as training rows: ``⌈m_k⌉``, at least one
    (the data checks need a training row per client) and at most ``n_k``."""
    m = np.asarray(contributions, np.float64)
    full = np.asarray(data.train_counts)
    if m.shape != full.shape or not np.isfinite(m).all() or (m < 0).any():
        raise ValueError(f"contributions must be finite numbers >= 0, one per client "
                         f"({full.size}), got {m.tolist()}")
    return np.clip(np.ceil(m - 1e-9), 1, full).astype(np.int32)


def train_on_contributions(data: FederatedData, model, contributions: Sequence[Any], *,
                           algorithm: str = "fedavg", hparams: dict | None = None,
                           rounds: int = 30, seed: int = 0, progress: bool = False
                           ) -> list[Trained]:
    """Trains one global model per contribution profile, all as one batched program.

    Args:
      data: the federated data.
      model: the model.
      contributions: profiles, each (K,) samples per client (``contribution_counts``
        turns them into rows).
      algorithm / hparams / rounds / progress: as in ``value_curve``.
      seed: the training seed.

    Returns:
      One Trained per profile.
    """
    profiles = [contribution_counts(data, c) for c in contributions]
    if not profiles:
        raise ValueError("contributions must hold at least one profile")
    splits = [with_train_counts(data, c) for c in profiles]
    configs = [{"seed": check_seed("seed", seed), "split": i} for i in range(len(splits))]
    out = _sweep(splits, model, configs, algorithm=algorithm, hparams=hparams, rounds=rounds,
                 progress=progress, keep_states=True)
    return [Trained(params=s["state"].server["params"], counts=_frozen(c, np.int32),
                    accuracy=float(s["accuracy"])) for s, c in zip(out, profiles, strict=True)]


@dataclasses.dataclass(frozen=True, eq=False)
class Delivery:
    """Shaped models delivered to the agents, and their measured accuracies.

    Attributes:
      targets: (N,) the accuracies the mechanism promises.
      p: (N,) probability that the delivered model answers with a uniformly random class.
      train_accuracy: (N,) the global model's accuracy on each agent's training data (the
        calibration).
      test_accuracy: (N,) the global model's accuracy on each agent's test set.
      delivered: (N,) the delivered model's measured accuracy on each agent's test set.
      expected: (N,) its expectation given the global model's test predictions,
        ``(1 − p) test_accuracy + p / C``.
      test_counts: (N,) test examples per agent.
      calibration_counts: (N,) calibration rows per agent.
    """

    targets: np.ndarray
    p: np.ndarray
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray
    delivered: np.ndarray
    expected: np.ndarray
    test_counts: np.ndarray
    calibration_counts: np.ndarray

    @property
    def gaps(self) -> np.ndarray:
        """delivered − target per agent."""
        return self.delivered - self.targets

    @property
    def max_gap(self) -> float:
        return float(np.abs(self.gaps).max())

    @property
    def stderr(self) -> np.ndarray:
        """One binomial standard deviation of each measured accuracy at its target (the
        target kept half a test example away from 0 and 1, so that it is never 0)."""
        half = 0.5 / self.test_counts
        t = np.clip(self.targets, half, 1 - half)
        return np.sqrt(t * (1 - t) / self.test_counts)

    @property
    def noise(self) -> np.ndarray:
        """One standard deviation of delivered − target from sampling alone: ``stderr``
        and, scaled by ``1 − p`` (how the delivered accuracy follows the calibration
        accuracy), the binomial SD of the calibration accuracy."""
        half = 0.5 / self.calibration_counts
        a = np.clip(self.train_accuracy, half, 1 - half)
        calib = (1 - self.p) * np.sqrt(a * (1 - a) / self.calibration_counts)
        return np.sqrt(self.stderr**2 + calib**2)


@functools.lru_cache(maxsize=8)
def _predict(model):
    """Every client's predicted classes, ``(params, x[K, T, ...]) -> (K, T)``, jitted once
    per model."""
    return jax.jit(lambda params, x: client_map(
        lambda shared, xk: jnp.argmax(model.apply(shared, xk), -1).astype(jnp.int32),
        (x,), shared=params))


def _predictions(model, params, x):
    return _predict(model)(params, x)


def _hits(pred, y, counts) -> np.ndarray:
    valid = np.arange(pred.shape[1])[None, :] < np.asarray(counts)[:, None]
    return ((np.asarray(pred) == np.asarray(y)) & valid).sum(axis=1)


def model_accuracies(model, params, data: FederatedData) -> tuple[np.ndarray, np.ndarray]:
    """A global model's accuracy on every client's training rows (all ``train_counts``)
    and on its test set, as ``(train, test)``, each (K,)."""
    train = _hits(_predictions(model, params, data.train_x), data.train_y,
                  data.train_counts) / np.asarray(data.train_counts, np.float64)
    test = _hits(_predictions(model, params, data.test_x), data.test_y,
                 data.test_counts) / np.asarray(data.test_counts, np.float64)
    return train, test


def deliver(model, params, data: FederatedData, targets: Any, *, seed: int = 0,
            calibration: FederatedData | None = None) -> Delivery:
    """Degrades the global model to each agent's target accuracy, then measures it.

    Agent i's model answers an input with the global model's prediction with probability
    ``1 − p_i`` and with a uniformly random class with probability ``p_i``, so its expected
    accuracy is ``(1 − p_i) a_i + p_i / C``. ``p_i = (a_i − γ_i) / (a_i − 1/C)``, clipped
    to [0, 1], is calibrated on the global model's accuracy ``a_i`` on agent i's training
    rows (the test set is not used); the delivered model is then measured on agent i's
    test set. Draws come from one fixed key per agent, ``fold_in(key(seed), i)``.

    Rows the global model trained on overstate its accuracy, and the delivered accuracy
    then falls short of the target by about ``(1 − p_i)`` times the difference; rows it
    never saw (``calibration``, e.g. from ``hold_out``) calibrate without that bias.

    Args:
      model: the model.
      params: the global model's parameters.
      data: the agents' data (agent i is client i): all ``train_counts[i]`` training rows
        calibrate, the test set measures.
      targets: (N,) target accuracies γ_i in [0, 1].
      seed: seed of the agents' keys.
      calibration: data whose training rows calibrate instead of ``data``'s (same
        clients).

    Returns:
      A Delivery (its ``train_accuracy`` is the calibration accuracy).

    Raises:
      ValueError: naming ``targets``: not one finite accuracy in [0, 1] per agent, or a
        target above the global model's accuracy on the agent's training data (the
        mechanism cannot deliver more than the global model).
    """
    check_federated_data(data)
    check_seed("seed", seed)
    num_agents, num_classes = data.num_clients, data.num_classes
    targets = np.asarray(targets, np.float64)
    if (targets.shape != (num_agents,) or not np.isfinite(targets).all()
            or (targets < 0).any() or (targets > 1).any()):
        raise ValueError(f"targets must be accuracies in [0, 1], one per agent "
                         f"({num_agents}), got {targets.tolist()}")
    if calibration is None:
        calibration = data
    check_federated_data(calibration)
    if calibration.num_clients != num_agents:
        raise ValueError(f"calibration must hold the same {num_agents} clients as data, got "
                         f"{calibration.num_clients}")
    train = model_accuracies(model, params, calibration)[0]
    above = targets > train + 1e-9  # rounding of a target computed as the accuracy itself
    if above.any():
        i = int(np.flatnonzero(above)[0])
        raise ValueError(f"targets[{i}] = {targets[i]:.4f} for agent {i} is above the "
                         f"accuracy the global model achieves on its calibration (training) "
                         f"data, "
                         f"{train[i]:.4f}: the mechanism can only degrade the global model")
    chance = 1.0 / num_classes
    room = train - chance
    p = np.where(room > 0, (train - targets) / np.where(room > 0, room, 1.0),
                 (targets < train).astype(np.float64))
    p = np.clip(p, 0.0, 1.0)
    pred = np.asarray(_predictions(model, params, data.test_x))
    width = pred.shape[1]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
        jnp.arange(num_agents))
    draws = jax.vmap(lambda k: jax.random.split(k))(keys)
    swap = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (width,)))(draws[:, 0]))
    noise = np.asarray(jax.vmap(lambda k: jax.random.randint(k, (width,), 0, num_classes))(
        draws[:, 1]))
    shaped = np.where(swap < p[:, None], noise, pred)
    counts = np.asarray(data.test_counts, np.float64)
    test = _hits(pred, data.test_y, data.test_counts) / counts
    delivered = _hits(shaped, data.test_y, data.test_counts) / counts
    return Delivery(targets=_frozen(targets), p=_frozen(p), train_accuracy=_frozen(train),
                    test_accuracy=_frozen(test), delivered=_frozen(delivered),
                    expected=_frozen((1 - p) * test + p * chance),
                    test_counts=_frozen(counts),
                    calibration_counts=_frozen(calibration.train_counts))
