"""The persistent compilation cache: on by default, off with --no-compile-cache, and never
a reason for a run to stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fedjax_sim import platform

TINY = ["--algorithm", "fedavg", "--num-clients", "3", "--rounds", "1", "--local-epochs", "1",
        "--no-progress", "--cpu-devices", "1"]


def _run(tmp_path, name, *flags, cache):
    env = {**os.environ, "FEDJAX_SIM_COMPILE_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "fedjax_sim.cli", "run", *TINY, *flags,
                           "--output", str(tmp_path / name)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((tmp_path / name / "summary.json").read_text())


def test_runs_keep_compiled_programs_unless_told_not_to(tmp_path):
    cache = tmp_path / "cache"
    first = _run(tmp_path, "first", cache=cache)
    kept = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert any(name.startswith("jit_rounds_block") for name in kept), kept
    # The same programs again: read back, not rewritten; the numbers are the same. (A
    # program whose compile time stayed under the caching threshold the first time may
    # cross it on a busy machine and be written now: only kept entries are checked.)
    second = _run(tmp_path, "second", cache=cache)
    assert {name: (cache / name).stat().st_mtime_ns for name in kept} == kept
    assert sum(p.name.startswith("jit_rounds_block") for p in cache.iterdir()) == sum(
        name.startswith("jit_rounds_block") for name in kept)
    assert second["accuracy"] == first["accuracy"]
    off = tmp_path / "off"
    _run(tmp_path, "uncached", "--no-compile-cache", cache=off)
    assert not off.exists()


def test_an_unwritable_cache_only_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    script = ("import warnings; warnings.simplefilter('always')\n"
              "from fedjax_sim import platform\n"
              f"print('IN USE', platform.enable_compile_cache({str(blocker / 'cache')!r}))\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "IN USE None" in done.stdout
    assert "is not writable" in done.stderr and "compiling uncached" in done.stderr


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDJAX_SIM_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert platform.default_compile_cache_dir() == tmp_path / "fedjax_sim" / "jax"
    monkeypatch.setenv("FEDJAX_SIM_COMPILE_CACHE", "~/elsewhere")
    assert str(platform.default_compile_cache_dir()).endswith("elsewhere")
