"""What keeps an unattended run from crashing, lying or hanging.

* **Device waits.** On a CPU host with several XLA devices, a sharded round's devices
  meet in collectives (the all-reduce of the aggregation). When rounds are queued back to
  back without a host wait, one device can start its next queued program while its peer
  is still in the previous one; both then block threads of the shared intra-op pool
  inside different collectives and neither collective can complete, until XLA aborts
  the process (``rendezvous.cc: Termination timeout``) after 40 s. ``experiments/
  stress.py`` reproduces it in seconds with queued calls and never with one call in
  flight. The runner therefore waits for each call before dispatching the next on such
  meshes (:func:`needs_host_wait`), which costs the host's dispatch latency only.
  Every such wait runs under a :class:`Watchdog`, so that a stall from any other cause
  (a device that failed, e.g. out of memory, while its peer waits) ends as a clear
  message and exit code instead of hanging or aborting with a C++ stack; XLA's own
  timeout is raised above the watchdog's (``platform.configure_cpu_devices``).
* **Divergence**: :func:`nonfinite_clients` flags the clients whose state holds a NaN or
  an infinity, inside the jitted round, and :class:`DivergedError` stops the run.
* **Preemption and Ctrl-C**: :class:`StopRequest` turns SIGTERM and SIGINT into a request
  that the host loop honours after the round in flight; a second signal exits at once.
* **Memory**: :func:`check_memory` compares a run's estimated footprint with what the
  device has free, before and after compiling.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Exit codes of the command line (and of the watchdog).
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_STALLED = 4
EXIT_OUT_OF_MEMORY = 5

# The shortest a device wait may last before the watchdog calls it a stall, and how many
# times the longest wait seen so far a later wait may last.
STALL_FLOOR_S = 300.0
STALL_FACTOR = 20.0
# The first wait of a kind has nothing to be measured against and includes the first call's
# compilation and a whole round on a large cohort: it gets this many floors.
FIRST_WAIT_FLOORS = 6.0
STALL_ENV = "FEDJAX_SIM_STALL_TIMEOUT"


class RunError(Exception):
    """A run that could not go on; the message is one line for the user."""

    exit_code = 1


class DivergedError(RunError):
    """A non-finite loss or parameter appeared."""

    exit_code = EXIT_DIVERGED

    def __init__(self, message: str, *, round: int, clients: list[int]):
        super().__init__(message)
        self.round = round
        self.clients = clients


class StoppedError(RunError):
    """The run was stopped by a signal after a completed round, with its state saved."""

    def __init__(self, message: str, *, round: int, signum: int, checkpoint: bool):
        super().__init__(message)
        self.round = round
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum


class OutOfMemoryError(RunError):
    """A run that does not fit in device memory."""

    exit_code = EXIT_OUT_OF_MEMORY


def needs_host_wait(mesh: Any) -> bool:
    """Whether each jitted call must finish before the next is dispatched: a mesh of
    several CPU devices (see the module docstring)."""
    return mesh is not None and mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


def stall_floor() -> float:
    """:data:`STALL_FLOOR_S`, or ``$FEDJAX_SIM_STALL_TIMEOUT`` seconds when set."""
    text = os.environ.get(STALL_ENV)
    if text is None:
        return STALL_FLOOR_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{STALL_ENV} must be a finite number of seconds > 0, got {text!r}")
    return value


class Watchdog:
    """Waits for device work, and ends the process with a clear message when a wait
    exceeds ``max(floor, factor * longest wait so far)`` seconds.

    A stuck device wait cannot be interrupted from Python (the main thread is inside
    XLA), so the watchdog's thread prints the message and exits the process with
    :data:`EXIT_STALLED`; what the run wrote before (metrics, checkpoints) stays.
    """

    def __init__(self, *, floor: float | None = None, factor: float = STALL_FACTOR,
                 hint: str = ""):
        self.floor = stall_floor() if floor is None else floor
        self.factor = factor
        self.hint = hint
        self.longest = 0.0

    def wait(self, tree: Any, what: str, *, first: bool = False) -> Any:
        """Blocks until ``tree`` is ready; ``first``: the first wait of its kind (the first
        round block, compilation included), allowed :data:`FIRST_WAIT_FLOORS` floors."""
        limit = max(self.floor * (FIRST_WAIT_FLOORS if first else 1.0),
                    self.factor * self.longest)
        timer = threading.Timer(limit, self._stalled, args=(what, limit))
        timer.daemon = True
        tic = time.monotonic()
        timer.start()
        try:
            jax.block_until_ready(tree)
        finally:
            timer.cancel()
        self.longest = max(self.longest, time.monotonic() - tic)
        return tree

    def _stalled(self, what: str, limit: float) -> None:
        sys.stderr.write(
            f"fedjax-sim: error: {what} made no progress for {limit:.0f} s (the longest "
            f"wait before was {self.longest:.1f} s): a device stalled, e.g. one device of "
            "a sharded round failed or ran out of memory while the others wait for it. "
            f"{self.hint}Everything written before stays; resume with --resume, or run "
            f"with --cpu-devices 1. (Set {STALL_ENV} to wait longer.)\n")
        sys.stderr.flush()
        os._exit(EXIT_STALLED)


def nonfinite_clients(clients: Any, server: Any, num_clients: int) -> jax.Array:
    """(K,) bool, jittable: whether client k's state, or the shared server state, holds a
    NaN or an infinity (a non-finite server state affects every client).

    Client-state leaves whose leading axis is not K (the per-architecture groups of FedMD
    and FCCL, (K_g, ...)) are not mapped back to client ids: a non-finite value there
    flags every client.
    """
    bad = jnp.zeros((num_clients,), bool)
    shared_bad = jnp.zeros((), bool)
    for leaf in jax.tree.leaves(clients):
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        if leaf.ndim and leaf.shape[0] == num_clients:
            bad = bad | ~jnp.isfinite(leaf.reshape(num_clients, -1)).all(axis=1)
        else:
            shared_bad = shared_bad | ~jnp.isfinite(leaf).all()
    for leaf in jax.tree.leaves(server):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            shared_bad = shared_bad | ~jnp.isfinite(leaf).all()
    return bad | shared_bad


def divergence_message(round: int, clients: np.ndarray, loss: float, hparams: dict) -> str:
    """One line naming the round, the clients and the likely cause."""
    ids = np.flatnonzero(clients).tolist()
    if not ids:
        who = "the training loss"
    elif len(ids) == len(clients):
        who = f"all {len(ids)} clients"
    else:
        shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
        who = f"{len(ids)} of {len(clients)} clients ({shown})"
    lr = hparams.get("lr")
    cause = (f"the learning rate (lr={lr:g}) is likely too large; lower --lr"
             if isinstance(lr, int | float) else "lower the learning rate")
    return (f"the run diverged at round {round}: non-finite values (NaN or inf) in "
            f"{who}; train loss {loss:g}; {cause}")


class StopRequest:
    """SIGINT and SIGTERM become a request to stop after the round in flight.

    Use as a context manager around the host loop (main thread only; elsewhere it does
    nothing). A second signal restores the default handlers and exits at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            sys.stderr.write(f"\nfedjax-sim: {signal.Signals(signum).name} again: exiting "
                             "now\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(f"\nfedjax-sim: {signal.Signals(signum).name}: stopping after the "
                         "round in flight (again to exit at once)\n")
        sys.stderr.flush()


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of ``tree``."""
    return int(sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape")))


def free_memory(device: Any) -> tuple[int | None, str]:
    """Bytes free for arrays on ``device`` (``None`` when unknown) and where it comes from.

    CPU devices share the host's memory (``MemAvailable``); accelerators report their own.
    """
    if device.platform == "cpu":
        return host_memory_available(), "host memory available"
    try:
        stats = device.memory_stats() or {}
    except Exception:  # a backend without memory statistics
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), \
            f"{device.device_kind} memory free"
    return None, f"{device.device_kind} memory"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_memory(parts: dict[str, int], *, devices: list, share: float = 0.9,
                 what: str = "this run") -> None:
    """Raises :class:`OutOfMemoryError` when the bytes of ``parts`` (per device) exceed
    ``share`` of the memory free on the first of ``devices``.

    Args:
      parts: named byte counts per device (e.g. client state, data, round temporaries).
      devices: the devices the run uses; CPU devices share one host memory, so their
        parts add up.
      share: the fraction of the free memory a run may plan to use.
    """
    free, source = free_memory(devices[0])
    if free is None:
        return
    copies = len(devices) if devices[0].platform == "cpu" else 1
    need = copies * sum(parts.values())
    if need <= share * free:
        return
    detail = ", ".join(f"{name} {_gib(copies * size)}" for name, size in parts.items()
                       if size)
    raise OutOfMemoryError(
        f"{what} needs about {_gib(need)} ({detail}) but only {_gib(free)} of {source} is "
        "left; lower --num-clients, --batch-size or the model size, use "
        "--client-strategy sequential (one client at a time), or shard over more devices")


def host_memory_available() -> int | None:
    """Bytes of host memory available (``MemAvailable``), ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(parts: dict[str, int], *, what: str, advice: str,
                      share: float = 0.9) -> None:
    """Raises :class:`OutOfMemoryError` (exit 5) when ``parts`` (bytes the host will hold
    at once, e.g. a source and the federated arrays built from it) exceed ``share`` of
    the host memory available, before any of it is allocated.

    Args:
      parts: named byte counts.
      what: what needs them, for the message.
      advice: the options to change, for the message.
    """
    free = host_memory_available()
    need = sum(parts.values())
    if free is None or need <= share * free:
        return
    detail = ", ".join(f"{name} {_gib(size)}" for name, size in parts.items() if size)
    raise OutOfMemoryError(f"{what} needs about {_gib(need)} of host memory ({detail}) but "
                           f"only {_gib(free)} is available; {advice}")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an XLA runtime error is an allocation failure."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or \
        "out of memory" in text
