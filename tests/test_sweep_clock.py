"""The virtual clock in sweeps: configurations on one clock (system model, condition)
share one batched program, each with its own clock state, and equal their separate runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedjax_sim.spec import ExperimentSpec, run_spec
from fedjax_sim.sweep import group_specs, run_sweep

CONDITIONS = {"wait_all": {}, "fedbuff": {"buffer_size": 2}, "deadline": {"deadline": 5.0}}


def _specs(condition: str, system: str = "homogeneous"):
    common = dict(progress=False, algorithm="fedavg", num_clients=6, rounds=3, eval_every=1,
                  system=system, condition=condition, **CONDITIONS[condition])
    hp = (("local_epochs", 1), ("join_ratio", 0.5))
    return [ExperimentSpec(seed=0, hparams=hp, **common),
            ExperimentSpec(seed=1, hparams=hp, **common),
            ExperimentSpec(seed=0, hparams=(*hp, ("lr", 0.05)), **common)]


@pytest.mark.parametrize("condition", sorted(CONDITIONS))
def test_a_sweep_on_the_clock_equals_separate_runs(tmp_path, condition):
    specs = _specs(condition)
    groups = group_specs(specs)
    assert [len(g.specs) for g in groups] == [3]  # one program for seeds and learning rates
    result = run_sweep(specs, output=tmp_path / "sweep")
    for spec, record in zip(specs, result.records, strict=True):
        swept = [json.loads(line) for line in
                 (tmp_path / "sweep" / record["path"] / "metrics.jsonl").read_text().splitlines()]
        alone = run_spec(spec, output=tmp_path / f"alone-{spec.seed}-{spec.config_hash()}")
        assert len(swept) == len(alone.history) == 3
        for a, b in zip(swept, alone.history, strict=True):
            for key in ("accuracy", "train_loss", "client_accuracies", "aggregated",
                        "wasted_work"):
                assert key in a and a[key] == b[key], key
            # Summed in another order by the batched program: float32 rounding apart.
            for key in ("virtual_time", "round_time"):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-6)


def test_a_drawn_system_model_keeps_seeds_apart():
    # lognormal device speeds are drawn from the seed: its seeds cannot share one clock.
    groups = group_specs(_specs("wait_all", system="lognormal"))
    assert sorted(len(g.specs) for g in groups) == [1, 2]


def test_compare_and_run_seeds_take_the_clock(tmp_path, capsys):
    from fedjax_sim.cli import main

    tiny = ["--num-clients", "6", "--rounds", "2", "--no-progress", "--system", "homogeneous",
            "--condition", "fedbuff", "--buffer-size", "2"]
    main(["compare", "--algorithms", "local,fedavg", "--seeds", "0,1", *tiny,
          "--output", str(tmp_path / "compare")])
    table = (tmp_path / "compare" / "compare.md").read_text()
    assert "condition fedbuff (Local without it)" in table and "| fedavg |" in table
    # The Local reference trains alone: its run records no virtual clock.
    local = json.loads((tmp_path / "compare" / "local" / "seed0" / "metrics.jsonl")
                       .read_text().splitlines()[-1])
    assert "virtual_time" not in local
    fedavg = json.loads((tmp_path / "compare" / "fedavg" / "seed0" / "metrics.jsonl")
                        .read_text().splitlines()[-1])
    assert fedavg["virtual_time"] > 0
    main(["run", "--algorithm", "fedavg", "--seeds", "0,1", *tiny,
          "--output", str(tmp_path / "seeds")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{") and '"seed"' in line]
    assert [line["seed"] for line in lines[-2:]] == [0, 1]
    assert all(line["status"] == "complete" for line in lines[-2:])
