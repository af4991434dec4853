"""compare --tune: each method's learning rate chosen on validation rows; the test rows
are never read for a choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedjax_sim.cli import main
from fedjax_sim.spec import ExperimentSpec, build_data, run_spec
from fedjax_sim.tuning import choose, tune

LRS = (0.01, 0.05, 0.2)


def test_choose_takes_the_best_mean_validation_accuracy_first_on_ties():
    records = [
        {"algorithm": "a", "lr": 0.01, "status": "complete", "accuracy": 0.5},
        {"algorithm": "a", "lr": 0.01, "status": "complete", "accuracy": 0.7},
        {"algorithm": "a", "lr": 0.1, "status": "complete", "accuracy": 0.6},
        {"algorithm": "a", "lr": 0.1, "status": "complete", "accuracy": 0.6},
        {"algorithm": "b", "lr": 0.01, "status": "diverged", "accuracy": None},
        {"algorithm": "b", "lr": 0.1, "status": "complete", "accuracy": 0.3},
    ]
    chosen, scores = choose(records, (0.01, 0.1))
    assert chosen == {"a": 0.01, "b": 0.1}  # a: a tie at 0.6, the first in order wins
    assert scores["a"] == {0.01: pytest.approx(0.6), 0.1: pytest.approx(0.6)}
    assert scores["b"][0.01] is None
    with pytest.raises(ValueError, match="every run of c diverged"):
        choose([{"algorithm": "c", "lr": 0.1, "status": "diverged"}], (0.1,))


def _specs(dataset: str, partition_file: str | None = None, **extra):
    common = dict(dataset=dataset, num_clients=5, rounds=3, eval_every=3, val_fraction=0.2,
                  progress=False, partition_file=partition_file,
                  hparams=(("local_epochs", 1),), **extra)
    if partition_file is None:
        common.update(partition="dirichlet", alpha=0.5)
    return [ExperimentSpec(algorithm=name, seed=0, **common) for name in ("fedavg", "fedper")]


def test_the_choice_never_reads_the_test_rows(tmp_path):
    """The same split with every test label scrambled: the same validation scores, the
    same choice; scored on the test rows, the scrambled set ranks learning rates anew."""
    digits = load_digits()
    x, y = digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    clean = tmp_path / "clean.npz"
    np.savez(clean, x=x, y=y)
    split = tmp_path / "split.json"
    build_data(_specs(f"npz:{clean}", save_partition=str(split))[0])
    test_rows = np.concatenate([c["test"] for c in json.loads(split.read_text())["clients"]])
    scrambled = tmp_path / "scrambled.npz"
    y2 = y.copy()
    y2[test_rows] = (y[test_rows] + 1 + np.arange(test_rows.size) % 9) % 10  # all wrong
    np.savez(scrambled, x=x, y=y2)
    # The same rows, recorded for the scrambled file.
    other = tmp_path / "split_scrambled.json"
    other.write_text(json.dumps({**json.loads(split.read_text()),
                                 "dataset": f"npz:{scrambled}"}))
    results = {}
    for name, path, file in (("clean", clean, split), ("scrambled", scrambled, other)):
        specs = _specs(f"npz:{path}", str(file))
        results[name] = tune(specs, lrs=LRS, seeds=[0], output=tmp_path / name)
    assert results["clean"].scores == results["scrambled"].scores
    assert results["clean"].chosen == results["scrambled"].chosen
    # The scrambled test rows are scored far below the validation rows the choice saw.
    for spec in _specs(f"npz:{scrambled}", str(other)):
        lr = results["scrambled"].chosen[spec.algorithm]
        spec = spec.replace(hparams=(("local_epochs", 1), ("lr", lr)))
        test = run_spec(spec, output=tmp_path / f"test-{spec.algorithm}").summary["accuracy"]
        assert test < 0.15 < results["scrambled"].scores[spec.algorithm][lr]


def test_compare_tune_equals_the_chosen_configurations_run_by_hand(tmp_path, capsys):
    out = tmp_path / "compare"
    main(["compare", "--algorithms", "fedavg,fedper", "--tune", "--tune-lrs", "0.01,0.2",
          "--num-clients", "5", "--rounds", "2", "--eval-every", "2", "--seeds", "0,1",
          "--local-epochs", "1", "--no-progress", "--output", str(out)])
    report = json.loads((out / "compare.json").read_text())
    chosen = report["tuning"]["chosen"]
    assert set(chosen) == {"local", "fedavg", "fedper"}
    table = (out / "compare.md").read_text()
    assert "lr (tuned)" in table and "validation rows (0.1 of each client" in table
    for name in ("fedavg", "fedper"):
        for seed in (0, 1):
            spec = ExperimentSpec(algorithm=name, seed=seed, num_clients=5, rounds=2,
                                  eval_every=2, val_fraction=0.1, progress=False,
                                  hparams=(("local_epochs", 1), ("lr", chosen[name])))
            alone = run_spec(spec, output=tmp_path / f"{name}-{seed}")
            row = json.loads((out / name / f"seed{seed}" / "summary.json").read_text())
            assert row["accuracy"] == alone.summary["accuracy"]
            assert row["client_accuracies"] == alone.summary["client_accuracies"]


def test_tuning_options_are_checked(capsys):
    for argv, words in ((["--tune-lrs", "0.1"], "--tune-lrs has no effect without --tune"),
                        (["--tune", "--tune-lrs", "0.1,-1"], "--tune-lrs entry 2"),
                        (["--tune", "--lr", "0.1"], "--tune chooses each method's learning"),
                        (["--tune", "--eval-split", "val", "--val-fraction", "0.1"],
                         "drop --eval-split")):
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", *argv, "--no-progress"])
        assert exit_info.value.code == 2
        assert words in capsys.readouterr().err
