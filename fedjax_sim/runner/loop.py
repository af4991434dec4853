"""The host loop: run the compiled blocks, evaluate, emit events, record and finish every track."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedjax_sim import safety
from fedjax_sim.core import privacy
from fedjax_sim.core.checkpoint import Checkpointer
from fedjax_sim.core.clock import CLOCK_METRICS
from fedjax_sim.core.evaluate import federation_incentives, summarize
from fedjax_sim.core.state import to_host
from fedjax_sim.rundir import atomic_write_json, write_jsonl
from fedjax_sim.runner.programs import (
    Program,
    _compile_block,
)

EVENTS = ("round_start", "round_end", "evaluate", "checkpoint", "finish")


class Events:
    """Named host-side events with user handlers, called in registration order."""

    def __init__(self):
        self._handlers: dict[str, list[Callable[..., None]]] = defaultdict(list)

    def on(self, event: str, handler: Callable[..., None]) -> Events:
        """Registers ``handler(**info)`` for ``event``; returns self for chaining.

        Raises:
          ValueError: an ``event`` not in :data:`EVENTS`.
          TypeError: a ``handler`` that is not callable.
        """
        if not isinstance(event, str) or event not in EVENTS:
            raise ValueError(f"event must be one of {', '.join(EVENTS)}; got {event!r}")
        if not callable(handler):
            raise TypeError(f"handler for event {event!r} must be callable as "
                            f"handler(**info), got {type(handler).__name__} {handler!r}")
        self._handlers[event].append(handler)
        return self

    def emit(self, event: str, **info: Any) -> None:
        for handler in self._handlers[event]:
            handler(**info)


@dataclasses.dataclass
class Track:
    """One configuration's records in the host loop: what it writes and reports."""

    labels: dict
    hparams: dict
    out: Path | None = None
    local_accuracies: Any = None
    extra_summary: dict = dataclasses.field(default_factory=dict)
    history: list = dataclasses.field(default_factory=list)
    diverged: dict | None = None
    summary: dict | None = None


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, for a summary's ``reason``."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _record_failure(tracks: list[Track], error: BaseException) -> None:
    """A ``failed`` summary, with the one-line reason, for every configuration that started
    writing its folder and has no summary yet: no folder is left without a status."""
    for track in tracks:
        if track.out is None or track.summary is not None:
            continue
        if not (track.out / "config.json").exists():
            continue
        rounds_done = track.history[-1]["round"] if track.history else 0
        track.summary = {"status": "failed", "reason": one_line(error), **track.labels,
                         "rounds_done": rounds_done, "hparams": track.hparams}
        try:
            atomic_write_json(track.out / "summary.json", track.summary)
        except OSError:
            pass  # the original error matters more than a folder that cannot be written


class _VirtualTime:
    """The virtual time of a clocked run (``core.clock``), kept on the host from the round
    metrics so that the events read it without waiting on the device."""

    def __init__(self, state: Any, program: Program, count: int):
        self.single = program.size == 1
        self.last = None
        if getattr(state, "clock", None) is not None:
            last = np.asarray(to_host(state.clock.time)).reshape(-1)[:count]
            self.last = np.broadcast_to(last, (count,))

    def info(self, times=None) -> dict:
        """``virtual_time`` for an event (``times``: one round's, else the latest)."""
        if self.last is None:
            return {}
        now = self.last if times is None else times
        return {"virtual_time": float(now[0]) if self.single else now.tolist()}


def _block_end(r: int, *, rounds: int, eval_every: int, rounds_per_call: int,
               checkpoint_every: int) -> int:
    """The round a call starting after round ``r`` ends at: the next evaluation,
    checkpoint or the call-length limit."""
    stop_at = min(rounds, (r // eval_every + 1) * eval_every, r + rounds_per_call)
    if checkpoint_every:
        stop_at = min(stop_at, (r // checkpoint_every + 1) * checkpoint_every)
    return stop_at


def _note_divergence(tracks: list[Track], metrics: dict, first: int,
                     on_divergence: str) -> np.ndarray:
    """Marks each configuration whose loss or state went non-finite in this call (its
    first divergence only); returns the (configurations, rounds) losses."""
    # Rows past the tracks are padding (``sweep``'s repeated configurations).
    losses = np.asarray(metrics["train_loss"])[:len(tracks)]
    flags = np.asarray(metrics["nonfinite_any"])[:len(tracks)]
    new = [c for c in np.flatnonzero((~np.isfinite(losses) | flags).any(axis=1))
           if tracks[c].diverged is None]
    if new:
        clients = np.asarray(to_host(metrics["nonfinite_clients"]))
        for c in new:
            tracks[c].diverged = _divergence(losses[c], flags[c], clients[c], first,
                                             tracks[c].hparams, on_divergence)
    return losses


def _record(program: Program, c: int, track: Track, *, done: int, loss: float,
            correct: np.ndarray, metrics: dict, start: float) -> dict:
    """Configuration ``c``'s evaluation record after round ``done``."""
    up, down = program.comm[c]
    record = {"round": done, **track.labels, "train_loss": loss,
              **summarize(correct[c], program.test_counts[c]),
              "bytes_up": up * done, "bytes_down": down * done,
              "wall_s": time.perf_counter() - start}
    for key in CLOCK_METRICS + privacy.METRICS:
        if key in metrics:
            record[key] = np.asarray(metrics[key])[c, -1].item()
    record.update(_epsilon(program, c, done))
    if track.local_accuracies is not None:
        # Against the Local reference's final accuracies (it ran first).
        record.update(federation_incentives(record["client_accuracies"],
                                            track.local_accuracies))
    if track.diverged is not None:
        record["diverged_at"] = track.diverged["round"]
    return record


def _epsilon(program: Program, c: int, done: int) -> dict:
    """Configuration ``c``'s privacy spent after ``done`` rounds (``{}`` without DP)."""
    static = program.algorithm.hparams
    if static.get("dp", "off") == "off":
        return {}
    sigmas = np.asarray(program.hp["dp_noise_multiplier"]).reshape(-1)
    return privacy.epsilon_fields(static, float(sigmas[min(c, sigmas.size - 1)]),
                                  program.test_counts.shape[-1], done)


def _loop(program: Program, tracks: list[Track], *, rounds: int, eval_every: int,
          rounds_per_call: int, checkpoint_every: int, checkpoints: Checkpointer | None,
          identity: dict | None, first_round: int, events: Events, on_divergence: str,
          stop: safety.StopRequest, progress: bool, lead: bool, start: float,
          name: str) -> tuple[Any, int, float | None]:
    """The host loop, for one run and for a sweep alike.

    Runs rounds ``first_round`` .. ``rounds`` in calls that end at every evaluation and
    checkpoint; after each evaluation, every configuration's ``metrics.jsonl`` is
    rewritten. A configuration that diverges under ``stop`` keeps its records up to its
    divergence and takes no more (the others go on); the loop ends when every one has.

    Returns:
      ``(final state, rounds done, compile seconds)``.
    """
    loop = _HostLoop(program, tracks, eval_every=eval_every, checkpoints=checkpoints,
                     identity=identity, events=events, on_divergence=on_divergence,
                     lead=lead, start=start)
    bar = _progress(rounds - first_round, progress and lead, name)
    r = first_round
    try:
        while r < rounds and loop.live():
            stop_at = _block_end(r, rounds=rounds, eval_every=eval_every,
                                 rounds_per_call=rounds_per_call,
                                 checkpoint_every=checkpoint_every)
            losses, metrics = loop.advance(r, stop_at)
            if bar is not None:
                bar.update(stop_at - r)
            r = stop_at
            if not loop.live():
                break
            if r % eval_every == 0 or r == rounds:
                loop.evaluate(r, losses, metrics)
                if bar is not None and loop.live():
                    bar.set_postfix(acc=f"{tracks[loop.live()[0]].history[-1]['accuracy']:.4f}")
            if checkpoints is not None and checkpoint_every and r % checkpoint_every == 0:
                loop.save(r)
            if stop.requested:
                break
    except jax.errors.JaxRuntimeError as error:
        if safety.is_out_of_memory(error):
            raise safety.OutOfMemoryError(
                f"{program.algorithm.name} ran out of device memory at round {r + 1}: "
                f"{str(error).splitlines()[0][:200]}; lower --num-clients, --batch-size or "
                "the model size, or use --client-strategy sequential") from None
        raise
    finally:
        if bar is not None:
            bar.close()
    if stop.requested and r < rounds and checkpoints is not None:
        loop.save(r)
        checkpoints.wait()
    return loop.state, r, loop.compile_s


class _HostLoop:
    """The state of :func:`_loop` between calls: the current state, the compiled blocks
    by length, the watchdog and the virtual clock's last times."""

    def __init__(self, program: Program, tracks: list[Track], *, eval_every: int,
                 checkpoints: Checkpointer | None, identity: dict | None, events: Events,
                 on_divergence: str, lead: bool, start: float):
        self.program, self.tracks, self.eval_every = program, tracks, eval_every
        self.checkpoints, self.identity, self.events = checkpoints, identity, events
        self.on_divergence, self.lead, self.start = on_divergence, lead, start
        self.watchdog = safety.Watchdog()
        if program.host_wait:
            self.watchdog.wait(program.state, "initializing the state", first=True)
        self.state = program.state
        self.blocks: dict[int, Callable] = {}
        self.compile_s: float | None = None
        self.clock = _VirtualTime(self.state, program, len(tracks))

    def live(self) -> list[int]:
        """The configurations still taking rounds."""
        return [c for c, t in enumerate(self.tracks)
                if t.diverged is None or self.on_divergence == "warn"]

    def advance(self, r: int, stop_at: int) -> tuple[np.ndarray, dict]:
        """Rounds ``r`` .. ``stop_at`` in one call (compiled once per length), with their
        events; returns the losses and the call's metrics."""
        program, events, clock = self.program, self.events, self.clock
        length = stop_at - r
        tic = time.perf_counter()
        if length not in self.blocks:
            self.blocks[length] = _compile_block(program.make_block(length), self.state,
                                                 program.data, program.hp, program.devices)
        for i in range(length):
            events.emit("round_start", round=r + i, state=self.state, **clock.info())
        self.state, metrics = self.blocks[length](self.state, program.data, program.hp)
        first = self.compile_s is None
        if program.host_wait or first:
            self.watchdog.wait(self.state, f"rounds {r + 1}-{stop_at}", first=first)
        if first:
            self.compile_s = time.perf_counter() - tic
        losses = _note_divergence(self.tracks, metrics, r, self.on_divergence)
        times = (np.asarray(metrics["virtual_time"])[:len(self.tracks)]
                 if "virtual_time" in metrics else None)
        for i in range(length):
            events.emit("round_end", round=r + i + 1, state=self.state,
                        metrics=jax.tree.map(lambda m, i=i: m[:, i] if program.size > 1
                                             else m[0, i], metrics),
                        **clock.info(None if times is None else times[:, i]))
        if times is not None:
            clock.last = times[:, -1]
        return losses, metrics

    def save(self, done: int) -> None:
        self.checkpoints.save(done, self.state, {"identity": self.identity, "round": done})
        self.events.emit("checkpoint", round=done, state=self.state,
                         path=self.checkpoints.directory)

    def evaluate(self, done: int, losses: np.ndarray, metrics: dict) -> None:
        """Evaluates every live configuration, rewrites its metrics.jsonl, emits
        ``evaluate``."""
        program, tracks = self.program, self.tracks
        correct = np.asarray(to_host(program.evaluate(self.state, program.data, program.hp)))
        for c in self.live():
            track = tracks[c]
            track.history.append(_record(program, c, track, done=done,
                                         loss=float(losses[c, -1]), correct=correct,
                                         metrics=metrics, start=self.start))
            if self.lead and track.out is not None:
                write_jsonl(track.out / "metrics.jsonl", track.history)
        record = (tracks[0].history[-1] if program.size == 1 and tracks[0].history
                  else [t.history[-1] for t in tracks if t.history])
        self.events.emit("evaluate", round=done, state=self.state, **self.clock.info(),
                         record=record)


def _finish(program: Program, tracks: list[Track], state: Any, *, rounds: int, done: int,
            stopped: bool, fields: Callable[[int, Track, str, int], dict],
            writes: bool) -> None:
    """Every configuration's summary (``Track.summary``), written with its plots."""
    for c, track in enumerate(tracks):
        final = track.history[-1] if track.history else None
        # Ran to the end: complete, or diverged and kept going (``warn``).
        to_the_end = final is not None and final["round"] == rounds and not stopped
        if stopped:
            status, rounds_done = "stopped", done
        elif track.diverged is not None:
            status = "diverged"
            rounds_done = rounds if to_the_end else track.diverged["round"]
        else:
            status, rounds_done = "complete", rounds
        summary = fields(c, track, status, rounds_done)
        if final is not None:  # the privacy spent by what was released, at any status
            summary.update({k: final[k] for k in privacy.SPENT if k in final})
        # A diverged run reports no accuracy, even one that kept going (``warn``): its
        # records stay in metrics.jsonl, marked by the round it diverged at.
        if to_the_end and track.diverged is None:
            summary.update({k: final[k] for k in (
                "accuracy", "client_mean_accuracy", "client_std", "client_min",
                "client_p10", "client_accuracies")})
            if program.algorithm.report is not None:
                summary.update(program.algorithm.report(program.view(state, c)))
            if track.local_accuracies is not None:
                summary.update(federation_incentives(final["client_accuracies"],
                                                     track.local_accuracies))
        if track.diverged is not None:
            summary["diverged"] = track.diverged
            summary["diverged_at"] = track.diverged["round"]
        track.summary = summary
        if writes and track.out is not None:
            atomic_write_json(track.out / "summary.json", summary)
            if track.history:
                _plots(track.out, track.history, {**final, **summary})


def _divergence(losses: np.ndarray, flags: np.ndarray, clients: np.ndarray, first: int,
                hparams: dict, policy: str) -> dict:
    """A configuration's first divergence in a call of rounds ``first + 1 ..`` (round,
    clients, message) from its losses, flags and (rounds, K) non-finite clients; warns
    under ``warn``."""
    index = int(np.flatnonzero(~np.isfinite(losses) | flags)[0])
    clients = clients[index]
    message = safety.divergence_message(first + index + 1, clients, float(losses[index]),
                                        hparams)
    if policy == "warn":
        warnings.warn(message + " (going on: --on-divergence warn)", RuntimeWarning,
                      stacklevel=4)
    return {"round": first + index + 1, "clients": np.flatnonzero(clients).tolist(),
            "message": message}


def _progress(total: int, enabled: bool, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, leave=False)


def _plots(out: Path, history: list[dict], summary: dict) -> None:
    """accuracy.png (accuracy against rounds), clients.png (per-client distribution) and,
    for a run on the virtual clock, accuracy_vs_time.png (accuracy against virtual time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def accuracy_against(key: str, label: str, name: str) -> None:
        x = [h[key] for h in history]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(x, [h["accuracy"] for h in history], label="accuracy")
        ax.plot(x, [h["client_p10"] for h in history], label="bottom decile", linestyle="--")
        ax.set_xlabel(label)
        ax.set_ylabel("personalized test accuracy")
        ax.set_title(f"{summary['algorithm']} on {summary['dataset']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

    accuracy_against("round", "round", "accuracy.png")

    if history and "virtual_time" in history[0]:
        accuracy_against("virtual_time", "virtual time (s)", "accuracy_vs_time.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(summary["client_accuracies"], bins=20, range=(0, 1))
    ax.set_xlabel("client test accuracy")
    ax.set_ylabel("clients")
    ax.set_title(f"{summary['algorithm']}: {summary['num_clients']} clients")
    fig.tight_layout()
    fig.savefig(out / "clients.png", dpi=100)
    plt.close(fig)
