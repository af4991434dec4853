"""The host loop: jit the round once, run it, evaluate, emit events, write results.

Extensibility follows FederatedScope's event/handler view of an FL course, on the host
side only (the jitted round stays pure): handlers registered with ``Events.on`` run at
``round_start``, ``round_end``, ``evaluate``, ``checkpoint`` and ``finish``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.core.evaluate import federation_incentives, summarize
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import FederatedData

EVENTS = ("round_start", "round_end", "evaluate", "checkpoint", "finish")


class Events:
    """Named host-side events with user handlers, called in registration order."""

    def __init__(self):
        self._handlers: dict[str, list[Callable[..., None]]] = defaultdict(list)

    def on(self, event: str, handler: Callable[..., None]) -> Events:
        """Registers ``handler(**info)`` for ``event``; returns self for chaining."""
        if event not in EVENTS:
            raise ValueError(f"event must be one of {', '.join(EVENTS)}; got {event!r}")
        self._handlers[event].append(handler)
        return self

    def emit(self, event: str, **info: Any) -> None:
        for handler in self._handlers[event]:
            handler(**info)


@dataclasses.dataclass
class RunResult:
    """What a run produced: the final summary, one record per evaluation, the state."""

    summary: dict
    history: list[dict]
    state: SimState


def traced_once(fn: Callable, name: str) -> Callable:
    """Wraps ``fn`` so that tracing it a second time raises: every round of a run must reuse
    the first compilation (a retrace means a shape or a static value changed between
    rounds). Unlike ``chex.assert_max_traces``, the count belongs to this wrapper alone, so
    separate runs of the same algorithm do not add up."""
    traces = 0

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        nonlocal traces
        traces += 1
        if traces > 1:
            raise RuntimeError(f"{name}: the round was traced again; every round must have "
                               "the same shapes and static arguments")
        return fn(*args, **kwargs)

    return wrapped


def validate_run_options(*, rounds: int, eval_every: int, checkpoint_every: int = 0) -> None:
    """Raises ValueError naming the option on a bad loop setting."""
    for name, value, low in (("rounds", rounds, 1), ("eval_every", eval_every, 1),
                             ("checkpoint_every", checkpoint_every, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def to_device(data: FederatedData) -> FederatedData:
    """Moves the padded arrays to the default device once, before the loop."""
    return jax.tree.map(jax.numpy.asarray, data)


def save_checkpoint(path: Path, state: SimState) -> None:
    """Writes the state's leaves atomically (a crash mid-write keeps the previous file)."""
    leaves = jax.tree.leaves(state.replace(key=jax.random.key_data(state.key)))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, *[np.asarray(leaf) for leaf in leaves])
    os.replace(tmp, path)


def load_checkpoint(path: Path, template: SimState) -> SimState:
    """Restores a state written by ``save_checkpoint`` into ``template``'s structure."""
    raw = template.replace(key=jax.random.key_data(template.key))
    treedef = jax.tree.structure(raw)
    with np.load(path) as archive:
        leaves = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    restored = jax.tree.unflatten(treedef, [jax.numpy.asarray(leaf) for leaf in leaves])
    return restored.replace(key=jax.random.wrap_key_data(restored.key))


def run(
    algorithm: Algorithm,
    data: FederatedData,
    *,
    rounds: int,
    eval_every: int = 1,
    seed: int = 0,
    events: Events | None = None,
    output: str | os.PathLike | None = None,
    local_accuracies: np.ndarray | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: bool = True,
    extra_summary: dict | None = None,
) -> RunResult:
    """Runs ``rounds`` rounds of ``algorithm`` on ``data``.

    Args:
      algorithm: from ``fedjax_sim.algorithms.make``.
      data: the federated data (numpy or jax arrays).
      rounds: number of rounds.
      eval_every: evaluate every this many rounds (and always after the last).
      seed: seed of the one PRNG key everything is split from.
      events: host-side handlers.
      output: directory for ``metrics.jsonl`` (appended at each evaluation),
        ``summary.json``, plots and checkpoints; nothing is written when None.
      local_accuracies: per-client accuracies of a local-only run on the same split; when
        given, the summary adds the hurt fraction and the participation rate.
      checkpoint_every: save the state every this many rounds (0: never).
      resume: continue from ``output/checkpoint.npz`` if it exists.
      progress: show a progress bar.
      extra_summary: more fields for ``summary.json``.

    Returns:
      A RunResult.
    """
    validate_run_options(rounds=rounds, eval_every=eval_every, checkpoint_every=checkpoint_every)
    events = events or Events()
    out = Path(output) if output is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    data = to_device(data)
    start = time.perf_counter()
    state = algorithm.init(jax.random.key(seed), data)
    history: list[dict] = []
    if resume and out is not None and (out / "checkpoint.npz").exists():
        state = load_checkpoint(out / "checkpoint.npz", state)
        history = _read_history(out / "metrics.jsonl", int(state.round))
    elif out is not None:
        (out / "metrics.jsonl").write_text("")

    round_fn = jax.jit(traced_once(algorithm.round, algorithm.name), donate_argnums=0)
    evaluate_fn = jax.jit(algorithm.evaluate)
    up_per_round, down_per_round = algorithm.comm_bytes(data)
    first_round = int(state.round)
    compile_s = None
    bar = _progress(range(first_round, rounds), progress, algorithm.name)
    metrics: dict = {}
    for r in bar:
        events.emit("round_start", round=r, state=state)
        tic = time.perf_counter()
        state, metrics = round_fn(state, data)
        if compile_s is None:
            jax.block_until_ready(state)
            compile_s = time.perf_counter() - tic
        events.emit("round_end", round=r + 1, state=state, metrics=metrics)
        done = r + 1
        if done % eval_every == 0 or done == rounds:
            correct, _ = evaluate_fn(state, data)
            record = {
                "round": done,
                "train_loss": float(metrics["train_loss"]),
                **summarize(np.asarray(correct), np.asarray(data.test_counts)),
                "bytes_up": up_per_round * done,
                "bytes_down": down_per_round * done,
                "wall_s": time.perf_counter() - start,
            }
            history.append(record)
            if out is not None:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(acc=f"{record['accuracy']:.4f}")
            events.emit("evaluate", round=done, state=state, record=record)
        if out is not None and checkpoint_every and done % checkpoint_every == 0:
            save_checkpoint(out / "checkpoint.npz", state)
            events.emit("checkpoint", round=done, state=state, path=out / "checkpoint.npz")

    final = history[-1]
    summary = {
        "algorithm": algorithm.name,
        "dataset": data.name,
        "num_clients": data.num_clients,
        "rounds": rounds,
        "seed": seed,
        "accuracy": final["accuracy"],
        "client_mean_accuracy": final["client_mean_accuracy"],
        "client_std": final["client_std"],
        "client_min": final["client_min"],
        "client_p10": final["client_p10"],
        "client_accuracies": final["client_accuracies"],
        "wall_s": time.perf_counter() - start,
        "compile_s": compile_s,
        "bytes_up": up_per_round * rounds,
        "bytes_down": down_per_round * rounds,
        "devices": 1,
        "hparams": algorithm.hparams,
        **(extra_summary or {}),
    }
    if algorithm.report is not None:
        summary.update(algorithm.report(state))
    if local_accuracies is not None:
        summary.update(federation_incentives(final["client_accuracies"], local_accuracies))
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        _plots(out, history, summary)
    events.emit("finish", summary=summary, state=state, history=history)
    return RunResult(summary, history, state)


def _read_history(path: Path, up_to_round: int) -> list[dict]:
    """Evaluation records already written, up to the checkpointed round."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [rec for rec in records if rec["round"] <= up_to_round]
    path.write_text("".join(json.dumps(rec) + "\n" for rec in kept))
    return kept


def _progress(iterable, enabled: bool, name: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=name, leave=False)


def _plots(out: Path, history: list[dict], summary: dict) -> None:
    """accuracy.png (accuracy against rounds) and clients.png (per-client distribution)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h["round"] for h in history], [h["accuracy"] for h in history], label="accuracy")
    ax.plot([h["round"] for h in history], [h["client_p10"] for h in history],
            label="bottom decile", linestyle="--")
    ax.set_xlabel("round")
    ax.set_ylabel("personalized test accuracy")
    ax.set_title(f"{summary['algorithm']} on {summary['dataset']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(summary["client_accuracies"], bins=20, range=(0, 1))
    ax.set_xlabel("client test accuracy")
    ax.set_ylabel("clients")
    ax.set_title(f"{summary['algorithm']}: {summary['num_clients']} clients")
    fig.tight_layout()
    fig.savefig(out / "clients.png", dpi=100)
    plt.close(fig)
