"""Bad input is refused with one clear line, before any data loads or anything compiles.

``CLI_CASES`` is the command-line battery (``experiments/bad_inputs.py`` runs it as
subprocesses); the rest checks the Python API (``algorithms.make``, ``runner.run`` /
``sweep``, ``data.make_federated_data``, ``bench.bench``) and the environment variables.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from fedjax_sim import algorithms, cli
from fedjax_sim.cli import main

ROOT = Path(__file__).resolve().parents[1]


class Case(NamedTuple):
    """One bad command line: ``argv`` (``{tmp}`` stands for a scratch folder holding the
    files of ``prepare_files``), a fragment the error line must hold, extra environment
    variables, and whether it only makes sense in a fresh process."""

    id: str
    argv: tuple[str, ...]
    expected: str
    env: tuple[tuple[str, str], ...] = ()
    fresh_process: bool = False


def _c(id_, argv, expected, env=(), fresh_process=False):
    return Case(id_, tuple(argv.split()) if isinstance(argv, str) else tuple(argv), expected,
                tuple(env), fresh_process)


CLI_CASES = [
    # -- run: float hyperparameters (infinity and NaN pass `v > 0`-style checks) --
    _c("run-lr-inf", "run --lr inf", "--lr must be a finite number > 0, got inf"),
    _c("run-lr-nan", "run --lr nan", "--lr must be a finite number > 0, got nan"),
    _c("run-lr-neg-inf", "run --lr=-inf", "--lr must be a finite number > 0, got -inf"),
    _c("run-lr-1e400", "run --lr 1e400", "--lr must be a finite number > 0, got inf"),
    _c("run-lr-zero", "run --lr 0", "--lr must be > 0, got 0.0"),
    _c("run-lr-text", "run --lr fast", "argument --lr: invalid float value: 'fast'"),
    _c("run-momentum-inf", "run --momentum inf", "--momentum must be a finite number in [0, 1)"),
    _c("run-momentum-one", "run --momentum 1", "--momentum must be in [0, 1), got 1.0"),
    _c("run-weight-decay-inf", "run --weight-decay inf",
       "--weight-decay must be a finite number >= 0, got inf"),
    _c("run-weight-decay-neg", "run --weight-decay=-1", "--weight-decay must be >= 0"),
    _c("run-join-ratio-nan", "run --join-ratio nan",
       "--join-ratio must be a finite number in (0, 1]"),
    _c("run-join-ratio-zero", "run --join-ratio 0", "--join-ratio must be in (0, 1]"),
    _c("run-ditto-lambda-inf", "run --algorithm ditto --ditto-lambda inf",
       "--ditto-lambda must be a finite number >= 0, got inf"),
    _c("run-apfl-alpha-nan", "run --algorithm apfl --apfl-alpha nan",
       "--apfl-alpha must be a finite number in [0, 1]"),
    _c("run-ig-ratio-nan", "run --algorithm fedobp --ig-ratio nan",
       "--ig-ratio must be a finite number in [0, 1]"),
    _c("run-ema-alpha-inf", "run --algorithm fedobp --ema-alpha inf",
       "--ema-alpha must be a finite number in [0, 1)"),
    _c("run-dsfl-temperature-inf", "run --algorithm dsfl --dsfl-temperature inf",
       "--dsfl-temperature must be a finite number > 0, got inf"),
    _c("run-distill-lr-nan", "run --algorithm dsfl --distill-lr nan",
       "--distill-lr must be a finite number > 0, got nan"),
    _c("run-fccl-lambda-neg-inf", "run --algorithm fccl --fccl-lambda=-inf",
       "--fccl-lambda must be a finite number >= 0, got -inf"),
    _c("run-feddf-temperature-nan", "run --algorithm feddf --feddf-temperature nan",
       "--feddf-temperature must be a finite number > 0, got nan"),
    _c("run-feddf-lr-inf", "run --algorithm feddf --feddf-lr inf",
       "--feddf-lr must be a finite number > 0, got inf"),
    # -- run: integer hyperparameters --
    _c("run-local-epochs-zero", "run --local-epochs 0",
       "--local-epochs must be a positive integer"),
    _c("run-local-epochs-huge", "run --local-epochs 99999999999",
       "--local-epochs must be a positive integer, at most 2**31 - 1"),
    _c("run-local-steps-zero", "run --local-steps 0", "--local-steps must be a positive integer"),
    _c("run-batch-size-zero", "run --batch-size 0", "--batch-size must be a positive integer"),
    _c("run-chunk-size-zero", "run --chunk-size 0", "--chunk-size must be a positive integer"),
    _c("run-apfl-adaptive-text", "run --algorithm apfl --apfl-adaptive maybe",
       "argument --apfl-adaptive: expected true or false"),
    _c("run-hparam-not-taken", "run --algorithm fedavg --body-epochs 2",
       "--body-epochs does not apply to fedavg"),
    # -- run: data options --
    _c("run-alpha-inf", "run --alpha inf", "--alpha must be a finite number > 0, got inf"),
    _c("run-alpha-nan", "run --alpha nan", "--alpha must be a finite number > 0, got nan"),
    _c("run-alpha-zero", "run --alpha 0", "--alpha must be > 0, got 0.0"),
    _c("run-test-ratio-nan", "run --test-ratio nan",
       "--test-ratio must be a finite number in (0, 1), got nan"),
    _c("run-test-ratio-one", "run --test-ratio 1", "--test-ratio must be in (0, 1), got 1.0"),
    _c("run-public-fraction-inf", "run --algorithm dsfl --public-fraction inf",
       "--public-fraction must be a finite number in (0, 1), got inf"),
    _c("run-public-fraction-zero", "run --algorithm dsfl --public-fraction 0",
       "--public-fraction must be in (0, 1), got 0.0"),
    _c("run-public-val-fraction-nan", "run --public-val-fraction nan",
       "--public-val-fraction must be a finite number in [0, 1), got nan"),
    _c("run-public-val-fraction-one", "run --public-val-fraction 1",
       "--public-val-fraction must be in [0, 1), got 1.0"),
    _c("run-public-fractions-sum", "run --algorithm dsfl --public-fraction 0.6 "
       "--public-val-fraction 0.4", "--public-fraction + --public-val-fraction must be < 1"),
    _c("run-public-size-zero", "run --algorithm dsfl --public-dataset mnist1d --public-size 0",
       "--public-size must be a positive integer, got 0"),
    _c("run-public-size-alone", "run --algorithm dsfl --public-size 10",
       "--public-size applies only with --public-dataset"),
    _c("run-public-dataset-unknown", "run --algorithm dsfl --public-dataset imagenet",
       "--public-dataset must be one of"),
    _c("run-num-clients-zero", "run --num-clients 0", "--num-clients must be a positive integer"),
    _c("run-min-samples-one", "run --min-samples 1", "--min-samples must be an integer >= 2"),
    _c("run-shards-zero", "run --shards-per-client 0",
       "--shards-per-client must be a positive integer"),
    _c("run-classes-zero", "run --classes-per-client 0",
       "--classes-per-client must be a positive integer"),
    _c("run-dataset-unknown", "run --dataset imagenet", "--dataset must be one of"),
    _c("run-partition-unknown", "run --partition zipf", "--partition must be one of"),
    _c("run-model-unknown", "run --model vit", "--model must be one of auto, mlp"),
    _c("run-algorithm-unknown", "run --algorithm fedsgd", "--algorithm must be one of"),
    _c("run-architectures-empty-entry", "run --algorithm fedmd --architectures mlp,,cnn",
       "--architectures has an empty entry (number 2)"),
    _c("run-architectures-zero-width", "run --algorithm fedmd --architectures mlp:0",
       "positive widths"),
    _c("run-architectures-unknown", "run --algorithm fedmd --architectures vit",
       "--architectures: unknown model 'vit'"),
    _c("run-architectures-not-taken", "run --algorithm fedavg --architectures mlp",
       "--architectures applies to fedmd and fccl"),
    # -- run: loop, seeds and devices --
    _c("run-rounds-zero", "run --rounds 0", "--rounds must be an integer >= 1, got 0"),
    _c("run-rounds-text", "run --rounds ten", "argument --rounds: invalid int value: 'ten'"),
    _c("run-eval-every-zero", "run --eval-every 0", "--eval-every must be an integer >= 1"),
    _c("run-rounds-per-call-zero", "run --rounds-per-call 0",
       "--rounds-per-call must be a positive integer"),
    _c("run-devices-zero", "run --devices 0", "--devices must be a positive integer"),
    _c("run-seed-negative", "run --seed=-1", "--seed must be an integer >= 0 and < 2**32"),
    _c("run-seed-2-32", "run --seed 4294967296", "--seed must be an integer >= 0 and < 2**32"),
    _c("run-cpu-devices-zero", "run --cpu-devices 0",
       "--cpu-devices must be 'auto' or an integer >= 1"),
    _c("run-coordinator-no-port", "run --distributed --coordinator head",
       "--coordinator must be host:port"),
    _c("run-process-id-range", "run --distributed --num-processes 2 --process-id 2",
       "--process-id must be an integer in [0, 1], got 2"),
    _c("run-coordinator-without-distributed", "run --coordinator head:1234",
       "need --distributed"),
    # -- run: list options --
    _c("run-seeds-empty-entry", "run --seeds 0,,1", "--seeds has an empty entry (number 2)"),
    _c("run-seeds-empty", ["run", "--seeds", ""], "--seeds must name at least one value"),
    _c("run-seeds-text", "run --seeds 0,x", "--seeds entry 2 must be an integer >= 0"),
    _c("run-seeds-1e400", "run --seeds 1e400", "--seeds entry 1 must be an integer >= 0"),
    _c("run-seeds-negative", "run --seeds 0,-1", "--seeds entry 2 must be an integer >= 0"),
    _c("run-seeds-repeated", "run --seeds 0,0", "--seeds lists 0 twice"),
    _c("run-sweep-lr-negative", "run --sweep-lr 0.1,-1",
       "--sweep-lr entry 2 must be > 0, got -1.0"),
    _c("run-sweep-lr-inf", "run --sweep-lr 0.1,inf",
       "--sweep-lr entry 2 must be a finite number > 0, got inf"),
    _c("run-sweep-lr-nan", "run --sweep-lr nan",
       "--sweep-lr entry 1 must be a finite number > 0, got nan"),
    _c("run-sweep-lr-1e400", "run --sweep-lr 1e400",
       "--sweep-lr entry 1 must be a finite number > 0, got inf"),
    _c("run-sweep-lr-malformed", "run --sweep-lr 0,,x", "--sweep-lr has an empty entry (number 2)"),
    _c("run-sweep-lr-text", "run --sweep-lr 0.1,x", "--sweep-lr entry 2 must be a finite number"),
    _c("run-sweep-lr-commas", "run --sweep-lr ,", "--sweep-lr has an empty entry (number 1)"),
    _c("run-sweep-lr-with-lr", "run --sweep-lr 0.1,0.2 --lr 0.1",
       "give --lr or --sweep-lr, not both"),
    _c("run-sweep-public", "run --algorithm dsfl --seeds 0,1", "--seeds/--sweep-lr take no"),
    # -- run: files --
    _c("run-partition-file-missing", "run --partition-file {tmp}/missing.json",
       "--partition-file {tmp}/missing.json: no such file"),
    _c("run-partition-file-dir", "run --partition-file {tmp}/dir",
       "--partition-file {tmp}/dir: is a directory"),
    _c("run-partition-file-malformed", "run --partition-file {tmp}/bad.json",
       "--partition-file {tmp}/bad.json is not valid JSON"),
    _c("run-partition-file-binary", "run --partition-file {tmp}/binary.json",
       "--partition-file {tmp}/binary.json is not valid JSON"),
    _c("run-partition-file-no-clients", "run --partition-file {tmp}/noclients.json",
       "--partition-file {tmp}/noclients.json has no 'clients' list"),
    _c("run-output-is-file", "run --output {tmp}/afile", "--output {tmp}/afile: is a file"),
    _c("run-output-under-file", "run --output {tmp}/afile/run",
       "cannot create --output {tmp}/afile/run: {tmp}/afile is not a directory"),
    _c("run-save-partition-dir", "run --save-partition {tmp}/dir",
       "--save-partition {tmp}/dir: is a directory"),
    _c("run-save-partition-under-file", "run --save-partition {tmp}/afile/split.json",
       "cannot create --save-partition {tmp}/afile/split.json"),
    _c("run-data-dir-missing", "run --dataset mnist --data-dir {tmp}/missing",
       "--data-dir {tmp}/missing: no such directory"),
    _c("run-data-dir-file", "run --dataset mnist --data-dir {tmp}/afile",
       "--data-dir {tmp}/afile: is a file"),
    _c("run-tfds-not-prepared", "run --dataset mnist --data-dir {tmp}/dir",
       "tfds data set 'mnist' is not prepared under {tmp}/dir"),
    # -- run: environment --
    _c("env-strategy-unknown", "run", "FEDJAX_SIM_STRATEGY must be one of vmap",
       env=[("FEDJAX_SIM_STRATEGY", "warp")]),
    _c("env-strategy-chunk-zero", "run", "FEDJAX_SIM_STRATEGY must be one of",
       env=[("FEDJAX_SIM_STRATEGY", "chunked:0")]),
    _c("env-strategy-chunk-text", "bench", "FEDJAX_SIM_STRATEGY must be one of",
       env=[("FEDJAX_SIM_STRATEGY", "chunked:x")]),
    _c("env-xla-count-text", "run",
       "XLA_FLAGS: --xla_force_host_platform_device_count must be an integer >= 1",
       env=[("XLA_FLAGS", "--xla_force_host_platform_device_count=abc")]),
    _c("env-xla-count-zero", "bench",
       "XLA_FLAGS: --xla_force_host_platform_device_count must be an integer >= 1",
       env=[("XLA_FLAGS", "--xla_force_host_platform_device_count=0")]),
    _c("env-jax-platforms", "bench", "Unable to initialize backend 'bogus'",
       env=[("JAX_PLATFORMS", "bogus")], fresh_process=True),
    # -- compare --
    _c("compare-algorithms-unknown", "compare --algorithms fedavg,fedsgd,foo",
       "--algorithms: unknown 'fedsgd', 'foo'; valid: fedavg"),
    _c("compare-algorithms-empty", ["compare", "--algorithms", ""],
       "--algorithms must name at least one value"),
    _c("compare-algorithms-empty-entry", "compare --algorithms fedavg,,local",
       "--algorithms has an empty entry (number 2)"),
    _c("compare-algorithms-repeated", "compare --algorithms fedavg,fedavg",
       "--algorithms lists fedavg twice"),
    _c("compare-seeds-malformed", "compare --seeds 0,,x", "--seeds has an empty entry"),
    _c("compare-seeds-negative", "compare --seeds=-1", "--seeds entry 1 must be an integer >= 0"),
    _c("compare-seeds-huge", "compare --seeds 0,4294967296", "--seeds entry 2 must be"),
    _c("compare-lr-inf", "compare --lr inf", "--lr must be a finite number > 0, got inf"),
    _c("compare-alpha-nan", "compare --alpha nan", "--alpha must be a finite number > 0"),
    _c("compare-rounds-zero", "compare --rounds 0", "--rounds must be an integer >= 1"),
    _c("compare-output-is-file", "compare --output {tmp}/afile",
       "--output {tmp}/afile: is a file"),
    _c("compare-architectures", "compare --architectures mlp",
       "--architectures works with `fedjax-sim run`"),
    # -- bench --
    _c("bench-num-clients-zero", "bench --num-clients 0", "--num-clients must be a positive"),
    _c("bench-local-steps-zero", "bench --local-steps 0", "--local-steps must be a positive"),
    _c("bench-batch-size-zero", "bench --batch-size 0", "--batch-size must be a positive"),
    _c("bench-batch-size-huge", "bench --batch-size 4294967296",
       "--batch-size must be a positive integer, at most 2**31 - 1"),
    _c("bench-rounds-zero", "bench --rounds 0", "--rounds must be a positive integer"),
    _c("bench-samples-zero", "bench --samples-per-client 0",
       "--samples-per-client must be a positive integer"),
    _c("bench-rounds-per-call-zero", "bench --rounds-per-call 0",
       "--rounds-per-call must be a positive integer"),
    _c("bench-seed-huge", "bench --seed 4294967296", "--seed must be an integer >= 0 and < 2**32"),
    _c("bench-devices-zero", "bench --devices 0", "--devices must be a positive integer"),
    _c("bench-chunk-zero", "bench --chunk-size 0", "--chunk-size entry 1 must be a positive"),
    _c("bench-chunk-malformed", "bench --client-strategy all --chunk-size 4,,x",
       "--chunk-size has an empty entry (number 2)"),
    _c("bench-chunk-text", "bench --client-strategy all --chunk-size 4,x",
       "--chunk-size entry 2 must be a positive integer, got 'x'"),
    _c("bench-chunk-empty", ["bench", "--chunk-size", ""], "--chunk-size must name at least one"),
    _c("bench-chunks-without-all", "bench --chunk-size 4,8",
       "--chunk-size takes several sizes only with --client-strategy all"),
    _c("bench-strategy-unknown", "bench --client-strategy warp",
       "--client-strategy must be one of auto, vmap, sequential, chunked, all"),
    _c("bench-algorithm-public", "bench --algorithm dsfl", "--algorithm must be one of fedavg"),
]

# Run as real processes too: they must end with one line, before anything compiles.
SUBPROCESS_IDS = [
    "run-lr-inf", "run-sweep-lr-negative", "run-seeds-empty-entry", "run-partition-file-dir",
    "run-output-is-file", "compare-algorithms-unknown", "bench-chunk-malformed",
    "env-strategy-unknown", "env-xla-count-text", "env-jax-platforms",
]


def prepare_files(tmp: Path) -> None:
    """The files the ``{tmp}`` cases point at."""
    (tmp / "dir").mkdir(parents=True, exist_ok=True)
    (tmp / "afile").write_text("not a directory\n")
    (tmp / "bad.json").write_text('{"clients": [\n')
    (tmp / "binary.json").write_bytes(b"\xff\xfe\x00\x81")
    (tmp / "noclients.json").write_text(json.dumps({"dataset": "digits"}))


def command(case: Case, tmp: Path) -> list[str]:
    """The full argument list of ``case``: ``{tmp}`` filled in, a scratch ``--output``
    (which must never be created) and no progress bar."""
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    if argv[0] in ("run", "compare"):
        if not any(a.startswith("--output") for a in argv):
            argv += ["--output", str(tmp / "out")]
        argv.append("--no-progress")
    return argv


def expected(case: Case, tmp: Path) -> str:
    return case.expected.replace("{tmp}", str(tmp))


class _Reached(Exception):
    """Raised by the stand-ins of the loaders and loops: bad input got that far."""


def _reached(*_args, **_kwargs):
    raise _Reached("bad input was not refused before loading or compiling")


@pytest.fixture
def no_loading(monkeypatch):
    """Loading data, drawing the benchmark's data and placing a run's state on the devices
    raise ``_Reached``: every refusal must come before them."""
    import fedjax_sim.bench
    import fedjax_sim.data
    import fedjax_sim.data.public
    import fedjax_sim.runner

    for module, name in ((fedjax_sim.data, "load_source"),
                         (fedjax_sim.data.public, "load_source"),
                         (fedjax_sim.runner, "place"), (fedjax_sim.runner, "to_device"),
                         (fedjax_sim.runner, "_config_mesh"),
                         (fedjax_sim.bench, "random_data")):
        monkeypatch.setattr(module, name, _reached)


@pytest.fixture
def no_work(monkeypatch, no_loading):
    """``no_loading``, and the run loops and the benchmark themselves raise too."""
    import fedjax_sim.bench
    import fedjax_sim.runner

    for module, name in ((fedjax_sim.runner, "run"), (fedjax_sim.runner, "sweep"),
                         (fedjax_sim.bench, "bench")):
        monkeypatch.setattr(module, name, _reached)


def _one_line_error(err: str, command_name: str) -> str:
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    prefix = f"fedjax-sim {command_name}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix):]


@pytest.mark.parametrize("case", [c for c in CLI_CASES if not c.fresh_process],
                         ids=lambda c: c.id)
def test_cli_refuses_in_one_line(case, tmp_path, capsys, monkeypatch, no_work):
    prepare_files(tmp_path)
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        main(command(case, tmp_path))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    message = _one_line_error(captured.err, case.argv[0])
    assert expected(case, tmp_path) in message
    assert captured.out == ""
    assert not (tmp_path / "out").exists()  # the output folder is never even created


_elapsed: list[float] = []


@pytest.fixture(scope="module")
def report_elapsed():
    yield
    if _elapsed:
        print(f"\n{len(_elapsed)} bad command lines as processes: max {max(_elapsed):.2f} s")


def run_process(argv: list[str], env: dict[str, str] | None = None,
                timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m fedjax_sim.cli ARGV`` on the CPU from the repository root; returns the
    process and its wall time."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    full_env.pop("XLA_FLAGS", None)
    full_env.pop("FEDJAX_SIM_STRATEGY", None)
    full_env.update(env or {})
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedjax_sim.cli", *argv], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - tic


@pytest.mark.parametrize("case_id", SUBPROCESS_IDS)
def test_cli_process_ends_with_one_line(case_id, tmp_path, report_elapsed):
    case = next(c for c in CLI_CASES if c.id == case_id)
    prepare_files(tmp_path)
    proc, elapsed = run_process(command(case, tmp_path), dict(case.env))
    _elapsed.append(elapsed)
    print(f"{case_id}: {elapsed:.2f} s")
    assert proc.returncode == 2, proc.stderr
    assert expected(case, tmp_path) in _one_line_error(proc.stderr, case.argv[0])
    # Nothing ran: no output folder, no metrics.
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_ctrl_c_ends_a_run_with_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedjax_sim.cli", "run", "--num-clients", "3", "--rounds",
         "100000", "--eval-every", "100000", "--local-epochs", "1", "--no-progress",
         "--output", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # metrics.jsonl appears just before the round first compiles: main() is running.
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Ctrl-C while the round compiles: the round finishes, is saved, and the run stops.
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fedjax-sim run: stopped at round ")


# ---- main(): how errors become one line ---------------------------------------------------


def test_interrupt_exits_130_without_traceback(monkeypatch, capsys, tmp_path):
    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_run", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "fedjax-sim run: interrupted\n"


@pytest.mark.parametrize("error, expected", [
    (PermissionError(13, "Permission denied", "{out}/metrics.jsonl"),
     "--output {out}: {out}/metrics.jsonl: Permission denied"),
    (IsADirectoryError(21, "Is a directory", "{out}"), "--output {out}: Is a directory"),
    (FileNotFoundError(2, "No such file or directory", "/elsewhere/x"),
     "/elsewhere/x: No such file or directory"),
    (NotADirectoryError(20, "Not a directory", "{out}/sub"),
     "--output {out}: {out}/sub: Not a directory"),
    (FileNotFoundError("cannot read tfds data set 'mnist'\nPrepare it first."),
     "cannot read tfds data set 'mnist' Prepare it first."),
    (json.JSONDecodeError("Expecting value", "{", 1), "Expecting value: line 1 column 2"),
    (MemoryError("Unable to allocate 9.0 TiB"), "out of memory: Unable to allocate 9.0 TiB"),
], ids=["permission", "is-a-directory", "other-file", "not-a-directory", "multi-line",
        "json", "memory"])
def test_foreseeable_errors_become_one_line(error, expected, monkeypatch, capsys, tmp_path):
    out = str(tmp_path / "out")
    if isinstance(error, OSError) and error.filename is not None:
        error.filename = error.filename.replace("{out}", out)

    def failing(_args):
        raise error

    monkeypatch.setattr(cli, "cmd_run", failing)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--output", out])
    assert exit_info.value.code == 2
    assert expected.replace("{out}", out) in _one_line_error(capsys.readouterr().err, "run")


@pytest.mark.parametrize("error", [TypeError("a bug"), KeyError("a bug"),
                                   RuntimeError("a bug")], ids=lambda e: type(e).__name__)
def test_bugs_keep_their_traceback(error, monkeypatch, tmp_path):
    def failing(_args):
        raise error

    monkeypatch.setattr(cli, "cmd_run", failing)
    with pytest.raises(type(error), match="a bug"):
        main(["run", "--output", str(tmp_path / "out")])


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--lr"])
    assert exit_info.value.code == 2
    assert "argument --lr: expected one argument" in _one_line_error(
        capsys.readouterr().err, "run")
    with pytest.raises(SystemExit):
        main(["train"])
    err = capsys.readouterr().err
    assert err.startswith("fedjax-sim: error: argument command: invalid choice: 'train'")
    assert err.count("\n") == 1


# ---- the Python API ------------------------------------------------------------------------


def _float_specs():
    seen = {}
    for name in algorithms.ALGORITHMS + algorithms.DISTILLATION:
        for spec in algorithms.hparam_specs(name):
            if spec.kind is float and spec.name not in seen:
                seen[spec.name] = (name, spec)
    return list(seen.values())


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("name, spec", _float_specs(), ids=lambda x: getattr(x, "name", x))
def test_make_refuses_non_finite_floats(name, spec, value):
    from fedjax_sim.models import make_model

    model = make_model("mlp", (6,), 4)
    with pytest.raises(ValueError, match=f"^{spec.name} must be a finite number "):
        algorithms.make(name, model, **{spec.name: value})


@pytest.mark.parametrize("kw, message", [
    ({"local_epochs": 2**31}, "local_epochs must be a positive integer, at most 2**31 - 1"),
    ({"batch_size": True}, "batch_size must be a positive integer (int), got True"),
    ({"lr": "0.1"}, "lr must be > 0 (float)"),
    ({"momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
], ids=["int-huge", "int-bool", "float-text", "range"])
def test_make_refuses_bad_types_and_ranges(kw, message):
    from fedjax_sim.models import make_model

    with pytest.raises(ValueError) as info:
        algorithms.make("fedavg", make_model("mlp", (6,), 4), **kw)
    assert message in str(info.value)


@pytest.fixture
def fedavg(small_data):
    from fedjax_sim.models import make_model

    model = make_model("mlp", small_data.input_shape, small_data.num_classes)
    return algorithms.make("fedavg", model, local_epochs=1), model, small_data


@pytest.mark.parametrize("kw, message", [
    ({"seed": -1}, "seed must be an integer >= 0 and < 2**32, got -1"),
    ({"seed": 2**32}, "seed must be an integer >= 0 and < 2**32"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"rounds": 0}, "rounds must be an integer >= 1"),
    ({"eval_every": 0}, "eval_every must be an integer >= 1"),
    ({"rounds_per_call": 0}, "rounds_per_call must be a positive integer"),
    ({"devices": 0}, "devices must be a positive integer"),
], ids=["seed-negative", "seed-2-32", "seed-float", "rounds", "eval-every", "rounds-per-call",
        "devices"])
def test_run_refuses_before_placing(fedavg, kw, message, no_loading):
    from fedjax_sim import runner

    algorithm, _, data = fedavg
    with pytest.raises(ValueError) as info:
        runner.run(algorithm, data, **{"rounds": 1, **kw})
    assert message in str(info.value)


def test_run_refuses_bad_strategy_variable(fedavg, monkeypatch, no_loading):
    from fedjax_sim import runner

    algorithm, _, data = fedavg
    monkeypatch.setenv("FEDJAX_SIM_STRATEGY", "chunked:-2")
    with pytest.raises(ValueError, match="FEDJAX_SIM_STRATEGY must be one of"):
        runner.run(algorithm, data, rounds=1)


@pytest.mark.parametrize("kw, message", [
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"seeds": "0,1"}, "seeds must be a non-empty list"),
    ({"seeds": [0, -1]}, "seeds[1] must be an integer >= 0 and < 2**32, got -1"),
    ({"seeds": [2**32]}, "seeds[0] must be an integer >= 0 and < 2**32"),
    ({"seeds": [0, 0]}, "seeds lists 0 twice"),
    ({"lrs": [0.1, -1.0]}, "lrs[1] must be > 0, got -1.0"),
    ({"lrs": [math.inf]}, "lrs[0] must be a finite number > 0, got inf"),
    ({"lrs": [0.1, math.nan]}, "lrs[1] must be a finite number > 0, got nan"),
    ({"lrs": []}, "lrs must be a non-empty list"),
    ({"lrs": [0.1, 0.1]}, "lrs lists 0.1 twice"),
    ({"hparams": {"lr": math.inf}}, "lr must be a finite number > 0, got inf"),
    ({"rounds_per_call": 0}, "rounds_per_call must be a positive integer"),
    ({"devices": 0}, "devices must be a positive integer"),
], ids=["seeds-empty", "seeds-text", "seed-negative", "seed-2-32", "seeds-repeated",
        "lr-negative", "lr-inf", "lr-nan", "lrs-empty", "lrs-repeated", "hparam-lr-inf",
        "rounds-per-call", "devices"])
def test_sweep_refuses_before_compiling(fedavg, kw, message, no_loading):
    from fedjax_sim import runner

    _, model, data = fedavg
    with pytest.raises(ValueError) as info:
        runner.sweep("fedavg", model, data, **{"seeds": [0], "rounds": 1, **kw})
    assert message in str(info.value)


@pytest.mark.parametrize("kw, message", [
    ({"alpha": math.inf}, "alpha must be a finite number > 0, got inf"),
    ({"alpha": -math.inf}, "alpha must be a finite number > 0, got -inf"),
    ({"alpha": math.nan}, "alpha must be a finite number > 0, got nan"),
    ({"alpha": 0.0}, "alpha must be > 0, got 0.0"),
    ({"test_ratio": math.inf}, "test_ratio must be a finite number in (0, 1), got inf"),
    ({"test_ratio": math.nan}, "test_ratio must be a finite number in (0, 1), got nan"),
    ({"test_ratio": np.float32(1.0)}, "test_ratio must be in (0, 1)"),
    ({"seed": 2**32}, "seed must be an integer >= 0 and < 2**32"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"num_clients": 0}, "num_clients must be a positive integer"),
    ({"min_samples": 1}, "min_samples must be an integer >= 2"),
    ({"partition_file": "{tmp}/missing.json"}, "partition_file {tmp}/missing.json: no such file"),
    ({"partition_file": "{tmp}/dir"}, "partition_file {tmp}/dir: is a directory"),
    ({"partition_file": "{tmp}/bad.json"}, "partition_file {tmp}/bad.json is not valid JSON"),
    ({"partition_file": "{tmp}/noclients.json"}, "has no 'clients' list"),
], ids=["alpha-inf", "alpha-neg-inf", "alpha-nan", "alpha-zero", "test-ratio-inf",
        "test-ratio-nan", "test-ratio-one", "seed-2-32", "seed-negative", "num-clients",
        "min-samples", "partition-file-missing", "partition-file-dir", "partition-file-json",
        "partition-file-no-clients"])
def test_make_federated_data_refuses_before_loading(kw, message, tmp_path, no_loading):
    from fedjax_sim.data import make_federated_data

    prepare_files(tmp_path)
    kw = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v
          for k, v in kw.items()}
    with pytest.raises(ValueError) as info:
        make_federated_data("digits", **kw)
    assert message.replace("{tmp}", str(tmp_path)) in str(info.value)


@pytest.mark.parametrize("kw, message", [
    ({"public_fraction": math.nan}, "public_fraction must be a finite number in (0, 1)"),
    ({"public_fraction": math.inf}, "public_fraction must be a finite number in (0, 1)"),
    ({"public_fraction": 0.2, "val_fraction": math.inf},
     "val_fraction must be a finite number in [0, 1)"),
    ({"public_fraction": 0.2, "val_fraction": -0.1}, "val_fraction must be in [0, 1)"),
    ({"public_dataset": "mnist1d", "public_size": 0}, "public_size must be a positive integer"),
    ({"public_fraction": 0.2, "alpha": math.nan}, "alpha must be a finite number > 0"),
], ids=["fraction-nan", "fraction-inf", "val-inf", "val-negative", "size-zero", "alpha-nan"])
def test_public_data_refuses_before_loading(kw, message, no_loading):
    from fedjax_sim.data.public import make_federated_data_with_public

    with pytest.raises(ValueError) as info:
        make_federated_data_with_public("digits", **kw)
    assert message in str(info.value)


@pytest.mark.parametrize("kw, message", [
    ({"num_clients": 0}, "num_clients must be a positive integer"),
    ({"samples_per_client": -5}, "samples_per_client must be a positive integer"),
    ({"seed": 2**32}, "seed must be an integer >= 0 and < 2**32"),
    ({"chunk_size": 0}, "chunk_size must be a positive integer"),
    ({"client_strategy": "warp"}, "client_strategy must be one of"),
    ({"algorithm": "dsfl"}, "bench times algorithms without public data"),
    ({"devices": 0}, "devices must be a positive integer"),
], ids=["num-clients", "samples", "seed", "chunk-size", "strategy", "public", "devices"])
def test_bench_refuses_before_drawing_data(kw, message, no_loading):
    import fedjax_sim.bench

    with pytest.raises(ValueError) as info:
        fedjax_sim.bench.bench(**kw)
    assert message in str(info.value)


# ---- environment variables -----------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ("", None), ("vmap", ("vmap", 8)), ("chunked:4", ("chunked", 4)),
    (" sequential ", ("sequential", 8)),
])
def test_strategy_variable_accepted(value, expected, monkeypatch):
    from fedjax_sim.core.cohort import strategy_override

    monkeypatch.setenv("FEDJAX_SIM_STRATEGY", value)
    assert strategy_override() == expected


@pytest.mark.parametrize("value", ["warp", "auto", "chunked:0", "chunked:-1", "chunked:x",
                                   "chunked:", "vmap:4:4"])
def test_strategy_variable_refused(value, monkeypatch):
    from fedjax_sim.core import cohort

    monkeypatch.setenv("FEDJAX_SIM_STRATEGY", value)
    with pytest.raises(ValueError, match="FEDJAX_SIM_STRATEGY must be one of"):
        cohort.strategy_override()
    with pytest.raises(ValueError, match="FEDJAX_SIM_STRATEGY"):
        cohort.resolve("auto")


@pytest.mark.parametrize("flags, expected", [
    ("", None), ("--xla_cpu_enable_fast_math=false", None),
    ("--xla_force_host_platform_device_count=4", 4),
    ("--xla_force_host_platform_device_count=2 --xla_force_host_platform_device_count=3", 3),
])
def test_forced_device_count_accepted(flags, expected, monkeypatch):
    from fedjax_sim.platform import forced_device_count

    monkeypatch.setenv("XLA_FLAGS", flags)
    assert forced_device_count() == expected


@pytest.mark.parametrize("flags", ["--xla_force_host_platform_device_count=abc",
                                   "--xla_force_host_platform_device_count=0",
                                   "--xla_force_host_platform_device_count=-2",
                                   "--xla_force_host_platform_device_count"])
def test_forced_device_count_refused(flags, monkeypatch):
    from fedjax_sim.platform import check_environment, configure_cpu_devices

    monkeypatch.setenv("XLA_FLAGS", flags)
    with pytest.raises(ValueError, match="XLA_FLAGS: --xla_force_host_platform_device_count"):
        check_environment()
    with pytest.raises(ValueError, match="XLA_FLAGS"):
        configure_cpu_devices("auto")
