"""The failures a second reliability probe found, each now held: --overwrite keeps what a
run did not write, every ending leaves a status, a resume never drops history silently,
a torn checkpoint falls back, files stay strict JSON, a sweep never replaces another
grid's tables."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import random_federated

from fedjax_sim import algorithms
from fedjax_sim.cli import main
from fedjax_sim.models import make_model
from fedjax_sim.rundir import OutputError, RunDir, read_jsonl
from fedjax_sim.runner import Events, ResumeError, run
from fedjax_sim.spec import ExperimentSpec, check_spec
from fedjax_sim.sweep import run_sweep

TINY = ["--num-clients", "4", "--rounds", "2", "--eval-every", "1", "--local-epochs", "1",
        "--no-progress"]


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def _setup(rounds_lr=0.05):
    data = random_federated()
    model = make_model("mlp", data.input_shape, data.num_classes)
    return data, algorithms.make("fedavg", model, lr=rounds_lr, local_epochs=1)


def test_overwrite_removes_only_what_runs_write(tmp_path):
    out = tmp_path / "run"
    main(["run", *TINY, "--output", str(out)])
    (out / "notes.txt").write_text("mine")
    (out / "figures").mkdir()
    (out / "figures" / "plot.svg").write_text("<svg/>")
    with pytest.raises(OutputError, match=r"also holds figures, notes\.txt"):
        with RunDir(out, overwrite=True):
            pass
    assert (out / "notes.txt").read_text() == "mine" and (out / "summary.json").exists()
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "figures")
    with RunDir(out, overwrite=True):
        assert not any(p.name != ".lock" for p in out.iterdir())


def test_a_failure_after_start_writes_a_failed_summary_and_the_folder_is_reused(tmp_path):
    data, algorithm = _setup()
    events = Events()

    def broken(**_):
        raise RuntimeError("the handler broke\nsecond line")

    events.on("evaluate", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the handler broke"):
        run(algorithm, data, rounds=2, output=out, events=events, progress=False)
    summary = _strict((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["reason"] == "RuntimeError: the handler broke"
    # The failed run's folder is reused without --overwrite; something else in it is not.
    result = run(algorithm, data, rounds=2, output=out, progress=False)
    assert result.summary["status"] == "complete"
    assert _strict((out / "summary.json").read_text())["status"] == "complete"


def test_resume_refuses_a_missing_metrics_file_and_falls_back_over_a_torn_checkpoint(
        tmp_path):
    data, algorithm = _setup()
    out = tmp_path / "run"
    full = run(algorithm, data, rounds=4, output=out, checkpoint_every=1, progress=False)
    records = read_jsonl(out / "metrics.jsonl")
    (out / "metrics.jsonl").unlink()
    with pytest.raises(ResumeError, match=r"metrics\.jsonl is missing"):
        run(algorithm, data, rounds=4, output=out, resume=True, progress=False)
    # The latest checkpoint torn: a warning, and the run goes on from the one before.
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    latest = out / "checkpoints" / "4"
    for path in latest.rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.warns(RuntimeWarning, match="round 4 cannot be read"):
        resumed = run(algorithm, data, rounds=4, output=out, resume=True, progress=False)
    assert resumed.summary["resumed_from"] == 3
    assert resumed.summary["accuracy"] == full.summary["accuracy"]


def test_random_bytes_in_metrics_name_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 200, np.uint8)))
    with pytest.raises(OutputError, match=r"metrics\.jsonl: not a text file"):
        read_jsonl(path)


def test_files_are_strict_json_and_a_diverged_run_reports_no_accuracy(tmp_path):
    data = random_federated()
    model = make_model("mlp", data.input_shape, data.num_classes)
    algorithm = algorithms.make("fedper", model, lr=1e30, local_epochs=1)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = run(algorithm, data, rounds=3, output=out, on_divergence="warn",
                     progress=False)
    summary = _strict((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and "accuracy" not in summary
    assert "accuracy" not in result.summary
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = _strict(line)
        assert record["train_loss"] is None or np.isfinite(record["train_loss"])


def test_dropout_one_is_refused():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        check_spec(ExperimentSpec(dropout=1.0, system="homogeneous"))


def test_resume_refusal_says_default_not_none(tmp_path, capsys):
    out = tmp_path / "run"
    main(["run", *TINY, "--output", str(out), "--checkpoint-every", "1"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["run", *TINY[2:], "--output", str(out), "--resume"])
    err = capsys.readouterr().err
    assert "num_clients: 4 in the checkpoint, the default now" in err and "None" not in err


def _sweep_specs(rounds: int, seeds=(0,)):
    return [ExperimentSpec(algorithm="fedavg", num_clients=4, rounds=rounds, eval_every=1,
                           seed=s, hparams=(("local_epochs", 1),)) for s in seeds]


def test_a_sweep_over_another_grid_never_replaces_the_tables(tmp_path):
    out = tmp_path / "sweep"
    run_sweep(_sweep_specs(1), output=out)
    before = {name: (out / name).read_bytes() for name in ("results.jsonl", "grid.json",
                                                           "results.md")}
    with pytest.raises(OutputError, match="rounds 1 there, 2 here"):
        run_sweep(_sweep_specs(2), output=out)
    assert {name: (out / name).read_bytes() for name in before} == before
    # Adding a seed continues it: the first run is kept, the new one runs.
    result = run_sweep(_sweep_specs(1, seeds=(0, 1)), output=out)
    assert result.skipped == 1 and len(result.records) == 2
