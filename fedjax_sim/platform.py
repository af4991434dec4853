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

import jax

# The XLA flag that tests and users set to fake several host devices; when present, it wins.
_FORCED_COUNT_FLAG = "--xla_force_host_platform_device_count"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
      ValueError: on a bad ``cpu_devices``, whether or not it can still be applied.
    """
    count = parse_cpu_devices(cpu_devices)
    if count is None:
        count = available_cores()
    if _FORCED_COUNT_FLAG in os.environ.get("XLA_FLAGS", "") or backends_started():
        return None
    jax.config.update("jax_num_cpu_devices", count)
    return count
