"""The command line's options (issue 28): options that would have no effect are refused,
``--version``, ``bench``'s progress lines, hints for unknown options, the config file's
``plugin`` key and ``bench --plugin``, "did you mean" in config tables, and the Local
reference of ``--compare-local`` as a run folder of its own."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest
from conftest import write_toml

import fedjax_sim
from fedjax_sim import algorithms, cli
from fedjax_sim.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-clients", "4", "--rounds", "2", "--eval-every", "1", "--local-epochs", "1",
        "--no-progress"]
PLUGIN = "test_plugins:register_plugin"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BAD_INPUTS = _load(ROOT / "experiments" / "bad_inputs.py", "bad_inputs_script")


def _reached(*_args, **_kwargs):
    raise AssertionError("bad input was not refused before loading or running")


@pytest.fixture
def no_work(monkeypatch):
    """Loading data, running and benchmarking raise: refusals come before them."""
    import fedjax_sim.bench
    import fedjax_sim.data
    import fedjax_sim.runner

    for module, name in ((fedjax_sim.data, "load_source"), (fedjax_sim.runner, "run"),
                         (fedjax_sim.runner, "sweep"), (fedjax_sim.bench, "bench")):
        monkeypatch.setattr(module, name, _reached)


@pytest.fixture
def plugin_gone():
    """The plug-in of tests/test_plugins.py is unregistered after the test."""
    yield
    if "fedavg_mix" in algorithms.ALGORITHMS:
        algorithms.unregister("fedavg_mix")


def _error(argv: list[str], capsys, code: int = 2) -> str:
    """The one error line of ``main(argv)``, which must exit with ``code``."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


_toml = write_toml


def _plan(argv: list[str]):
    args = cli.build_parser().parse_args(argv)
    args._argv = list(argv)
    return cli.plan(args)


# ---- 1. options without effect are refused ------------------------------------------------


@pytest.mark.parametrize("case", BAD_INPUTS.EXTRA_CASES, ids=lambda case: case[0])
def test_bad_inputs_extra_cases_are_refused_in_one_line(case, tmp_path, capsys, no_work):
    _, argv, expected = case
    BAD_INPUTS.prepare_extra_files(tmp_path)
    words = [w.replace("{tmp}", str(tmp_path)) for w in argv.split()]
    if words[0] != "bench":
        words += ["--output", str(tmp_path / "out"), "--no-progress"]
    err = _error(words, capsys)
    assert err.startswith(f"fedjax-sim {words[0]}: error: "), err
    assert expected.replace("{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "out").exists()


def test_iid_with_alpha_is_refused_not_recorded(tmp_path, capsys, no_work):
    err = _error(["run", "--partition", "iid", "--alpha", "0.3", "--output",
                  str(tmp_path / "out"), *TINY], capsys)
    assert "--alpha has no effect with --partition iid" in err
    assert "drop --alpha or use --partition dirichlet" in err
    err = _error(["run", "--local-epochs", "5", "--local-steps", "10", "--output",
                  str(tmp_path / "out")], capsys)
    assert "--local-epochs has no effect with --local-steps" in err


def test_config_keys_and_set_are_refused_too(tmp_path, capsys, no_work):
    _toml(tmp_path, """
        partition = "shards"
        classes_per_client = 3
        """)
    err = _error(["sweep", "--config", str(tmp_path / "grid.toml"), "--output",
                  str(tmp_path / "out")], capsys)
    assert "grid.toml: classes_per_client has no effect with" in err
    assert "partition shards" in err
    err = _error(["run", "--set", "local_steps=10", "--set", "local_epochs=2", "--output",
                  str(tmp_path / "out")], capsys)
    assert "--set local_epochs has no effect with --set local_steps" in err
    _toml(tmp_path, """
        algorithm = "fedopt"
        [fedopt]
        beta1 = 0.5
        """, "table.toml")
    err = _error(["run", "--config", str(tmp_path / "table.toml"), "--output",
                  str(tmp_path / "out")], capsys)
    assert "[fedopt] beta1 has no effect with --server-opt sgd" in err


def test_defaults_and_options_that_act_somewhere_are_accepted(tmp_path):
    # Defaults never count: alpha's default with iid, local_epochs' with local_steps.
    assert _plan(["run", "--partition", "iid"])[0].alpha == 0.1
    assert _plan(["run", "--local-steps", "10"])[0].hparam_dict["local_steps"] == 10
    # FedRep reads local_epochs with local_steps (the base's share of the steps).
    assert _plan(["run", "--algorithm", "fedrep", "--local-epochs", "2",
                  "--local-steps", "4"])[0].hparam_dict["local_epochs"] == 2
    assert _plan(["run", "--client-strategy", "chunked", "--chunk-size", "4"])
    assert len(_plan(["run", "--seeds", "0,1", "--sweep-strategy", "vmap"])) == 2
    # In a grid, an option that acts in some configuration is taken.
    path = _toml(tmp_path, """
        partition = ["iid", "dirichlet"]
        alpha = 0.3
        """)
    specs = _plan(["sweep", "--config", str(path)])
    assert {s.partition for s in specs} == {"iid", "dirichlet"}


# ---- 2. --version -------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedjax-sim {fedjax_sim.__version__}"


# ---- 3. bench says what it measures and prints each strategy as it finishes ---------------


def test_bench_says_what_it_times_then_prints_each_strategy_as_it_finishes(capsys,
                                                                            monkeypatch):
    import fedjax_sim.bench

    seen = []

    def fake_bench(**kwargs):
        # Whatever was printed before this strategy started: the header, and one JSON line
        # for each strategy before it.
        captured = capsys.readouterr()
        seen.append((captured.out.count("\n"), captured.err))
        return {"strategy": kwargs["client_strategy"], "chunk_size": kwargs["chunk_size"],
                "gflops": 1.0}

    monkeypatch.setattr(fedjax_sim.bench, "bench", fake_bench)
    main(["bench", "--num-clients", "3", "--local-steps", "2", "--rounds", "1",
          "--client-strategy", "all", "--chunk-size", "2,4"])
    out = capsys.readouterr().out.splitlines()
    header = seen[0][1]
    assert header.startswith("fedjax-sim bench: timing fedavg rounds of 3 clients x 2 local "
                             "steps x batch 32")
    assert "4 client strategies: vmap, sequential, chunked:2, chunked:4" in header
    assert [lines for lines, _ in seen] == [0, 1, 1, 1]  # each line out before the next
    assert [json.loads(line)["strategy"] for line in out] == ["chunked"]


# ---- 4. hints for unknown options; the config file's plugin key; bench --plugin -----------


def test_run_algorithms_and_plugin_options_get_a_hint(capsys):
    err = _error(["run", "--algorithms", "fedavg,fedper"], capsys)
    assert err.startswith("fedjax-sim run: error: unrecognized arguments: --algorithms")
    assert "--algorithms is an option of compare and sweep, not of run; run takes " \
           "--algorithm" in err
    err = _error(["run", "--mix", "0.7"], capsys)
    assert "if a plug-in defines it, pass --plugin MODULE first" in err
    err = _error(["sweep", "--num-clientz", "3"], capsys)
    assert "did you mean --num-clients?" in err
    err = _error([], capsys)
    assert "one of run, compare, sweep, bench" in err


def test_config_file_plugin_key(tmp_path, capsys, plugin_gone):
    path = _toml(tmp_path, f"""
        plugin = "{PLUGIN}"
        algorithm = "fedavg_mix"
        """)
    out = tmp_path / "out"
    main(["run", "--config", str(path), "--mix", "0.7", "--output", str(out), *TINY])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "fedavg_mix" and summary["hparams"]["mix"] == 0.7
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["plugin"] == [PLUGIN]
    capsys.readouterr()
    bad = _toml(tmp_path, "plugin = 3\n", "bad.toml")
    assert f"{bad}: plugin must be" in _error(["run", "--config", str(bad)], capsys)


def test_bench_takes_plugin(capsys, plugin_gone):
    main(["bench", "--plugin", PLUGIN, "--algorithm", "fedavg_mix", "--num-clients", "2",
          "--local-steps", "1", "--rounds", "1", "--samples-per-client", "40"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["algorithm"] == "fedavg_mix" and result["client_steps_per_s"] > 0


# ---- 5. did you mean, in config tables as in --set ----------------------------------------


def test_config_tables_get_did_you_mean(tmp_path, capsys, no_work):
    path = _toml(tmp_path, """
        algorithm = "fedobp"
        [fedobp]
        ig_ratoi = 0.5
        """)
    toml = _error(["run", "--config", str(path)], capsys)
    flag = _error(["run", "--algorithm", "fedobp", "--set", "fedobp.ig_ratoi=0.5"], capsys)
    for err in (toml, flag):
        assert "fedobp has no hyperparameter ig_ratoi (did you mean ig_ratio?)" in err
    path = _toml(tmp_path, """
        [fedobpp]
        ig_ratio = 0.5
        """, "table.toml")
    assert "did you mean fedobp" in _error(["sweep", "--config", str(path)], capsys)


# ---- 6. the Local reference of --compare-local is a run folder of the run -----------------


def test_compare_local_writes_its_reference_in_local(tmp_path, capsys):
    out = tmp_path / "run"
    main(["run", "--algorithm", "fedper", "--compare-local", "--output", str(out), *TINY])
    local = out / "local"
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert (local / name).is_file(), name
    reference = json.loads((local / "summary.json").read_text())
    assert reference["algorithm"] == "local" and reference["status"] == "complete"
    assert reference["reference_for"] == "fedper"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["local_reference"] == {"folder": "local", "status": "complete"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["hurt_fraction"] <= 1 for r in records)
    assert records[-1]["ipr"] == summary["ipr"]
    assert "ipr" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_diverged_local_reference_says_so_and_writes_its_summary(tmp_path, capsys,
                                                                   monkeypatch):
    import fedjax_sim.spec as spec_module

    real = spec_module.build_local

    def diverging(spec, model, num_clients):
        return real(spec.replace(lr=1e30), model, num_clients)

    monkeypatch.setattr(spec_module, "build_local", diverging)
    out = tmp_path / "run"
    err = _error(["run", "--algorithm", "fedper", "--compare-local", "--output", str(out),
                  *TINY], capsys, code=3)
    assert err.startswith("fedjax-sim run: error: the Local reference diverged: ") and \
        "diverged at round 1" in err
    assert json.loads((out / "local" / "summary.json").read_text())["status"] == "diverged"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["local_reference"] == {"folder": "local", "status": "diverged"}


def test_a_stop_in_the_local_reference_saves_it_and_resume_continues_it(tmp_path, capsys,
                                                                         monkeypatch):
    from fedjax_sim import runner

    real = runner.run

    def stop_local_after_round_1(algorithm, data, **kwargs):
        if algorithm.name == "local" and not kwargs.get("resume"):
            kwargs["events"] = runner.Events().on(
                "round_end", lambda round, **_: round == 1 and os.kill(os.getpid(),
                                                                        signal.SIGTERM))
        return real(algorithm, data, **kwargs)

    args = ["run", "--algorithm", "fedper", "--compare-local", *TINY, "--rounds", "3"]
    out = tmp_path / "run"
    monkeypatch.setattr(runner, "run", stop_local_after_round_1)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--output", str(out)])
    assert exit_info.value.code == 128 + signal.SIGTERM
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fedjax-sim run: stopped in the Local reference at round 1 of 3")
    assert "resume with: fedjax-sim run" in last and last.endswith("--resume")
    local = out / "local"
    assert json.loads((local / "summary.json").read_text())["status"] == "stopped"
    assert (local / "checkpoints").is_dir()
    assert json.loads((out / "summary.json").read_text())["local_reference"]["status"] == \
        "stopped"

    monkeypatch.setattr(runner, "run", real)
    main([*args, "--output", str(out), "--resume"])
    whole = tmp_path / "whole"
    main([*args, "--output", str(whole)])
    resumed, uninterrupted = (json.loads((folder / "local" / "summary.json").read_text())
                              for folder in (out, whole))
    assert resumed["status"] == "complete" and resumed["resumed_from"] == 1
    assert resumed["client_accuracies"] == uninterrupted["client_accuracies"]
    keys = ("accuracy", "hurt_fraction", "ipr", "tie_fraction")
    assert ({k: json.loads((out / "summary.json").read_text())[k] for k in keys}
            == {k: json.loads((whole / "summary.json").read_text())[k] for k in keys})


def test_warnings_are_one_line(tmp_path):
    # A run that diverges under --on-divergence warn goes on with one warning line: the
    # command's name and the message, no source line of the code that warned (a process of
    # its own: pytest records warnings instead of printing them).
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fedjax_sim", "run", "--algorithm", "fedavg", "--lr", "1e30",
         "--on-divergence", "warn", "--no-progress", "--output", str(tmp_path / "run"),
         *TINY], capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stderr.splitlines() if "warning:" in line.lower()]
    assert lines and all(line.startswith("fedjax-sim run: warning: ") for line in lines), \
        done.stderr
    assert "warnings.warn(" not in done.stderr and "RuntimeWarning" not in done.stderr
