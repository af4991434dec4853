"""Runs that never crash, lie or lose work: every algorithm on two CPU devices with sparse
evaluation, divergence, run folders, checked resume, kill -9 and signals, memory checks."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_federated

from fedjax_sim import algorithms, safety
from fedjax_sim.cli import main
from fedjax_sim.models import make_model
from fedjax_sim.rundir import RunDir
from fedjax_sim.runner import ResumeError, run

TINY = ["--num-clients", "4", "--rounds", "2", "--eval-every", "2", "--local-epochs", "1",
        "--no-progress"]
TWO_DEVICES = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _cli(args: list[str], env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedjax_sim.cli", *args],
                          capture_output=True, text=True, env=env or TWO_DEVICES,
                          timeout=timeout)


def _records(folder: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _algorithms_on_two_devices_with_sparse_evaluation(tmp_path, names):
    """--eval-every equal to --rounds (rounds back to back, no host read in between) on
    two forced CPU devices, in one process (FedPer with --compare-local, whose Local
    reference follows the same schedule)."""
    script = textwrap.dedent(f"""
        import json, sys
        from fedjax_sim.cli import main
        import jax
        assert len(jax.devices()) == 2
        for name in {list(names)!r}:
            main(["run", "--algorithm", name, "--output", {str(tmp_path)!r} + "/" + name,
                  "--num-clients", "4", "--rounds", "3", "--eval-every", "3",
                  "--local-epochs", "1", "--no-progress",
                  *(["--compare-local"] if name == "fedper" else [])])
        print(json.dumps({{"done": True}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=TWO_DEVICES, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in names:
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["devices"] == 2, name
        assert [r["round"] for r in _records(tmp_path / name)] == [3]


# The check itself, over every algorithm: tests/test_every_algorithm_on_two_devices.py.


def test_divergence_stops_at_the_round_and_keeps_what_was_written(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--lr", "1e3", "--output", str(out), "--num-clients", "4", "--rounds",
              "4", "--eval-every", "1", "--local-epochs", "1", "--no-progress"])
    assert exit_info.value.code == safety.EXIT_DIVERGED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged at round" in err[0] and "--lr" in err[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and "accuracy" not in summary
    assert (out / "config.json").exists()


def test_divergence_api_names_round_and_clients_and_warn_goes_on():
    data = random_federated()
    model = make_model("mlp", data.input_shape, data.num_classes)
    algorithm = algorithms.make("fedper", model, lr=1e30, local_epochs=1)
    with pytest.raises(safety.DivergedError) as error:
        run(algorithm, data, rounds=3, progress=False)
    assert error.value.round >= 1 and error.value.clients
    assert f"round {error.value.round}" in str(error.value)
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = run(algorithm, data, rounds=3, progress=False, on_divergence="warn")
    assert result.summary["status"] == "diverged"
    assert result.summary["diverged"]["round"] == error.value.round


def test_output_folders_are_fresh_refused_or_overwritten(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["run", *TINY])
    (first,) = (tmp_path / "runs").iterdir()
    assert first.name.startswith("fedavg-digits-")
    config = json.loads((first / "config.json").read_text())
    assert config["options"]["alpha"] == 0.1 and config["identity"]["partition"] == "dirichlet"
    assert config["environment"]["jax"] and config["environment"]["command"]
    record = _records(first)[0]
    assert (record["algorithm"], record["dataset"], record["seed"]) == ("fedavg", "digits", 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *TINY, "--output", str(first)])
    assert exit_info.value.code == 2 and "not empty" in capsys.readouterr().err
    main(["run", *TINY, "--output", str(first), "--overwrite", "--seed", "1"])
    assert _records(first)[0]["seed"] == 1
    # --overwrite never empties a folder that holds something else.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        main(["run", *TINY, "--output", str(other), "--overwrite"])
    assert (other / "notes.txt").read_text() == "keep"


def test_a_second_process_is_kept_out_of_a_folder_in_use(tmp_path, capsys):
    out = tmp_path / "busy"
    with RunDir(out):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", *TINY, "--output", str(out), "--overwrite"])
        assert exit_info.value.code == 2
        assert "in use by fedjax-sim process" in capsys.readouterr().err
    main(["run", *TINY, "--output", str(out), "--overwrite"])


def test_resume_refuses_other_settings_missing_and_torn_files(tmp_path, capsys):
    out = tmp_path / "run"
    main(["run", *TINY, "--output", str(out), "--checkpoint-every", "1"])
    capsys.readouterr()
    for extra, named in ((["--lr", "0.05"], "lr"), (["--seed", "3"], "seed"),
                         (["--num-clients", "5"], "num_clients"),
                         (["--algorithm", "fedper"], "algorithm"),
                         (["--alpha", "0.5"], "alpha")):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", *TINY, "--output", str(out), "--resume", *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"{named}:" in err, err
        assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["run", *TINY, "--output", str(tmp_path / "none"), "--resume"])
    assert "nothing to resume" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        main(["run", *TINY, "--output", str(empty), "--resume"])
    assert "no checkpoint" in capsys.readouterr().err
    (out / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2, "acc')
    with pytest.raises(SystemExit):
        main(["run", *TINY, "--output", str(out), "--resume"])
    assert "metrics.jsonl: line 2 is not valid JSON" in capsys.readouterr().err


def test_resume_with_more_rounds_equals_the_uninterrupted_run(tmp_path):
    data = random_federated()
    model = make_model("mlp", data.input_shape, data.num_classes)
    algorithm = algorithms.make("fedrep", model, local_epochs=1)
    whole = run(algorithm, data, rounds=4, eval_every=1, progress=False,
                output=tmp_path / "whole")
    run(algorithm, data, rounds=2, eval_every=1, checkpoint_every=2, progress=False,
        output=tmp_path / "part")
    resumed = run(algorithm, data, rounds=4, eval_every=1, progress=False,
                  output=tmp_path / "part", resume=True)
    assert resumed.summary["client_accuracies"] == whole.summary["client_accuracies"]
    assert _records(tmp_path / "part") == _records(tmp_path / "whole")
    with pytest.raises(ResumeError, match="past --rounds"):
        run(algorithm, data, rounds=1, progress=False, output=tmp_path / "part", resume=True)


RUN = ["run", "--algorithm", "fedper", "--num-clients", "4", "--local-epochs", "1",
       "--eval-every", "2", "--no-progress"]


def _kill_and_resume(out: Path, rounds: int, delays: list[float]) -> None:
    """Kills the run with SIGKILL after each delay, resuming it each time, then lets it
    finish."""
    args = [*RUN, "--rounds", str(rounds), "--checkpoint-every", "1", "--output", str(out)]
    for delay in delays:
        started = out.exists()
        proc = subprocess.Popen([sys.executable, "-m", "fedjax_sim.cli", *args,
                                 *(["--resume"] if started and (out / "checkpoints").exists()
                                   and any((out / "checkpoints").iterdir())
                                   else ["--overwrite"] if started else [])],
                                env=TWO_DEVICES, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.kill()
        proc.wait()
    has_checkpoint = (out / "checkpoints").exists() and any((out / "checkpoints").iterdir())
    final = _cli([*args, "--resume" if has_checkpoint else "--overwrite"])
    assert final.returncode == 0, final.stderr[-2000:]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_the_uninterrupted_run(tmp_path):
    rounds = 8
    whole = _cli([*RUN, "--rounds", str(rounds), "--output", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    rng = random.Random(0)
    _kill_and_resume(tmp_path / "killed", rounds, [rng.uniform(4, 12) for _ in range(3)])
    assert _records(tmp_path / "killed") == _records(tmp_path / "whole")
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    reference = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["client_accuracies"] == reference["client_accuracies"]


@pytest.mark.slow
def test_kill_9_repeatedly_then_resume_equals_the_uninterrupted_run(tmp_path):
    rounds = 20
    whole = _cli([*RUN, "--rounds", str(rounds), "--output", str(tmp_path / "whole")])
    assert whole.returncode == 0
    rng = random.Random(1)
    for trial in range(5):
        out = tmp_path / f"killed{trial}"
        _kill_and_resume(out, rounds, [rng.uniform(3, 15) for _ in range(4)])
        assert _records(out) == _records(tmp_path / "whole"), trial


@pytest.mark.parametrize("signum", [signal.SIGTERM,
                                    pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_saves_stops_and_prints_the_resume_command(tmp_path, signum):
    out = tmp_path / "run"
    args = [*RUN, "--rounds", "400", "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "fedjax_sim.cli", *args], env=TWO_DEVICES,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    # A second process is kept out of the folder while the run uses it.
    second = _cli([*args, "--overwrite"])
    assert second.returncode == 2 and "in use by fedjax-sim process" in second.stderr
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if "stopped at round" in x)
    stopped = int(line.split("stopped at round ")[1].split(";")[0])
    assert 2 <= stopped < 400
    assert json.loads((out / "summary.json").read_text())["status"] == "stopped"
    command = line.split("resume with: ")[1].split()
    assert command[0] == "fedjax-sim" and command[-1] == "--resume"
    resumed = _cli([*command[1:], "--rounds", str(stopped + 2)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = _cli([*RUN, "--rounds", str(stopped + 2), "--output", str(tmp_path / "whole")])
    assert whole.returncode == 0
    assert _records(out)[-1] == _records(tmp_path / "whole")[-1]


def test_a_run_that_cannot_fit_is_refused_before_compiling(monkeypatch):
    data = random_federated()
    model = make_model("mlp", data.input_shape, data.num_classes)
    algorithm = algorithms.make("fedavg", model)
    monkeypatch.setattr(safety, "free_memory", lambda device: (10_000, "host memory"))
    with pytest.raises(safety.OutOfMemoryError, match=r"needs about .* lower --num-clients"):
        run(algorithm, data, rounds=1, progress=False)


def test_the_watchdog_ends_a_stalled_wait_with_a_message():
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from fedjax_sim.safety import Watchdog
        slow = jax.jit(lambda x: jax.lax.fori_loop(0, 10**9, lambda i, v: v * 1.0000001, x))
        Watchdog(floor=1.0).wait(slow(jnp.ones(1000)), "rounds 1-1")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=TWO_DEVICES, timeout=300)
    assert proc.returncode == safety.EXIT_STALLED
    assert "rounds 1-1 made no progress for 1 s" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_first_wait_gets_longer_than_the_floor():
    """The first round block (compilation included) has nothing to be measured against:
    a first wait of 1.5 s passes a 0.5 s floor (six floors allowed), the same wait later
    would not."""
    import time

    stalled = []
    watchdog = safety.Watchdog(floor=0.5)
    watchdog._stalled = lambda what, limit: stalled.append(limit)

    class Slow:  # block_until_ready on an object: a 1.5 s wait
        def block_until_ready(self):
            time.sleep(1.5)
            return self

    watchdog.wait(Slow(), "rounds 1-1", first=True)
    assert not stalled
    fresh = safety.Watchdog(floor=0.5)
    fresh._stalled = lambda what, limit: stalled.append(limit)
    fresh.wait(Slow(), "rounds 2-2")
    assert stalled == [0.5]


def test_summary_statistics_and_sweep_mark_diverged_configurations(tmp_path, capsys):
    main(["run", "--seeds", "0", "--sweep-lr", "0.01,1e30", "--output", str(tmp_path / "s"),
          *TINY])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["status"] for x in lines] == ["complete", "diverged"]
    assert lines[1]["accuracy"] is None and lines[1]["diverged_at"] >= 1
    assert np.isfinite(lines[0]["accuracy"])


def test_nonfinite_clients_names_client_rows_and_flags_all_for_shared_state():
    import jax.numpy as jnp

    clients = {"w": jnp.ones((4, 3)).at[2, 1].set(jnp.nan), "step": jnp.zeros((4,), int)}
    assert safety.nonfinite_clients(clients, {}, 4).tolist() == [False, False, True, False]
    groups = {"g": jnp.ones((3, 2)).at[0, 0].set(jnp.inf)}  # (K_g, ...) of a group
    assert safety.nonfinite_clients(groups, {}, 4).all()
    assert safety.nonfinite_clients({}, {"s": jnp.array([jnp.nan])}, 4).all()
    assert not safety.nonfinite_clients(clients | {"w": jnp.ones((4, 3))}, {}, 4).any()
