"""The package installs whole: the wheel holds every module, and a plain (non-editable)
install imports every module and runs the README's main command from outside the repository.

Both build offline (``--no-index --no-build-isolation``: the build tools of this Python), from
a copy of the sources, so that nothing is written into the working tree.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the import package it ships as (pyproject.toml [tool.setuptools]).
SHIPPED = {"fedjax_sim": "fedjax_sim", "kernels": "fedjax_sim/kernels"}
# What the build reads.
BUILD_INPUTS = ("pyproject.toml", "README.md", *SHIPPED)


def _environment() -> dict:
    """This process's environment without anything that would put the source tree on the
    path, with every CPU core visible as one device (as the command sees by default)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in BUILD_INPUTS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest / name)
    return dest


def _run(command: list[str], *, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=_environment())
    assert proc.returncode == 0, (f"{shlex.join(command)} exited {proc.returncode}:\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def _expected_modules() -> set[str]:
    """Every .py file of the shipped source folders, as its path inside the wheel."""
    return {f"{target}/{path.relative_to(ROOT / source).as_posix()}"
            for source, target in SHIPPED.items()
            for path in (ROOT / source).rglob("*.py") if "__pycache__" not in path.parts}


def test_wheel_holds_every_module(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    source = _copy_sources(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(tmp_path / "dist")], cwd=source, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fedjax_sim-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    missing = sorted(_expected_modules() - names)
    assert not missing, f"not in the wheel (pyproject.toml [tool.setuptools]): {missing}"
    # One top-level package: kernels/ ships inside it, never as a package of its own.
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fedjax_sim"}, top_level
    assert "fedjax-sim = fedjax_sim.cli:main" in entry_points
    assert "fedjax_sim/__main__.py" in names


def test_python_m_fedjax_sim_is_the_command(tmp_path):
    # Run outside the repository: `python -m fedjax_sim` finds the installed package.
    proc = _run([sys.executable, "-m", "fedjax_sim", "--help"], cwd=tmp_path, timeout=120)
    assert proc.stdout.startswith("usage: fedjax-sim ")
    for command in ("run", "compare", "sweep", "bench"):
        assert command in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "fedjax_sim", "run", "--rounds", "0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=_environment())
    assert bad.returncode == 2
    assert "fedjax-sim run: error: --rounds must be an integer >= 1" in bad.stderr


def _readme_main_command() -> list[str]:
    """The first ``fedjax-sim`` command of the README's Run section, as words."""
    text = (ROOT / "README.md").read_text().split("\n## Run", 1)[1]
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "fedjax-sim":
            return words
    raise AssertionError("README.md's Run section shows no fedjax-sim command")


@pytest.mark.slow
def test_installed_package_imports_and_runs(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    source = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    # Without a pip of its own: ensurepip would also put an old setuptools in it, over
    # this Python's; `venv/bin/python -m pip` runs this Python's pip into the venv.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
         cwd=tmp_path, timeout=300)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", str(source)], cwd=tmp_path, timeout=600)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    script = (
        "import importlib, json, pkgutil\n"
        "import fedjax_sim\n"
        "names = [m.name for m in pkgutil.walk_packages(fedjax_sim.__path__, 'fedjax_sim.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'file': fedjax_sim.__file__, 'names': names}))\n")
    proc = _run([str(python), "-c", script], cwd=outside, timeout=600)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    # The installed copy, not the repository's nor the editable install's.
    assert Path(found["file"]).resolve().is_relative_to(venv.resolve()), found["file"]
    expected = {path[:-3].replace("/", ".").removesuffix(".__init__")
                for path in _expected_modules()} - {"fedjax_sim"}
    assert expected <= set(found["names"]), sorted(expected - set(found["names"]))

    # The README's main command, shrunk (argparse keeps the last value of an option).
    words = _readme_main_command()
    tiny = {"compare": ["--rounds", "2", "--num-clients", "4", "--eval-every", "2",
                        "--seeds", "0"],
            "run": ["--rounds", "2", "--num-clients", "4", "--eval-every", "2"]}
    extra = [*tiny.get(words[1], []), "--no-progress", "--output", str(tmp_path / "out")]
    _run([str(bindir / words[0]), *words[1:], *extra], cwd=outside, timeout=900)
    _run([str(python), "-m", "fedjax_sim", "--help"], cwd=outside, timeout=120)
