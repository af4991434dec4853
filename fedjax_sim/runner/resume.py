"""What identifies a run, and resuming it from its checkpoints."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim import safety
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.core.checkpoint import Checkpointer, CheckpointError
from fedjax_sim.core.state import SimState
from fedjax_sim.data.federated import (
    FederatedData,
)
from fedjax_sim.rundir import read_jsonl, write_jsonl
from fedjax_sim.runner.loop import (
    one_line,
)

# Settings that may change between a run and its resumption: they do not change what the
# rounds compute (``rounds`` may grow; ``devices`` changes only float summation order).
RESUMABLE = frozenset({"rounds", "eval_every", "checkpoint_every", "rounds_per_call",
                       "devices", "on_divergence", "progress"})


CHECKPOINT_DIR = "checkpoints"


class ResumeError(ValueError):
    """A resume that cannot continue the run in the folder (no checkpoint, other settings,
    a torn file)."""


def _jsonable(value: Any) -> Any:
    """``value`` as JSON would read it back, so that saved and current settings compare."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def data_fingerprint(data: FederatedData) -> str:
    """A short hash of the split: client counts, labels and a strided sample of inputs
    (enough to tell two partitions or two sources apart, cheap for large pools)."""
    digest = hashlib.sha256()
    for leaf in (data.train_counts, data.test_counts, data.train_y, data.test_y):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    for leaf in (data.train_x, data.test_x):
        flat = np.asarray(leaf).reshape(-1)
        digest.update(np.ascontiguousarray(flat[:: max(1, flat.size // 4096)]).tobytes())
    return digest.hexdigest()[:16]


def run_identity(algorithm: Algorithm, data: FederatedData, seed: int,
                 config: dict | None = None) -> dict:
    """The settings that determine what a run computes: what a checkpoint must match."""
    identity = {
        "algorithm": algorithm.name,
        "hparams": algorithm.hparams,
        "seed": seed,
        "dataset": data.name,
        "num_clients": data.num_clients,
        "num_classes": data.num_classes,
        "data_fingerprint": data_fingerprint(data),
    }
    identity.update({k: v for k, v in (config or {}).items() if k not in RESUMABLE})
    return _jsonable(identity)


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``name: saved -> current`` for every setting that differs (nested hparams too)."""
    found = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {_shown(a)} in the checkpoint, {_shown(b)} now")
    return found


def _shown(value: Any) -> str:
    # An option left unset resolves to its default: say so, not "None".
    return "the default" if value is None else repr(value)


def _stopped_error(done: int, signum: int | None, checkpoints: Checkpointer | None,
                   resume_hint: str | None) -> safety.StoppedError:
    saved = checkpoints is not None
    how = (f"; resume with: {resume_hint}" if saved and resume_hint else
           f"; its checkpoint is in {checkpoints.directory}" if saved else
           " (no output folder: nothing was saved)")
    return safety.StoppedError(f"stopped at round {done}{how}", round=done, signum=signum,
                               checkpoint=saved)


def _check_resumable(checkpoints: Checkpointer, meta: Any, latest: int, identity: dict,
                     rounds: int) -> None:
    saved = meta.get("identity") if isinstance(meta, dict) else None
    if not isinstance(saved, dict):
        raise ResumeError(f"--resume: {checkpoints.directory}: the checkpoint of round "
                          f"{latest} records no configuration; it is not this program's")
    differences = _differences(saved, identity)
    if differences:
        raise ResumeError("--resume: the checkpoint in " + str(checkpoints.directory)
                          + " belongs to other settings: " + "; ".join(differences))
    if latest > rounds:
        raise ResumeError(f"--resume: the checkpoint is at round {latest}, past --rounds "
                          f"{rounds}; give --rounds {latest} or more")


def _resume(out: Path, checkpoints: Checkpointer, template: SimState, shardings,
            identity: dict, rounds: int, *, write: bool) -> tuple[SimState, list[dict]]:
    """The checkpointed state and the evaluation records up to its round, after checking
    that the checkpoint belongs to a run with these settings."""
    rounds_saved = checkpoints.rounds()
    if not rounds_saved:
        raise ResumeError(f"--resume: no checkpoint in {checkpoints.directory}; run without "
                          "--resume (use --checkpoint-every to save one)")
    for latest in reversed(rounds_saved):
        try:
            meta = checkpoints.metadata(latest)
            _check_resumable(checkpoints, meta, latest, identity, rounds)
            state, _ = checkpoints.restore(template, shardings, latest)
            break
        except CheckpointError as error:
            # A torn or corrupted checkpoint: the intact one before it, with a warning.
            if latest == rounds_saved[0]:
                raise
            warnings.warn(f"--resume: the checkpoint of round {latest} cannot be read "
                          f"({one_line(error)}); resuming from the one before it",
                          RuntimeWarning, stacklevel=3)
    metrics_path = out / "metrics.jsonl"
    if not metrics_path.is_file():
        # The records before the checkpoint live only there: refuse rather than lose them.
        raise ResumeError(f"--resume: {metrics_path} is missing; it holds the run's records "
                          f"up to round {latest}: restore it, or start a fresh run")
    history = read_jsonl(metrics_path)
    history = [record for record in history if record.get("round", 0) <= latest]
    if write:
        write_jsonl(metrics_path, history)
    return state, history
