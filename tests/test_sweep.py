"""``fedjax-sim sweep`` end to end on a tiny grid: the files it writes, skipping on rerun,
resuming an interrupted sweep, diverged configurations, and the same numbers as ``run``
and ``compare``."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest

import fedjax_sim.runner
from fedjax_sim.cli import main

# One program: 2 seeds on one split (partition_seed) x 2 learning rates, one of which
# diverges.
GRID = """\
dataset = "digits"
num_clients = 3
rounds = 2
eval_every = 1
local_epochs = 1
partition_seed = 0
lr = [0.05, 1e30]
seed = [0, 1]
no_progress = true
"""
GOOD, BAD = "0.05", "1e+30"


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _by_pair(records):
    return {(f"{r['lr']:g}", r["seed"]): r for r in records}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The sweep folder of GRID, run once for the module."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "grid.toml").write_text(GRID)
    main(["sweep", "--config", str(root / "grid.toml"), "--output", str(root / "out")])
    return root


def _rerun(root, out=None):
    main(["sweep", "--config", str(root / "grid.toml"), "--output", str(out or root / "out")])


def test_sweep_writes_grid_results_table_curves_and_run_folders(swept):
    out = swept / "out"
    grid = json.loads((out / "grid.json").read_text())
    assert grid["runs"] == 4 and grid["axes"] == {"lr": [0.05, 1e30]}
    assert [c["seeds"] for c in grid["configs"]] == [[0, 1], [0, 1]]
    records = _by_pair(_records(out))
    assert set(records) == {(GOOD, 0), (GOOD, 1), (BAD, 0), (BAD, 1)}
    for seed in (0, 1):
        good, bad = records[(GOOD, seed)], records[(BAD, seed)]
        assert good["status"] == "complete" and 0 <= good["accuracy"] <= 1
        assert bad["status"] == "diverged" and bad["accuracy"] is None
        assert bad["diverged_at"] >= 1
        summary = json.loads((out / good["path"] / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["seed"] == seed
        assert summary["config"] == good["config"] and summary["data_seed"] == 0
        assert summary["accuracy"] == good["accuracy"]
        metrics = (out / good["path"] / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(m)["round"] for m in metrics] == [1, 2]
    assert records[(GOOD, 0)]["accuracy"] != records[(GOOD, 1)]["accuracy"]
    table = (out / "results.md").read_text()
    good_row = next(line for line in table.splitlines() if line.startswith("| fedavg | 0.05 "))
    bad_row = next(line for line in table.splitlines() if line.startswith("| fedavg | 1e+30 "))
    assert "(best)" in good_row and "| 2 |" in good_row
    assert "0 of 2 (2 diverged)" in bad_row and "(best)" not in bad_row
    assert (out / "curves.png").stat().st_size > 0


def test_rerun_skips_every_finished_run(swept, capsys, monkeypatch):
    capsys.readouterr()

    def no_training(*_args, **_kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(fedjax_sim.runner, "run", no_training)
    monkeypatch.setattr(fedjax_sim.runner, "sweep", no_training)
    before = (swept / "out" / "results.jsonl").read_text()
    _rerun(swept)
    captured = capsys.readouterr()
    assert "4 of 4 runs already finished" in captured.err
    assert "(0 run, 4 skipped)" in captured.err
    assert "| fedavg | 0.05 |" in captured.out  # the table, printed again
    assert sorted(_records(swept / "out"), key=str) == sorted(
        (json.loads(x) for x in before.splitlines()), key=str)


def _resume_without(swept, tmp_path, monkeypatch, pairs):
    """Copies the sweep, deletes the summaries of ``pairs`` (as if the sweep was killed
    before writing them), reruns it and returns (original records, resumed records,
    seeds that runner.run ran)."""
    out = tmp_path / "out"
    shutil.copytree(swept / "out", out)
    (tmp_path / "grid.toml").write_text(GRID)
    original = _by_pair(_records(out))
    for pair in pairs:
        (out / original[pair]["path"] / "summary.json").unlink()
    calls = []
    real_run = fedjax_sim.runner.run

    def counted(*args, **kwargs):
        calls.append(kwargs["seed"])
        return real_run(*args, **kwargs)

    def no_sweep(*_args, **_kwargs):
        raise AssertionError("only the missing runs may run")

    monkeypatch.setattr(fedjax_sim.runner, "run", counted)
    monkeypatch.setattr(fedjax_sim.runner, "sweep", no_sweep)
    _rerun(tmp_path, out)
    return original, _by_pair(_records(out)), calls


def test_interrupted_sweep_resumes_only_what_is_missing(swept, tmp_path, monkeypatch, capsys):
    kept = swept / "out" / _by_pair(_records(swept / "out"))[(GOOD, 0)]["path"]
    capsys.readouterr()
    original, resumed, calls = _resume_without(swept, tmp_path, monkeypatch, [(GOOD, 1)])
    assert calls == [1]
    assert "(1 run, 3 skipped)" in capsys.readouterr().err
    assert resumed[(GOOD, 1)]["status"] == "complete"
    # runner.run alone gives the numbers of the batched program.
    assert resumed[(GOOD, 1)]["accuracy"] == original[(GOOD, 1)]["accuracy"]
    # Finished runs are left alone.
    copy = tmp_path / "out" / kept.relative_to(swept / "out")
    assert (copy / "summary.json").read_bytes() == (kept / "summary.json").read_bytes()
    assert resumed == {**original, (GOOD, 1): resumed[(GOOD, 1)]}


def test_a_diverged_run_alone_is_marked(swept, tmp_path, monkeypatch):
    original, resumed, calls = _resume_without(swept, tmp_path, monkeypatch, [(BAD, 0)])
    assert calls == [0]
    assert resumed[(BAD, 0)]["status"] == "diverged" and resumed[(BAD, 0)]["accuracy"] is None
    assert resumed[(BAD, 0)]["diverged_at"] == original[(BAD, 0)]["diverged_at"]


def test_sweep_refuses_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--num-clients", "3", "--rounds", "1", "--output", str(out)])
    assert exit_info.value.code == 2
    assert "the folder is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_run_compare_and_sweep_give_the_same_accuracy(tmp_path):
    # Two seeds, each on its own split: compare and sweep run them as one program.
    setting = ["--num-clients", "3", "--rounds", "2", "--eval-every", "1", "--local-epochs",
               "1", "--lr", "0.05", "--no-progress"]
    main(["run", "--seed", "1", *setting, "--output", str(tmp_path / "run")])
    expected = json.loads((tmp_path / "run" / "summary.json").read_text())["accuracy"]
    main(["sweep", "--seeds", "0,1", *setting, "--output", str(tmp_path / "sweep")])
    swept = {r["seed"]: r["accuracy"] for r in _records(tmp_path / "sweep")}
    main(["compare", "--algorithms", "fedavg", "--seeds", "0,1", *setting, "--output",
          str(tmp_path / "compare")])
    rows = json.loads((tmp_path / "compare" / "compare.json").read_text())["fedavg"]
    assert swept[1] == expected and rows[1]["accuracy"] == expected
    assert swept[0] == rows[0]["accuracy"] != expected


def test_grid_file_example_parses(tmp_path):
    from fedjax_sim import config

    path = tmp_path / "grid.toml"
    path.write_text(textwrap.dedent(GRID))
    specs = config.expand(config.load_config(path))
    assert [(s.seed, s.hparam_dict["lr"]) for s in specs] == [
        (0, 0.05), (1, 0.05), (0, 1e30), (1, 1e30)]


def test_best_is_marked_per_algorithm_and_data_setting():
    from fedjax_sim.sweep import _best

    def rows(name, dataset, lr, accuracy):
        return name, [{"algorithm": "fedavg", "status": "complete", "accuracy": accuracy,
                       "values": {"dataset": dataset, "lr": lr}}]

    best = _best(dict([rows("a", "digits", 0.1, 0.9), rows("b", "digits", 0.2, 0.8),
                       rows("c", "mnist1d", 0.1, 0.3), rows("d", "mnist1d", 0.2, 0.4),
                       rows("e", "emnist", 0.1, 0.5)]))
    # Each data set's own best; a data setting with a single configuration marks none.
    assert sorted(best.values()) == ["a", "d"]
def test_results_table_shows_hurt_ipr_and_ties():
    from fedjax_sim.spec import ExperimentSpec, check_spec
    from fedjax_sim.sweep import config_name, make_record, results_table

    spec = check_spec(ExperimentSpec(algorithm="fedavg", compare_local=True))
    summary = {"status": "complete", "accuracy": 0.5, "client_mean_accuracy": 0.5,
               "client_p10": 0.25, "hurt_fraction": 0.25, "ipr": 0.75, "ipr_strict": 0.5,
               "tie_fraction": 0.25, "rounds": 1, "wall_s": 1.0}
    record = make_record(spec, config_name(spec, ()), (), summary, "run")
    assert (record["ipr_strict"], record["tie_fraction"]) == (0.5, 0.25)
    lines = results_table([record], [spec], ()).splitlines()
    header = next(line for line in lines if line.startswith("| algorithm"))
    row = next(line for line in lines if line.startswith("| fedavg"))
    # The strict rate leads, the ties beside it, then IPR with ties and hurt.
    assert "| strict IPR % | ties % | IPR with ties % | hurt % |" in header
    assert "| 50.00 ± 0.00 | 25.00 ± 0.00 | 75.00 ± 0.00 | 25.00 ± 0.00 |" in row


def test_compare_local_references_are_runs_of_the_sweep(tmp_path, capsys):
    # Each learning rate and seed has its Local reference (Local takes the lr): they run
    # first, as runs of the grid in one program, each equal to `run --algorithm local`.
    setting = ["--num-clients", "3", "--rounds", "2", "--eval-every", "1", "--local-epochs",
               "1", "--no-progress"]
    out = tmp_path / "sweep"
    command = ["sweep", "--algorithm", "fedavg", "--set", "lr=0.05,0.1", "--seeds", "0,1",
               "--compare-local", *setting, "--output", str(out)]
    main(command)
    assert "8 runs to do in 2 programs" in capsys.readouterr().err
    records = _records(out)
    local = {(r["lr"], r["seed"]): r for r in records if r["algorithm"] == "local"}
    assert sorted(local) == [(0.05, 0), (0.05, 1), (0.1, 0), (0.1, 1)]
    assert all("hurt_fraction" not in r for r in local.values())
    main(["run", "--algorithm", "local", "--seed", "1", "--lr", "0.1", *setting,
          "--output", str(tmp_path / "alone")])
    alone = json.loads((tmp_path / "alone" / "summary.json").read_text())
    reference = json.loads((out / local[(0.1, 1)]["path"] / "summary.json").read_text())
    assert reference["client_accuracies"] == alone["client_accuracies"]
    # A measured run's incentives are against its own reference's accuracies.
    fedavg = {(r["lr"], r["seed"]): r for r in records if r["algorithm"] == "fedavg"}
    assert len(fedavg) == 4
    summary = json.loads((out / fedavg[(0.1, 1)]["path"] / "summary.json").read_text())
    below = [a < b for a, b in zip(summary["client_accuracies"],
                                   reference["client_accuracies"], strict=True)]
    assert summary["hurt_fraction"] == pytest.approx(sum(below) / len(below))
    # A rerun skips every finished run, the references included.
    main(command)
    assert "8 of 8 runs already finished" in capsys.readouterr().err
