"""How many XLA devices a CPU host shows, so that the client axis spreads over its cores.

On a CPU host JAX shows one device by default; its matmuls are split over the cores
operation by operation. Client models are small (a 32-row batch through a 784x200 layer),
so each operation is too short to split well: a 2-core machine runs the FedAvg mlp round
as fast on one core as on two. Showing one device per core instead lets the runner shard
the client axis over them (``fedjax_sim.runner.client_axis_mesh``), every core training
its own clients one after another, which nearly doubles the round throughput on 2 cores
(experiments/speed.md).

The count must be set before JAX starts its backends, i.e. before the first array is
made. The command line does it for every command (``--cpu-devices``, default ``auto``);
from Python, call :func:`configure_cpu_devices` right after the imports.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

# The XLA flag that tests and users set to fake several host devices; when present, it wins.
_FORCED_COUNT_FLAG = "--xla_force_host_platform_device_count"

# XLA:CPU aborts the process when a collective waits 40 s for a peer device. The runner
# never queues a second call behind a sharded CPU round (``fedjax_sim.safety``), and its
# watchdog turns any remaining stall into a message; XLA's own limits are set above the
# watchdog's so that they never fire first. Available from jaxlib 0.8.
_COLLECTIVE_TIMEOUT_FLAGS = (
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds",
    "--xla_cpu_collective_call_terminate_timeout_seconds",
    "--xla_cpu_collective_timeout_seconds",
)
COLLECTIVE_TIMEOUT_S = 24 * 3600


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def forced_device_count() -> int | None:
    """The host device count that ``XLA_FLAGS`` forces, if it does.

    XLA aborts the process with a page of flag help on a malformed value, and JAX fails to
    start its CPU backend on 0; checking first turns both into a clear error.

    Returns:
      The count given by ``--xla_force_host_platform_device_count=N``, or ``None``.

    Raises:
      ValueError: naming ``XLA_FLAGS``, when N is not an integer >= 1.
    """
    count = None
    for token in os.environ.get("XLA_FLAGS", "").split():
        name, _, value = token.partition("=")
        if name != _FORCED_COUNT_FLAG:
            continue
        if not value.isdecimal() or int(value) < 1:
            raise ValueError(f"XLA_FLAGS: {_FORCED_COUNT_FLAG} must be an integer >= 1, got "
                             f"{token!r}")
        count = int(value)  # the last one wins, as in XLA
    return count


def check_environment() -> None:
    """Checks the environment variables this package reads, before JAX starts.

    Raises:
      ValueError: naming the variable (``XLA_FLAGS``'s forced host device count,
        ``FEDJAX_SIM_STRATEGY``) and what it allows.
    """
    from fedjax_sim.core.cohort import strategy_override

    forced_device_count()
    strategy_override()


def parse_cpu_devices(value: int | str) -> int | None:
    """Validates a ``cpu_devices`` setting.

    Args:
      value: ``"auto"`` (one device per available core), or an integer >= 1 (``1`` keeps
        JAX's single CPU device, whose operations are split over all cores).

    Returns:
      The count, or ``None`` for ``"auto"``.

    Raises:
      ValueError: naming ``cpu_devices`` and the allowed values.
    """
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return None
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"cpu_devices must be 'auto' or an integer >= 1, got {value!r}"
                             ) from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"cpu_devices must be 'auto' or an integer >= 1, got {value!r}")
    return value


def backends_started() -> bool:
    """Whether JAX has started its backends (after which the device count is fixed)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def configure_cpu_devices(cpu_devices: int | str = "auto") -> int | None:
    """Sets how many XLA CPU devices JAX shows, if it is still possible.

    Leaves the setting alone when ``XLA_FLAGS`` already forces a host device count, or
    when JAX's backends have started (the count is then fixed for the process). It has no
    effect on which backend is the default: on a GPU or TPU host the accelerators stay
    ``jax.devices()``.

    Args:
      cpu_devices: ``"auto"`` (one device per available core) or an integer >= 1.

    Returns:
      The count set, or ``None`` when the setting was left as it was.

    Raises:
      ValueError: on a bad ``cpu_devices``, whether or not it can still be applied, or a
        malformed forced device count in ``XLA_FLAGS``.
    """
    count = parse_cpu_devices(cpu_devices)
    if count is None:
        count = available_cores()
    forced = forced_device_count()  # validates XLA_FLAGS whether or not it applies
    if backends_started():
        return None
    raise_collective_timeouts()
    if forced is not None:
        return None
    jax.config.update("jax_num_cpu_devices", count)
    return count


def raise_collective_timeouts(seconds: int = COLLECTIVE_TIMEOUT_S) -> bool:
    """Adds XLA:CPU's collective timeout flags to ``XLA_FLAGS`` (those not already set),
    before the backends start; returns whether it did."""
    import jaxlib

    version = tuple(int(p) for p in jaxlib.__version__.split(".")[:2] if p.isdigit())
    if backends_started() or version < (0, 8):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"{flag}={seconds}" for flag in _COLLECTIVE_TIMEOUT_FLAGS if flag not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return True


# Compiled programs are kept across processes, so that a repeated run of the same shapes
# (a sweep's next configuration, a rerun, a resumed run) skips XLA compilation. Programs
# that compile in under this many seconds are not worth a disk round trip.
COMPILE_CACHE_MIN_SECONDS = 0.5


def default_compile_cache_dir() -> Path:
    """Where compiled programs are kept: ``$FEDJAX_SIM_COMPILE_CACHE``, else
    ``$XDG_CACHE_HOME/fedjax_sim/jax`` (``~/.cache/fedjax_sim/jax``)."""
    if os.environ.get("FEDJAX_SIM_COMPILE_CACHE"):
        return Path(os.environ["FEDJAX_SIM_COMPILE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fedjax_sim" / "jax"


def enable_compile_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache in ``directory``.

    A cache that cannot be used never stops a run: if the folder cannot be created or
    written, a warning says so and compilation goes on uncached. A cache already set
    (``JAX_COMPILATION_CACHE_DIR``, or ``jax.config`` before this call) is kept.

    Args:
      directory: the cache folder (``None``: :func:`default_compile_cache_dir`).

    Returns:
      The folder in use, or ``None`` when caching is off.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = Path(directory).expanduser() if directory else default_compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        warnings.warn(f"compile cache {path} is not writable ({error}); compiling uncached",
                      stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_MIN_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
