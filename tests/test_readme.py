"""Every ``fedjax-sim`` command shown in README.md runs, at a tiny size.

The commands are read from the README's fenced code blocks (backslash continuations joined,
``#`` comments dropped) and run through ``python -m fedjax_sim.cli`` in a subprocess that
sees two CPU devices, two commands at a time. Options appended to a command shrink it
(argparse keeps the last value of a repeated option), and every command that writes gets a
fresh ``--output`` directory. Commands that need a cluster or prepared tfds data are only
parsed. The commands of the measurement pages (experiments/*.md) run the same way, marked
slow.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedjax_sim.cli import DEFAULT_COMPARE, build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "experiments").glob("*.md"))
PROGRAM = "fedjax-sim"

# Sources read with tfds from prepared files: not available offline.
TFDS_SOURCES = ("mnist", "fashion_mnist", "emnist", "cifar10", "cifar100", "svhn_cropped")
# Appended to every run / compare / bench command.
TINY = {
    "run": ["--rounds", "2", "--num-clients", "4", "--eval-every", "2", "--no-progress"],
    "compare": ["--rounds", "2", "--num-clients", "4", "--eval-every", "2", "--no-progress",
                "--seeds", "0"],
    "sweep": ["--rounds", "2", "--num-clients", "4", "--eval-every", "2", "--no-progress",
              "--seeds", "0"],
    "bench": ["--rounds", "1", "--num-clients", "2", "--local-steps", "1"],
}
# A comparison keeps its first algorithm (and Local, which it always runs as the reference):
# each further one only adds a compilation.
COMPARE_KEEP = 1
TIMEOUT_S = 300
DEVICES = 2  # CPU devices each command sees
WORKERS = 2  # commands run at once


def shell_commands(markdown: str, program: str = PROGRAM) -> list[str]:
    """The ``program`` command lines of the fenced code blocks of ``markdown``.

    Blocks marked as another language (``python``, ...) are skipped. A line ending in a
    backslash continues on the next; comments are dropped. Each command is returned as one
    line, e.g. ``"fedjax-sim run --algorithm fedper"``.
    """
    commands = []
    in_block, shell, pending = False, False, ""
    for line in markdown.splitlines():
        fence = re.match(r"\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence:
            in_block = not in_block
            shell = in_block and fence.group(2).lower() in ("", "bash", "sh", "shell",
                                                            "console", "text")
            pending = ""
            continue
        if not (in_block and shell):
            continue
        text = pending + line
        if text.rstrip().endswith("\\"):
            pending = text.rstrip()[:-1] + " "
            continue
        pending = ""
        if not re.match(rf"\s*(\$\s+)?{re.escape(program)}(\s|$)", text):
            continue
        words = shlex.split(text, comments=True)
        if words and words[0] == "$":
            words = words[1:]
        if words and words[0] == program:
            commands.append(shlex.join(words))
    return commands


def _option(argv: list[str], name: str) -> str | None:
    """The last value given to option ``name`` in ``argv`` (None if absent)."""
    value = None
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def why_not_runnable(argv: list[str]) -> str | None:
    """Why a command cannot run on this machine, or None."""
    if "--distributed" in argv:
        return "needs several hosts"
    for option in ("--dataset", "--public-dataset"):
        if (_option(argv, option) or "").split("/")[0] in TFDS_SOURCES:
            return "needs prepared tfds data"
    return None


def tiny(argv: list[str], output: Path) -> list[str]:
    """``argv`` (without the program name) shrunk, writing under ``output``."""
    command = argv[0]
    if _asks_help(argv) or command not in TINY:
        return argv
    extra = list(TINY[command])
    if command == "compare":
        names = (_option(argv, "--algorithms") or ",".join(DEFAULT_COMPARE)).split(",")
        extra += ["--algorithms", ",".join(names[:COMPARE_KEEP])]
    devices = _option(argv, "--devices")
    if devices is not None and devices.isdigit() and int(devices) > DEVICES:
        extra += ["--devices", str(DEVICES)]
    if command in ("run", "compare", "sweep"):
        extra += ["--output", str(output)]
    return [*argv, *extra]


def named_python_files(markdown: str) -> dict[str, str]:
    """The ``python`` blocks of ``markdown`` whose first line is ``# NAME.py``: the files a
    reader saves (``{NAME.py: source}``)."""
    blocks = re.findall(r"```python\n# ([\w.]+\.py)\n(.*?)```", markdown, flags=re.S)
    return {name: source for name, source in blocks}


def setup_commands(markdown: str) -> list[list[str]]:
    """The ``python NAME.py`` lines of the shell blocks (scripts a reader runs first)."""
    return [line.split() for line in re.findall(r"^python [\w.]+\.py$", markdown, flags=re.M)]


def toml_blocks(markdown: str) -> list[str]:
    """The fenced ``toml`` code blocks of ``markdown``."""
    return re.findall(r"```toml\n(.*?)```", markdown, flags=re.S)


def _cases(paths: list[Path], marks=()) -> list:
    cases = []
    for path in paths:
        for command in shell_commands(path.read_text()):
            cases.append(pytest.param(command, id=f"{path.name}: {command}",
                                      marks=marks))
    return cases


README_CASES = _cases([README])
PAGE_CASES = _cases(PAGES, marks=pytest.mark.slow)


def _argv(command: str) -> list[str]:
    """The arguments after the program name, without ``...`` placeholders."""
    return [word for word in shlex.split(command)[1:] if word != "..."]


def _asks_help(argv: list[str]) -> bool:
    return "--help" in argv or "-h" in argv


def _execute(command: str, workdir: Path, cache: Path):
    """Runs ``command`` shrunk, in ``workdir``, on ``DEVICES`` CPU devices.

    Returns:
      ``(completed process, the output directory it was given)``.
    """
    output = workdir / "output"  # fresh for every command
    text = README.read_text()
    for name, source in named_python_files(text).items():
        (workdir / name).write_text(source)
    config = _option(_argv(command), "--config")
    if config:
        # A config file of the repository (a page's grid) is copied; another one the README
        # names is the README's TOML example.
        target = workdir / config
        target.parent.mkdir(parents=True, exist_ok=True)
        shipped = ROOT / config
        target.write_text(shipped.read_text() if shipped.is_file()
                          else toml_blocks(README.read_text())[0])
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
           "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                      os.environ.get("PYTHONPATH")]))}
    dataset = _option(_argv(command), "--dataset") or ""
    if dataset.startswith(("leaf:", "tff:")):
        # The files the README says to fetch, in their published formats, at a tiny size.
        from natural_fixtures import write_leaf, write_tff

        root = workdir / _option(_argv(command), "--data-dir")
        name = dataset.split(":", 1)[1]
        if dataset.startswith("leaf:"):
            write_leaf(root, name, scale=5)
        else:
            write_tff(root, name, scale=5)
    if any("npz:" in word for word in _argv(command)):
        # The data a README script saves (make_data.py).
        for setup in setup_commands(text):
            done = subprocess.run([sys.executable, *setup[1:]], cwd=workdir, env=env,
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
            assert done.returncode == 0, f"{' '.join(setup)}: {done.stderr[-2000:]}"
    proc = subprocess.run(
        [sys.executable, "-m", "fedjax_sim.cli", *tiny(_argv(command), output)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc, output


@pytest.fixture(scope="module")
def started(request, tmp_path_factory):
    """The selected commands, started ``WORKERS`` at a time as soon as the module's first
    command test runs: ``{command: future of (process, output directory)}``.

    They share one persistent compilation cache, so a program that two commands compile
    alike (Local on the same split, say) is compiled once when they do not overlap.
    """
    cache = tmp_path_factory.mktemp("jax_cache")
    commands = [item.callspec.params["command"] for item in request.session.items
                if item.module is sys.modules[__name__] and hasattr(item, "callspec")
                and "command" in item.callspec.params]
    runnable = [c for c in dict.fromkeys(commands) if why_not_runnable(_argv(c)) is None]
    with ThreadPoolExecutor(WORKERS) as pool:
        yield {c: pool.submit(_execute, c, tmp_path_factory.mktemp("command"), cache)
               for c in runnable}


def check_command(command: str, started: dict) -> None:
    """``command``'s options exist; if it can run here, it exited 0 and wrote its output."""
    argv = _argv(command)
    # A plug-in's options exist once the command imports it: the run itself checks them.
    if not _asks_help(argv) and "--plugin" not in argv:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"the command line refuses {command!r}")
    reason = why_not_runnable(argv)
    if reason:
        pytest.skip(f"parsed only: {reason}")
    proc, output = started[command].result()
    assert proc.returncode == 0, (
        f"{command}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if _asks_help(argv):
        assert "usage: fedjax-sim" in proc.stdout
    elif argv[0] in ("run", "compare", "sweep"):
        assert any(output.rglob("summary.json")), f"{command} wrote no summary.json"


def test_readme_examples_are_complete():
    text = README.read_text()
    assert set(named_python_files(text)) >= {"make_data.py", "my_algo.py"}
    assert ["python", "make_data.py"] in setup_commands(text)
    assert any("--plugin my_algo" in c for c in shell_commands(text))


def test_readme_shows_commands():
    commands = shell_commands(README.read_text())
    assert {shlex.split(c)[1] for c in commands} >= {"run", "compare", "bench"}


def test_shell_commands_joins_lines_and_drops_comments():
    text = "\n".join([
        "```bash", "# a comment", "fedjax-sim run --algorithm fedper \\",
        "    --alpha 0.1   # trailing comment", "pip install -e .", "```",
        "```python", "fedjax-sim = 1", "```",
        "```", "$ fedjax-sim bench --model 'cnn'", "```",
    ])
    assert shell_commands(text) == ["fedjax-sim run --algorithm fedper --alpha 0.1",
                                    "fedjax-sim bench --model cnn"]


def test_tiny_overrides_win(tmp_path):
    args = build_parser().parse_args(tiny(
        ["compare", "--rounds", "30", "--seeds", "0,1,2", "--output", "runs/x"], tmp_path))
    assert (args.rounds, args.num_clients, args.seeds) == (2, 4, "0")
    assert args.algorithms == DEFAULT_COMPARE[0]
    assert args.output == str(tmp_path)
    args = build_parser().parse_args(tiny(["bench", "--model", "cnn", "--rounds", "5"],
                                          tmp_path))
    assert (args.model, args.rounds, args.num_clients, args.local_steps) == ("cnn", 1, 2, 1)
    assert tiny(["run", "--help"], tmp_path) == ["run", "--help"]


@pytest.mark.parametrize("command", README_CASES)
def test_readme_command_runs(command, started):
    check_command(command, started)


@pytest.mark.parametrize("command", PAGE_CASES)
def test_page_command_runs(command, started):
    check_command(command, started)


def test_readme_python_example_runs_after_the_command_line_example(tmp_path):
    """The "From Python" block, as printed, in a folder where the command-line example
    already filled runs/fedper (as a reader following the README has it)."""
    text = README.read_text()
    section = text[text.index("## From Python"):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert "output=" in block
    (tmp_path / "runs" / "fedper").mkdir(parents=True)
    (tmp_path / "runs" / "fedper" / "summary.json").write_text("{}")
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "fedper-python" / "summary.json").exists()


def test_every_toml_block_of_the_readme_reads(tmp_path):
    # Each config-file example parses: its keys, lists and tables (an algorithm's grid,
    # [tune]) as fedjax-sim reads them.
    from fedjax_sim import config

    # (pyproject.toml snippets aside)
    blocks = [b for b in toml_blocks(README.read_text()) if not b.startswith("[project")]
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        path = tmp_path / f"block{i}.toml"
        path.write_text(block)
        config.load_config(path)
        config.tune_table(config.read_toml(path), source=str(path))
    assert any("[tune]" in block for block in blocks)
