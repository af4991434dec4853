"""compare --tune: each method's learning rate chosen on validation rows; the test rows
are never read for a choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedjax_sim.cli import main
from fedjax_sim.spec import ExperimentSpec, build_data, run_spec
from fedjax_sim.tuning import choose, configurations, own_grid, tune

LRS = (0.01, 0.05, 0.2)


def _record(algorithm, lr, status, accuracy, **values):
    return {"algorithm": algorithm, "lr": lr, "status": status, "accuracy": accuracy,
            "values": values}


def test_choose_takes_the_best_mean_validation_accuracy_first_on_ties():
    records = [
        _record("a", 0.01, "complete", 0.5), _record("a", 0.01, "complete", 0.7),
        _record("a", 0.1, "complete", 0.6), _record("a", 0.1, "complete", 0.6),
        _record("b", 0.01, "diverged", None), _record("b", 0.1, "complete", 0.3),
    ]
    grids = {name: configurations("fedavg", (0.01, 0.1), own=False) for name in "ab"}
    chosen, scores = choose(records, grids)
    # a: a tie at 0.6, the first in grid order wins
    assert chosen == {"a": {"lr": 0.01}, "b": {"lr": 0.1}}
    assert scores["a"] == {"lr 0.01": pytest.approx(0.6), "lr 0.1": pytest.approx(0.6)}
    assert scores["b"]["lr 0.01"] is None
    with pytest.raises(ValueError, match="every run of c diverged"):
        choose([_record("c", 0.1, "diverged", None)], {"c": [{"lr": 0.1}]})


def test_choose_over_an_own_hyperparameter_and_the_best_round(tmp_path):
    # FedOBP's grid: lr x ig_ratio; the best final and the best round disagree.
    grid = configurations("fedobp", (0.05, 0.2), own=True)
    assert grid[:3] == [{"lr": 0.05, "ig_ratio": 0.9999}, {"lr": 0.05, "ig_ratio": 0.99},
                        {"lr": 0.05, "ig_ratio": 0.9}] and len(grid) == 6
    histories = {(0.05, 0.99): [0.9, 0.5], (0.2, 0.9): [0.6, 0.7]}
    records = []
    for i, values in enumerate(grid):
        curve = histories.get((values["lr"], values["ig_ratio"]), [0.1, 0.2])
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        (folder / "metrics.jsonl").write_text(
            "".join(json.dumps({"round": r, "accuracy": a}) + "\n"
                    for r, a in enumerate(curve)))
        records.append({**_record("fedobp", values["lr"], "complete", curve[-1],
                                  ig_ratio=values["ig_ratio"]), "path": f"run{i}"})
    final, _ = choose(records, {"fedobp": grid}, statistic="final", folder=tmp_path)
    best, scores = choose(records, {"fedobp": grid}, statistic="best", folder=tmp_path)
    assert final == {"fedobp": {"lr": 0.2, "ig_ratio": 0.9}}
    assert best == {"fedobp": {"lr": 0.05, "ig_ratio": 0.99}}
    assert scores["fedobp"]["lr 0.05, ig_ratio 0.99"] == pytest.approx(0.9)
    # A method without a key hyperparameter of its own tunes its learning rate alone.
    assert own_grid("fedavg") is None
    assert configurations("fedavg", (0.1,), own=True) == [{"lr": 0.1}]


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
        lr = results["scrambled"].chosen[spec.algorithm]["lr"]
        spec = spec.replace(hparams=(("local_epochs", 1), ("lr", lr)))
        test = run_spec(spec, output=tmp_path / f"test-{spec.algorithm}").summary["accuracy"]
        assert test < 0.15 < results["scrambled"].scores[spec.algorithm][f"lr {lr:g}"]


def test_compare_tune_equals_the_chosen_configurations_run_by_hand(tmp_path, capsys):
    out = tmp_path / "compare"
    main(["compare", "--algorithms", "fedavg,fedper", "--tune", "--tune-lrs", "0.01,0.2",
          "--num-clients", "5", "--rounds", "2", "--eval-every", "2", "--seeds", "0,1",
          "--local-epochs", "1", "--no-progress", "--output", str(out)])
    report = json.loads((out / "compare.json").read_text())
    chosen = report["tuning"]["chosen"]
    assert set(chosen) == {"local", "fedavg", "fedper"}
    table = (out / "compare.md").read_text()
    assert "| tuned |" in table and "validation rows (0.1 of each client" in table
    for name in ("fedavg", "fedper"):
        for seed in (0, 1):
            spec = ExperimentSpec(algorithm=name, seed=seed, num_clients=5, rounds=2,
                                  eval_every=2, val_fraction=0.1, progress=False,
                                  hparams=(("local_epochs", 1), *chosen[name].items()))
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


def test_compare_tune_own_chooses_the_key_hyperparameter_too(tmp_path):
    # FedProx's mu joins its learning rate in the grid; the chosen pair equals a run by
    # hand, and a mu given explicitly is refused (the tuner chooses it).
    out = tmp_path / "compare"
    tiny = ["--num-clients", "5", "--rounds", "2", "--eval-every", "1", "--seeds", "0",
            "--local-epochs", "1", "--no-progress"]
    main(["compare", "--algorithms", "fedprox", "--tune", "--tune-own", "--tune-lrs",
          "0.05,0.2", "--tune-statistic", "best", *tiny, "--output", str(out)])
    report = json.loads((out / "compare.json").read_text())["tuning"]
    chosen = report["chosen"]["fedprox"]
    assert set(chosen) == {"lr", "mu"} and report["statistic"] == "best"
    assert len(report["validation_accuracy"]["fedprox"]) == 2 * 4
    records = [json.loads(line) for line in
               (out / "tune" / "results.jsonl").read_text().splitlines()]
    assert sorted({r["values"]["mu"] for r in records if r["algorithm"] == "fedprox"}) == [
        0.001, 0.01, 0.1, 1.0]
    spec = ExperimentSpec(algorithm="fedprox", seed=0, num_clients=5, rounds=2, eval_every=1,
                          val_fraction=0.1, progress=False,
                          hparams=(("local_epochs", 1), *chosen.items()))
    alone = run_spec(spec, output=tmp_path / "alone")
    row = json.loads((out / "fedprox" / "seed0" / "summary.json").read_text())
    assert row["client_accuracies"] == alone.summary["client_accuracies"]


def test_the_tune_table_of_a_config_file(tmp_path, capsys):
    from fedjax_sim.cli import build_parser, check_args

    path = tmp_path / "grid.toml"
    path.write_text("num_clients = 5\n[tune]\nlrs = [0.05, 0.2]\nseeds = [1]\n"
                    "statistic = \"best\"\nown = true\n")

    def tune_of(*argv):
        args = build_parser().parse_args(["compare", "--config", str(path), *argv])
        args._argv = ["compare", "--config", str(path), *argv]
        check_args(args)
        return args._tune

    # The table turns tuning on; a flag given wins over its key.
    assert tune_of() == {"lrs": [0.05, 0.2], "seeds": [1], "statistic": "best", "own": True}
    assert tune_of("--tune-lrs", "0.1")["lrs"] == [0.1]
    path.write_text("[tune]\nlr = [0.1]\n")
    with pytest.raises(SystemExit):
        main(["compare", "--config", str(path)])
    assert "[tune]: unknown key 'lr' (did you mean lrs?)" in capsys.readouterr().err
    path.write_text("[tune]\nlrs = [0.1]\n")
    with pytest.raises(SystemExit):
        main(["sweep", "--config", str(path)])
    assert "[tune] works with `fedjax-sim compare` only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--config", str(path), "--tune-own", "--algorithms", "fedprox",
              "--mu", "0.1"])
    assert "--tune chooses each method's mu (--tune-own); drop --mu" in capsys.readouterr().err
