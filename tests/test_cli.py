"""The command line end to end on tiny settings, and its errors on bad input."""

from __future__ import annotations

import json

import pytest

from fedjax_sim import algorithms
from fedjax_sim.cli import main

TINY = ["--num-clients", "5", "--rounds", "2", "--eval-every", "1", "--local-epochs", "1",
        "--no-progress"]


def test_run_writes_metrics_summary_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    main(["run", "--algorithm", "fedper", "--output", str(out), "--compare-local",
          "--save-partition", str(tmp_path / "split.json"), *TINY])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("algorithm", "dataset", "accuracy", "client_mean_accuracy",
                "client_accuracies", "rounds", "wall_s", "bytes_up", "bytes_down",
                "hurt_fraction", "ipr"):
        assert key in summary
    assert summary["algorithm"] == "fedper" and summary["dataset"] == "digits"
    assert 0 <= summary["accuracy"] <= 1 and len(summary["client_accuracies"]) == 5
    assert summary["bytes_up"] > 0 and summary["hurt_fraction"] + summary["ipr"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    # Local ran first: every evaluation record holds the incentives against its final
    # accuracies, and the last one's are the summary's.
    incentives = ("hurt_fraction", "ipr", "ipr_strict", "tie_fraction")
    for record in records:
        assert all(0 <= record[k] <= 1 for k in incentives)
        assert record["ipr"] == pytest.approx(record["ipr_strict"] + record["tie_fraction"])
    assert {k: records[-1][k] for k in incentives} == {k: summary[k] for k in incentives}
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "clients.png").exists()
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["accuracy"] == summary["accuracy"]

    # The saved split reloads to the same clients and the same result.
    again = tmp_path / "again"
    main(["run", "--algorithm", "fedper", "--output", str(again), "--partition-file",
          str(tmp_path / "split.json"), *TINY])
    assert json.loads((again / "summary.json").read_text())["client_accuracies"] == \
        summary["client_accuracies"]


def test_compare_prints_a_table(tmp_path, capsys):
    main(["compare", "--algorithms", "fedavg,local", "--seeds", "0", "--output",
          str(tmp_path), *TINY])
    out = capsys.readouterr().out
    assert "| fedavg |" in out and "| local |" in out
    assert "| strict IPR % | ties % | IPR with ties % | hurt % |" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| algorithm |"))
    fedavg = next(line for line in lines if line.startswith("| fedavg |"))
    assert fedavg.count("|") == header.count("|")  # a cell per column
    assert (tmp_path / "compare.md").exists() and (tmp_path / "fedavg" / "seed0").is_dir()
    # Each incentive column holds its own field of the run (one seed: std 0).
    cells = dict(zip(header.strip("|").split(" | "), fedavg.strip("|").split(" | "),
                     strict=True))
    run = json.loads((tmp_path / "compare.json").read_text())["fedavg"][0]
    for column, field in (("strict IPR %", "ipr_strict"), ("ties %", "tie_fraction"),
                          ("IPR with ties %", "ipr"), ("hurt %", "hurt_fraction")):
        assert cells[column].strip() == f"{100 * run[field]:.2f} ± 0.00", column
    assert run["ipr"] == pytest.approx(run["ipr_strict"] + run["tie_fraction"])


def test_bench_prints_throughput(capsys):
    main(["bench", "--num-clients", "3", "--local-steps", "2", "--rounds", "1",
          "--samples-per-client", "40"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["client_steps_per_s"] > 0 and result["compile_s"] > 0


@pytest.mark.parametrize("argv, message", [
    (["run", "--algorithm", "fedsgd"], "algorithm must be one of"),
    (["run", "--alpha", "0"], "alpha"),
    (["run", "--alpha", "-1"], "alpha"),
    (["run", "--join-ratio", "0"], "--join-ratio must be in (0, 1]"),
    (["run", "--join-ratio", "1.5"], "--join-ratio must be in (0, 1]"),
    (["run", "--rounds", "0"], "--rounds must be an integer >= 1"),
    (["run", "--num-clients", "0"], "--num-clients"),
    (["run", "--lr", "0"], "--lr must be > 0"),
    (["run", "--lr", "-0.1"], "--lr must be > 0"),
    (["run", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["run", "--num-clients", "500"], "num_clients"),
    (["run", "--dataset", "imagenet"], "imagenet"),
    (["run", "--partition", "zipf"], "zipf"),
    (["run", "--algorithm", "fedavg", "--body-epochs", "2"], "does not apply to fedavg"),
    (["run", "--cpu-devices", "0"], "--cpu-devices must be 'auto' or an integer >= 1"),
    (["compare", "--cpu-devices", "many"], "--cpu-devices must be 'auto' or an integer >= 1"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output", str(tmp_path), "--no-progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_registry_rejects_unknown_and_out_of_range():
    from fedjax_sim.models import make_model

    model = make_model("mlp", (4,), 3)
    with pytest.raises(ValueError, match="has no hyperparameter ig_ratio"):
        algorithms.make("fedavg", model, ig_ratio=0.5)
    with pytest.raises(ValueError, match="momentum must be in"):
        algorithms.make("fedavg", model, momentum=1.0)
    with pytest.raises(ValueError, match="local_epochs must be a positive integer"):
        algorithms.make("fedper", model, local_epochs=2.5)
    with pytest.raises(ValueError, match="body_epochs must be <= local_epochs"):
        algorithms.make("fedrep", model, local_epochs=1, body_epochs=2)
