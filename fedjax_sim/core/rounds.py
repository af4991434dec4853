"""The shape shared by every round: dispatch a cohort, train it, receive and aggregate
what it produced.

An algorithm supplies only what is its own, as a :class:`Method` (or a
:class:`GroupMethod` for clients in groups of architectures): the client update, the
server update and the personalized logits, plus optional hooks for what the server sends
and what evaluation reads. :func:`federated` and :func:`grouped` wrap them in the one
skeleton: the key split, cohort sampling, gathering the cohort's rows, mapping over
clients with the execution strategy, scattering personal state back, advancing the state
and the training metrics are written here once (as evosax's shared ``tell`` around each
strategy's own part).

A round is four steps, each a function of this module: *dispatch* (who trains and from
what: a :class:`Plan`), *train* (:func:`train_cohort`, the members' client updates over
the execution strategy), *receive* (the personal rows of the members whose update counts
are written back) and *aggregate* (:func:`aggregate`, the server update). When the round
runs on a virtual clock, the clock is passed in as a :class:`Schedule`, the condition of
the round: its own dispatch (who is online, finish times, the server condition), an
optional merge of the arrived uploads (asynchronous servers) and a record of the clock's
state; the steps between are the same functions. ``core.clock`` builds its schedules from
this module; this module imports nothing of the clock.

The hooks take ``hp`` first (all but ``logits``, which reads what ``eval_inputs`` made):
the algorithm's traced hyperparameters, a dict of scalar arrays that reaches the round as
an argument (see ``algorithms.base``), so that one compiled round serves any of their
values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.core.cohort import (
    Execution,
    client_map,
    client_map_mean,
    cohort_size,
    resolve_strategy,
    sample_cohort,
    train_in_place,
)
from fedjax_sim.core.evaluate import count_correct
from fedjax_sim.core.groups import (
    cohort_loss,
    global_rows,
    group_cohorts,
    group_members,
    private_data,
)
from fedjax_sim.core.local import FixedOrder
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.kernels.aggregation import gather, scatter


class CohortResult(NamedTuple):
    """What one round's cohort produced.

    Attributes:
      index: (M,) client indices, or ``None`` under full participation.
      counts: (M,) training sample counts (the FedAvg aggregation weights), zero for a
        member whose update does not count (:attr:`Plan.present`).
      uploads: per-client uploads, leaves (M, ...); with ``mean_uploads`` their
        sample-weighted mean instead (no client axis); under a schedule with a merge, the
        merged model.
      clients: the full (K, ...) client state with the new rows of the members whose
        update counts written back.
      loss: scalar, sample-weighted mean training loss of the members whose update counts.
    """

    index: jax.Array | None
    counts: jax.Array
    uploads: Any
    clients: Any
    loss: jax.Array


# --- The round's steps -------------------------------------------------------------------


class RoundKeys(NamedTuple):
    """The keys of one round, split from the state's key.

    Attributes:
      next: the state's key after the round.
      round: the key the method's ``broadcast`` gets.
      cohort: the key ``broadcast`` hands back, which the cohort is drawn and trained with.
    """

    next: jax.Array
    round: jax.Array
    cohort: jax.Array


class Plan(NamedTuple):
    """The dispatch step's result: who trains in this round and from what.

    Attributes:
      index: (M,) the members' client indices (distinct), or ``None``: all K in order.
      train_key: the key the members' training keys are split from (one per member).
      present: optional (M,) bool, whose updates count: the aggregation weights and counts
        become ``counts * present``, and an absent member keeps its previous personal rows
        (its rows are still trained). ``None``: every member counts.
      sent: optional, what the server sent each member (leaves (M, ...)) when members
        train from different models (an asynchronous server); ``None``: every member
        receives the round's ``broadcast``.
      clock: the schedule's own bookkeeping, read by its ``record``.
    """

    index: jax.Array | None
    train_key: jax.Array
    present: jax.Array | None = None
    sent: Any = None
    clock: Any = None


# dispatch(state, data, keys, received) -> Plan
Dispatch = Callable[[SimState, FederatedData, RoundKeys, Any], Plan]
# merge(received, plan, uploads) -> the stacked uploads merged into the server's view
Merge = Callable[[Any, Plan, Any], Any]
# record(state, plan, cohort) -> (state with its clock advanced, metrics of the clock)
Record = Callable[[SimState, Plan, CohortResult], tuple[SimState, dict]]


class Schedule(NamedTuple):
    """The condition a round runs under: how it dispatches, merges and records.

    Attributes:
      dispatch: ``(state, data, keys, received) -> Plan``.
      merge: optional ``(received, plan, uploads) -> uploads``: the members' uploads,
        stacked (leaves (M, ...)), merged into what the server update reads (an
        asynchronous server's step); ``None``: the server update reads the cohort's
        uploads (their mean with ``Method.mean_uploads``).
      record: optional ``(state, plan, cohort) -> (state, metrics)``, after the state
        advanced: the schedule's own state (the virtual clock) and metrics.
    """

    dispatch: Dispatch
    merge: Merge | None = None
    record: Record | None = None


def sampled(join_ratio: float) -> Schedule:
    """The plain round's schedule: ``round(join_ratio * K)`` clients drawn uniformly
    with the cohort key (:func:`draw_cohort`); every update counts."""

    def dispatch(state: SimState, data: FederatedData, keys: RoundKeys, received: Any):
        del state, received
        size = cohort_size(data.num_clients, join_ratio)
        return Plan(*draw_cohort(keys.cohort, data.num_clients, size))

    return Schedule(dispatch)


def draw_cohort(key: jax.Array, num_clients: int, size: int) -> tuple:
    """``(index, train_key)``: the cohort drawn from ``key`` (``None`` under full
    participation) and the key its members train with."""
    cohort_key, train_key = jax.random.split(key)
    return sample_cohort(cohort_key, num_clients, size), train_key


def upload_view(received: Any) -> Any:
    """The part of what the server sends that lives in the space of the uploads: all of
    it, or the first element of a tuple (FedOBP sends ``(params, mask key)``)."""
    return received[0] if isinstance(received, tuple) else received


def round_orders(batch_order: Any, round_index: jax.Array) -> jax.Array | None:
    """This round's (K, E, N_max) rows of host batch orders (R, K, E, N_max).

    Round ``r`` uses ``batch_order[r % R]``: a run longer than R rounds starts over.

    Args:
      batch_order: host orders (e.g. ``core.local.sample_batch_orders``), or ``None``.
      round_index: scalar int, the rounds completed so far (``SimState.round``).

    Returns:
      The round's orders, or ``None`` when ``batch_order`` is ``None``.
    """
    if batch_order is None:
        return None
    table = jnp.asarray(batch_order, jnp.int32)
    return table[round_index % table.shape[0]]


def with_examples(client_fn: Callable, unpack: Callable, row_at: int = 1) -> Callable:
    """``client_fn(shared, *before, x, y, n, *after)`` as a function of a client's data
    row: ``(shared_and_pool, *before, row, *after)`` with ``row_at`` arguments before the
    row, its examples read with ``unpack`` (see ``FederatedData.client_rows``) inside the
    mapped function, where the ragged layout slices them out of the pool."""

    def client(shared_and_pool, *args):
        shared, pool = shared_and_pool
        return client_fn(shared, *args[:row_at], *unpack(pool, args[row_at]),
                         *args[row_at + 1:])

    return client


def train_cohort(
    plan: Plan,
    clients: Any,
    data: FederatedData,
    client_update: Callable,
    *,
    hp: Any,
    received: Any,
    execution: Execution,
    mean_uploads: bool = False,
    orders: jax.Array | None = None,
) -> CohortResult:
    """The train and receive steps: runs ``client_update`` on every member of ``plan``
    and writes back the rows of those whose update counts.

    Args:
      client_update: ``(hp, received, own, x, y, n, key) -> (upload, new_own, loss)``.
      received: what the server sent every member this round (the global model, keys,
        soft targets, ...), unless ``plan.sent`` gives each its own. A client function
        reads the round's values only through it and ``hp``, never through a closure
        (``core.cohort`` says why).
      mean_uploads: hand back the sample-weighted mean of the uploads (what FedAvg-style
        servers compute) rather than the stacked uploads. The loop strategies then keep a
        running sum and train the cohort in place (``core.cohort.train_in_place``): no
        (M, ...) copy of the cohort's state, data or uploads is made, and with the client
        axis sharded every device trains the members it holds.
      orders: (K, E, N_max) sample orders of this round, one row per client (see
        :func:`round_orders`), or ``None``. When given, each member receives
        ``core.local.FixedOrder(orders[k])`` in place of its PRNG key, which
        ``core.local.train`` reads as its batch order.

    Raises:
      ValueError: if ``orders`` does not have K rows and ``N_max`` columns.
    """
    index = plan.index
    size = data.num_clients if index is None else index.shape[0]
    keys = jax.random.split(plan.train_key, size)
    if orders is not None:
        keys = FixedOrder(gather(_checked_orders(orders, data), index))
    counts = gather(data.train_counts, index)
    weights = counts.astype(jnp.float32)
    if plan.present is not None:
        counts = counts * plan.present.astype(counts.dtype)
        weights = weights * plan.present.astype(jnp.float32)
    uploads, new, losses = _train(plan, clients, data, client_update, keys, weights,
                                  hp=hp, received=received, execution=execution,
                                  mean_uploads=mean_uploads)
    loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    clients = receive(plan, clients, new, data.num_clients)
    return CohortResult(index, counts, uploads, clients, loss)


def _checked_orders(orders: jax.Array, data: FederatedData) -> jax.Array:
    num_clients, n_max = data.num_clients, data.width("train")
    if orders.ndim != 3 or orders.shape[0] != num_clients or orders.shape[2] != n_max:
        raise ValueError(f"batch orders of a round must have shape (clients, epochs, "
                         f"N_max) = ({num_clients}, E, {n_max}), got {orders.shape}")
    return orders


class _Trained(NamedTuple):
    """New client rows: the members' (M, ...) rows, or, when trained in place, the whole
    (K, ...) state with every member's row written."""

    rows: Any
    in_place: bool


def _train(plan, clients, data, client_update, keys, weights, *, hp, received, execution,
           mean_uploads) -> tuple[Any, _Trained, jax.Array]:
    """``(uploads, new rows, (M,) losses)`` of the members, over the execution strategy."""
    rows, pool = data.client_rows("train")
    unpack, strategy = data.unpacker("train"), execution.strategy
    common = dict(strategy=strategy, chunk_size=execution.chunk_size)
    if plan.sent is None:
        def member(shared, own, x, y, n, key):
            # The traced hyperparameters travel with what the server sends (never through
            # a closure: see core.cohort).
            return client_update(shared[0], shared[1], own, x, y, n, key)

        fn, shared, sent = with_examples(member, unpack), ((hp, received), pool), ()
    else:
        fn = with_examples(client_update, unpack, row_at=2)
        shared, sent = (hp, pool), (plan.sent,)
    if mean_uploads and not sent and resolve_strategy(strategy) != "vmap":
        # Loop strategies read and write the resident (K, ...) arrays in place.
        uploads, new_clients, losses = train_in_place(
            fn, clients, (rows,), plan.index, keys, weights, shared=shared, **common)
        return uploads, _Trained(new_clients, True), losses
    args = (*sent, gather(clients, plan.index), gather(rows, plan.index), keys)
    if mean_uploads:
        uploads, (new_rows, losses) = client_map_mean(
            lambda *a: _upload_first(fn(*a)), args, weights, shared=shared, **common)
    else:
        uploads, new_rows, losses = client_map(fn, args, shared=shared, **common)
    return uploads, _Trained(new_rows, False), losses


def _upload_first(out):
    upload, new_row, loss = out
    return upload, (new_row, loss)


def receive(plan: Plan, clients: Any, new: _Trained, num_clients: int) -> Any:
    """The receive step: ``clients`` (K, ...) with the new rows of the members whose
    update counts; the others keep their rows."""
    present = plan.present
    if new.in_place:
        if present is None:
            return new.rows
        if plan.index is not None:
            present = jnp.zeros((num_clients,), bool).at[plan.index].set(present)
        return _where_rows(present, new.rows, clients)
    rows = new.rows
    if present is not None:
        rows = _where_rows(present, rows, gather(clients, plan.index))
    return scatter(clients, plan.index, rows)


def _where_rows(keep: jax.Array, new: Any, old: Any) -> Any:
    """Rows of ``new`` where ``keep`` (leading axis), else those of ``old``."""
    def pick(a, b):
        return jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


def aggregate(method: Method, hp: Any, state: SimState, cohort: CohortResult,
              context: Any, present: jax.Array | None = None) -> tuple[Any, dict]:
    """The aggregate step: ``method``'s server update; with ``present`` given and no
    update counting, the server part is left unchanged."""
    server, metrics = method.server_update(hp, state, cohort, context)
    if server is not None and present is not None:
        counted = jnp.any(present)
        server = jax.tree.map(lambda a, b: jnp.where(counted, a, b), server, state.server)
    return server, metrics


def advance(
    state: SimState, key: jax.Array, *, server: Any = None, clients: Any = None
) -> SimState:
    """The state after a round: new key, round + 1, and whichever parts changed."""
    return state.replace(
        key=key,
        round=state.round + 1,
        server=state.server if server is None else server,
        clients=state.clients if clients is None else clients,
    )


# --- The algorithm's parts ---------------------------------------------------------------

# client_update(hp, received, own_k, x_k, y_k, n_k, key_k) -> (upload_k, new_own_k, loss_k)
ClientUpdate = Callable[..., tuple[Any, Any, jax.Array]]
# server_update(hp, state, cohort, context) -> (new server part or None: unchanged, metrics)
ServerUpdate = Callable[[Any, SimState, CohortResult, Any], tuple[Any, dict]]
# broadcast(hp, state, round_key) -> (cohort_key, received, context)
Broadcast = Callable[[Any, SimState, jax.Array], tuple[jax.Array, Any, Any]]
# eval_inputs(hp, state) -> (client part with leaves (K, ...) or None, shared part)
EvalInputs = Callable[[Any, SimState], tuple[Any, Any]]
# logits(own_k, shared, x_k) -> logits
Logits = Callable[[Any, Any, jax.Array], jax.Array]


def send_global(hp: Any, state: SimState, round_key: jax.Array) -> tuple:
    """The default broadcast: the cohort is drawn with the round key and every sampled
    client receives the global model ``state.server["params"]``; no context."""
    del hp
    return round_key, state.server["params"], None


def fedavg_server(hp: Any, state: SimState, cohort: CohortResult, context: Any) -> tuple:
    """The default server update: the uploads' sample-weighted mean is the new global
    model (with ``Method.mean_uploads`` the cohort already hands back that mean)."""
    del hp, state, context
    return {"params": cohort.uploads}, {}


def keep_server(hp: Any, state: SimState, cohort: CohortResult, context: Any) -> tuple:
    """A server update that changes nothing (nothing is uploaded)."""
    del hp, state, cohort, context
    return None, {}


def personal_and_global(hp: Any, state: SimState) -> tuple[Any, Any]:
    """The default evaluation inputs: every client's state, and the global model when the
    server keeps one."""
    del hp
    server = state.server
    return state.clients, server["params"] if isinstance(server, dict) else None


def personal_only(hp: Any, state: SimState) -> tuple[Any, Any]:
    """Evaluation inputs of algorithms whose clients are evaluated on their own state."""
    del hp
    return state.clients, None


class Method(NamedTuple):
    """What one algorithm adds to the shared round.

    Attributes:
      client_update: ``(hp, received, own, x, y, n, key) -> (upload, new_own, loss)`` for
        one sampled client: ``received`` is what the server sent (``broadcast``), ``own``
        the client's row of the client state (``None`` when the state keeps none).
      logits: ``(own, shared, x) -> logits`` of the model each client is evaluated on.
      server_update: ``(hp, state, cohort, context) -> (server, metrics)``: the new
        server part (``None``: unchanged) and metrics besides ``train_loss``.
      broadcast: ``(hp, state, round_key) -> (cohort_key, received, context)``: the key
        the cohort is drawn and trained with, what every sampled client receives, and
        anything the server update needs from before the cohort ran.
      eval_inputs: ``(hp, state) -> (client part, shared part)`` read by ``logits``.
      mean_uploads: the cohort hands back the uploads' sample-weighted mean instead of
        stacking them (see :func:`train_cohort`).
    """

    client_update: ClientUpdate
    logits: Logits
    server_update: ServerUpdate = fedavg_server
    broadcast: Broadcast = send_global
    eval_inputs: EvalInputs = personal_and_global
    mean_uploads: bool = True


# --- The skeleton ----------------------------------------------------------------------


def federated(
    method: Method,
    *,
    join_ratio: float,
    execution: Execution,
    batch_order: Any = None,
    clock: Any = None,
    budget: tuple | None = None,
    comm_bytes: Callable | None = None,
    privacy: Any = None,
) -> tuple[Callable, Callable]:
    """The round and the evaluation of ``method``, each taking the traced hyperparameters.

    Args:
      method: the algorithm's own parts.
      join_ratio: fraction of clients sampled per round (it fixes the cohort size, so it
        is not traced).
      execution: how per-client functions run over the client axis.
      batch_order: optional host sample orders (R, K, E, N_max) that replace the random
        batch order (:func:`round_orders`).
      clock: optional virtual clock (``core.clock.Clock``: system model and server
        condition): the round runs under the :class:`Schedule` it gives
        (``clock.schedule(join_ratio=..., budget=..., comm_bytes=..., batch_order=...)``);
        ``None``: the plain round (:func:`sampled`).
      budget: with ``clock``, ``(local_epochs, local_steps, batch_size)`` (the samples a
        job processes).
      comm_bytes: with ``clock``, the algorithm's ``comm_bytes`` (bytes a job moves).
      privacy: optional ``core.privacy.Privacy``: the cohort is drawn as the accountant
        assumes and the members' updates are clipped, summed and noised before the
        server update reads them as the cohort's mean model (not with ``clock``).

    Returns:
      ``round_with(state, data, hp) -> (state, metrics)`` and
      ``evaluate_with(state, data, hp) -> (correct[K], loss_sum[K])``.
    """
    if clock is not None and privacy is not None:
        raise ValueError("differential privacy does not run on the virtual clock")
    if clock is None:
        schedule = sampled(join_ratio)
    else:
        schedule = clock.schedule(join_ratio=join_ratio, budget=budget,
                                  comm_bytes=comm_bytes, batch_order=batch_order)
    mean_uploads = (method.mean_uploads and schedule.merge is None and privacy is None)

    def round_with(state: SimState, data: FederatedData, hp: Any):
        next_key, round_key = jax.random.split(state.key)
        cohort_key, received, context = method.broadcast(hp, state, round_key)
        if privacy is None:
            plan = schedule.dispatch(state, data,
                                     RoundKeys(next_key, round_key, cohort_key), received)
        else:
            sample_key, train_key = jax.random.split(cohort_key)
            drawn = privacy.draw(sample_key, data.num_clients)
            plan = Plan(drawn.index, train_key, drawn.present)
        cohort = train_cohort(plan, state.clients, data, method.client_update, hp=hp,
                              received=received, execution=execution,
                              mean_uploads=mean_uploads,
                              orders=round_orders(batch_order, state.round))
        private = {}
        if schedule.merge is not None:
            cohort = cohort._replace(uploads=schedule.merge(received, plan, cohort.uploads))
        elif privacy is not None:
            from fedjax_sim.core.privacy import noise_key

            merged, own_state, private = privacy.privatize(
                hp, state.privacy, upload_view(received), cohort.uploads, plan.present,
                noise_key(round_key, hp), data.num_clients)
            cohort = cohort._replace(uploads=merged)
            state = state.replace(privacy=own_state)
            private["dp_truncated"] = drawn.truncated
        # A private round releases its noised mean even when nobody was sampled.
        present = None if privacy is not None else plan.present
        server, metrics = aggregate(method, hp, state, cohort, context, present)
        state = advance(state, next_key, server=server, clients=cohort.clients)
        metrics = {"train_loss": cohort.loss, **metrics, **private}
        if schedule.record is None:
            return state, metrics
        state, timing = schedule.record(state, plan, cohort)
        return state, {**metrics, **timing}

    def evaluate_with(state: SimState, data: FederatedData, hp: Any):
        own, shared = method.eval_inputs(hp, state)
        return count_correct(method.logits, own, shared, data,
                             strategy=execution.strategy, chunk_size=execution.chunk_size)

    return round_with, evaluate_with


# --- Clients in groups (one per architecture) ------------------------------------------

# keys(round_key) -> (cohort_key, train_key, other)
GroupKeys = Callable[[jax.Array], tuple[jax.Array, jax.Array, Any]]
# exchange(hp, rows, other) -> (inputs, received, metrics): ``rows`` the sampled rows of
# every group's state (leaves (M_g, ...)); ``inputs`` per group what each sampled client
# trains from (leaves (M_g, ...)).
Exchange = Callable[[Any, list, Any], tuple[list, Any, dict]]
# group_update(hp, g, received, inputs_k, x_k, y_k, n_k, key_k) -> (new_row_k, loss_k)
GroupUpdate = Callable[..., tuple[Any, jax.Array]]


class GroupMethod(NamedTuple):
    """What an algorithm over groups of clients (``core.groups``) adds to the round.

    Attributes:
      keys: ``round_key -> (cohort_key, train_key, other)``; group g's clients train with
        keys split from ``fold_in(train_key, g)``.
      exchange: ``(hp, rows, other) -> (inputs, received, metrics)``: what happens between
        the server and the sampled clients before they train privately (consensus,
        collaboration); ``rows`` the sampled rows of each group's state.
      client_update: ``(hp, g, received, inputs, x, y, n, key) -> (new_row, loss)`` for a
        sampled client of group g.
    """

    keys: GroupKeys
    exchange: Exchange
    client_update: GroupUpdate


def grouped(
    method: GroupMethod,
    *,
    num_groups: int,
    join_ratio: float,
    execution: Execution,
) -> Callable:
    """The round of ``method`` over ``num_groups`` groups of clients.

    Returns:
      ``round_with(state, data, hp) -> (state, metrics)``; the state's client part is
      the tuple of the groups' trees (``core.groups.grouped_state``).
    """

    def round_with(state: SimState, data: FederatedData, hp: Any):
        members = group_members(data.num_clients, num_groups)
        next_key, round_key = jax.random.split(state.key)
        cohort_key, train_key, other = method.keys(round_key)
        cohorts = group_cohorts(cohort_key, members, join_ratio)
        rows = [gather(tree, c) for tree, c in zip(state.clients, cohorts, strict=True)]
        inputs, received, metrics = method.exchange(hp, rows, other)
        new_groups, losses, counts = [], [], []
        for g, (idx, tree, c, own) in enumerate(
            zip(members, state.clients, cohorts, inputs, strict=True)
        ):
            clients = global_rows(idx, c)
            x, y, n = private_data(data, clients)
            keys = jax.random.split(jax.random.fold_in(train_key, g), clients.shape[0])

            def client(shared, *row, g=g):
                return method.client_update(shared[0], g, shared[1], *row)

            new_rows, loss = execution.map(client, (own, x, y, n, keys),
                                           shared=(hp, received))
            new_groups.append(scatter(tree, c, new_rows))
            losses.append(loss)
            counts.append(n)
        state = advance(state, next_key, clients=tuple(new_groups))
        return state, {"train_loss": cohort_loss(losses, counts), **metrics}

    return round_with


def grouped_evaluate(
    logits: Callable[[int, Any, jax.Array], jax.Array],
    *,
    num_groups: int,
    execution: Execution,
) -> Callable:
    """Evaluation over groups: every client's own model on its own test set.

    Args:
      logits: ``(g, own, x) -> logits`` of a client of group g.

    Returns:
      ``evaluate_with(state, data, hp) -> (correct[K], loss_sum[K])`` in client order.
    """

    def evaluate_with(state: SimState, data: FederatedData, hp: Any):
        del hp
        members = group_members(data.num_clients, num_groups)
        correct = jnp.zeros((data.num_clients,), jnp.int32)
        loss = jnp.zeros((data.num_clients,), jnp.float32)
        for g, (idx, tree) in enumerate(zip(members, state.clients, strict=True)):
            c, l_ = count_correct(
                lambda own, _, x, g=g: logits(g, own, x), tree, None, data, index=idx,
                strategy=execution.strategy, chunk_size=execution.chunk_size,
            )
            correct = correct.at[idx].set(c)
            loss = loss.at[idx].set(l_)
        return correct, loss

    return evaluate_with
