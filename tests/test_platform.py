"""One XLA CPU device per core: the command line shows them and shards the client axis."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedjax_sim.platform import configure_cpu_devices, parse_cpu_devices


@pytest.mark.parametrize("value, expected", [("auto", None), ("AUTO", None), ("3", 3), (1, 1)])
def test_parse_cpu_devices(value, expected):
    assert parse_cpu_devices(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", 0, 2.5, True])
def test_bad_cpu_devices_named_with_its_range(value):
    with pytest.raises(ValueError, match="cpu_devices must be 'auto' or an integer >= 1"):
        parse_cpu_devices(value)


def test_started_backend_is_left_alone():
    import jax

    jax.devices()  # the backends are running in the test process
    assert configure_cpu_devices(3) is None
    with pytest.raises(ValueError, match="cpu_devices"):
        configure_cpu_devices("0")  # bad input is still an error


def _bench(*flags: str, xla_flags: str | None = None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    command = [sys.executable, "-m", "fedjax_sim.cli", "bench", "--num-clients", "6",
               "--local-steps", "2", "--rounds", "1", "--samples-per-client", "40", *flags]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_shards_clients_over_the_cpu_devices_it_shows():
    # Three devices whatever the core count: six clients, two per device.
    assert _bench("--cpu-devices", "3")["devices"] == 3
    assert _bench("--cpu-devices", "1")["devices"] == 1
    # A device count forced through XLA_FLAGS wins over --cpu-devices.
    forced = _bench("--cpu-devices", "3",
                    xla_flags="--xla_force_host_platform_device_count=2")
    assert forced["devices"] == 2
