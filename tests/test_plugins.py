"""Algorithms registered through the public API (``algorithms.register``), entry points and
``--plugin``: they work wherever the built-in names do, and bad registrations are refused.

This module is also a plug-in itself: ``--plugin test_plugins:register_plugin``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_sim import algorithms, cli
from fedjax_sim.algorithms.base import (
    HParam,
    federated_algorithm,
    num_params_bytes,
    per_round_bytes,
)
from fedjax_sim.algorithms.fedavg import fedavg_method, global_init

ROOT = Path(__file__).resolve().parents[1]

# --- the plug-in ------------------------------------------------------------------------

MIX = (HParam("mix", 0.5, float, lambda v: 0 < v <= 1, "in (0, 1]",
              "fedavg_mix: share of the way from the global model to the cohort's mean",
              traced=True),)


def fedavg_mix(model, *, cover=(), **hp):
    """FedAvg whose server moves only ``mix`` of the way to the cohort's mean model."""

    def server_update(traced, state, cohort, context):
        mix = traced["mix"]
        # mean + (1 - mix)(x - mean): at mix 1 the mean itself, as FedAvg.
        new = jax.tree.map(lambda m, x: m + (1.0 - mix) * (x - m), cohort.uploads,
                           state.server["params"])
        return {"params": new}, {}

    method = fedavg_method(model, hp)._replace(server_update=server_update)
    size = num_params_bytes(model)
    return federated_algorithm("fedavg_mix", hp, MIX, method, init_with=global_init(model),
                               comm_bytes=per_round_bytes(hp, size, size), cover=cover)


def register_plugin():
    algorithms.register("fedavg_mix", fedavg_mix, MIX)


@pytest.fixture
def plugin():
    register_plugin()
    yield "fedavg_mix"
    algorithms.unregister("fedavg_mix")


# --- in process ---------------------------------------------------------------------------


def test_registered_algorithm_works_where_built_ins_do(plugin, small_data):
    from fedjax_sim import config
    from fedjax_sim.models import make_model
    from fedjax_sim.spec import ExperimentSpec, check_spec

    assert plugin in algorithms.ALGORITHMS and plugin not in algorithms.DISTILLATION
    assert plugin in algorithms.names() and not algorithms.uses_public(plugin)
    assert algorithms.hparam_specs(plugin)[-1].name == "mix"
    assert algorithms.traced_names(plugin) == (
        "lr", "momentum", "weight_decay", "dp_noise_multiplier", "dp_clip_norm",
        "dp_target_quantile", "dp_clip_lr", "mix")
    assert algorithms.resolve(plugin, mix=0.25)["mix"] == 0.25
    with pytest.raises(ValueError, match=r"mix must be in \(0, 1\], got 0.0"):
        algorithms.resolve(plugin, mix=0.0)
    assert algorithms.resolve_cover(plugin, algorithms.resolve(plugin),
                                    [{"mix": 0.3}])[0]["mix"] == 0.3
    # Specs, config keys and command-line flags know it and its hyperparameter.
    check_spec(ExperimentSpec(algorithm=plugin, hparams={"mix": 0.3}))
    assert "mix" in config.known_keys()
    args = cli.build_parser().parse_args(["run", "--algorithm", plugin, "--mix", "0.3"])
    assert args.mix == 0.3
    # At mix 1 it is FedAvg, bit for bit; at 0.5 it is not.
    model = make_model("mlp", small_data.input_shape, small_data.num_classes, hidden=(8,))
    common = {"local_epochs": 1, "batch_size": 8}
    mine = algorithms.make(plugin, model, **common, cover=[{"mix": 1.0}])
    assert mine.models == (model,) and mine.name == plugin
    avg = algorithms.make("fedavg", model, **common)
    key = jax.random.key(0)
    want = jax.jit(avg.round)(avg.init(key, small_data), small_data)[0].server
    round_with = jax.jit(mine.round_with)
    got = round_with(mine.init(key, small_data), small_data, mine.hp(mix=1.0))[0].server
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    half = round_with(mine.init(key, small_data), small_data, mine.hp())[0].server
    assert not np.array_equal(jax.tree.leaves(half)[0], jax.tree.leaves(want)[0])


def _factory(model, *, cover=(), **hp):
    raise AssertionError("not built")


@pytest.mark.parametrize(("name", "factory", "hparams", "message"), [
    ("fedavg", _factory, (), "'fedavg' is a built-in algorithm"),
    ("scaffold", _factory, (), "'scaffold' is a built-in algorithm"),
    ("my-algo", _factory, (), "must be a Python identifier"),
    ("2fast", _factory, (), "must be a Python identifier"),
    ("class", _factory, (), "must be a Python identifier"),
    (None, _factory, (), "must be a Python identifier"),
    ("mine", "fedavg", (), "factory of algorithm 'mine' must be callable"),
    ("mine", _factory, {"mix": 0.5}, "hparams of algorithm 'mine' must be a tuple of HParam"),
    ("mine", _factory, MIX[0], "must be a tuple of HParam"),
    ("mine", _factory, ("mix",), r"hparams\[0\] of algorithm 'mine' must be an HParam"),
    ("mine", _factory, (HParam("lr", 0.1, float, bool, "", ""),), "that every algorithm has"),
    ("mine", _factory, MIX + MIX, "'mix' twice"),
    ("mine", _factory, (HParam("mu", 1, int, bool, "", ""),),
     "'mu' is also fedprox's, with type float"),
    ("mine", _factory, (HParam("steps", 2, int, bool, "", "", traced=True),),
     "traced hyperparameter 'steps' must be a float"),
    ("mine", _factory, (HParam("mix", 2.0, float, lambda v: v <= 1, "<= 1", ""),),
     r"mine: the default of mix must be <= 1, got 2.0"),
])
def test_register_refuses(name, factory, hparams, message):
    with pytest.raises(ValueError, match=message):
        algorithms.register(name, factory, hparams)
    assert "mine" not in algorithms.names()


def test_register_twice_needs_replace(plugin):
    register_plugin()  # the same registration again: nothing changes
    with pytest.raises(ValueError, match="'fedavg_mix' is registered already; pass "
                                         "replace=True"):
        algorithms.register(plugin, lambda model, **hp: fedavg_mix(model, **hp), MIX)
    algorithms.register(plugin, fedavg_mix, MIX, replace=True)
    with pytest.raises(ValueError, match="built-in algorithm and cannot be removed"):
        algorithms.unregister("fedavg")
    with pytest.raises(ValueError, match="returned NoneType, not an Algorithm"):
        algorithms.register(plugin, lambda model, **hp: None, MIX, replace=True)
        algorithms.make(plugin, None)


def test_entry_points_are_loaded_once_lazily(monkeypatch, tmp_path):
    (tmp_path / "ep_module_plugin.py").write_text(
        "from fedjax_sim import algorithms\n"
        "from test_plugins import MIX, fedavg_mix\n"
        "algorithms.register('ep_module_algo', fedavg_mix, MIX)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [
        EntryPoint("mix", "test_plugins:register_plugin", algorithms.ENTRY_POINT_GROUP),
        EntryPoint("module", "ep_module_plugin", algorithms.ENTRY_POINT_GROUP),
        EntryPoint("broken", "no_such_module_xyz", algorithms.ENTRY_POINT_GROUP),
    ]
    calls = []

    def entry_points(group):
        calls.append(group)
        return points

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    monkeypatch.setattr(algorithms, "_entry_points_loaded", False)
    try:
        with pytest.warns(RuntimeWarning, match="entry point 'broken'.*failed to load"):
            listed = algorithms.ALGORITHMS
        assert "fedavg_mix" in listed and "ep_module_algo" in listed
        assert algorithms.hparam_specs("ep_module_algo")[-1].name == "mix"
        algorithms.names()
        assert calls == [algorithms.ENTRY_POINT_GROUP]  # once
    finally:
        for name in ("fedavg_mix", "ep_module_algo"):
            if name in algorithms.names():
                algorithms.unregister(name)


# --- the command line -----------------------------------------------------------------


def test_cli_plugin_refusals(capsys, monkeypatch, tmp_path):
    def error(argv):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "--plugin no_such_module_xyz: no module named 'no_such_module_xyz'" in error(
        ["run", "--plugin", "no_such_module_xyz"])
    assert "test_plugins has no function 'nothing'" in error(
        ["run", "--plugin", "test_plugins:nothing"])
    (tmp_path / "clash_plugin.py").write_text(
        "from fedjax_sim import algorithms\n"
        "from fedjax_sim.algorithms.base import HParam\n"
        "from test_plugins import fedavg_mix\n"
        "algorithms.register('clash', fedavg_mix, (HParam('rounds', 2, int, bool, '', ''),))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "algorithm clash: hyperparameter 'rounds' has the name of the option --rounds" \
            in error(["run", "--plugin", "clash_plugin"])
    finally:
        algorithms.unregister("clash")
    assert f"--plugin {tmp_path / 'missing.py'}: no file" in error(
        ["run", "--plugin", str(tmp_path / "missing.py")])


def test_cli_runs_a_plugin_algorithm_on_an_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "own.npz"
    np.savez(npz, x=rng.normal(size=(80, 6)).astype(np.float32), y=rng.integers(0, 3, 80),
             client=np.repeat(np.arange(4), 20))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedjax_sim.cli", "run", "--plugin",
         "test_plugins:register_plugin", "--algorithm", "fedavg_mix", "--mix", "0.7",
         "--dataset", f"npz:{npz}", "--partition", "natural", "--min-samples", "8",
         "--rounds", "2", "--local-epochs", "1", "--batch-size", "8", "--model", "mlp",
         "--no-progress", "--cpu-devices", "1", "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["algorithm"] == "fedavg_mix" and summary["status"] == "complete"
    written = json.loads((out / "summary.json").read_text())
    assert written["hparams"]["mix"] == 0.7 and written["num_clients"] == 4  # one per id
    assert written["rounds_done"] == 2


@pytest.mark.slow
def test_a_plugin_runs_through_compare_sweep_and_compare_local(plugin, tmp_path, capsys):
    tiny = ["--num-clients", "3", "--rounds", "2", "--local-epochs", "1", "--no-progress",
            "--plugin", "test_plugins:register_plugin"]
    # compare: its seeds as one program, with Local as the reference (hurt fraction, IPR).
    cli.main(["compare", "--algorithms", "fedavg,fedavg_mix", "--seeds", "0,1", *tiny,
              "--output", str(tmp_path / "compare")])
    rows = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert [r["status"] for r in rows["fedavg_mix"]] == ["complete", "complete"]
    assert all("hurt_fraction" in r for r in rows["fedavg_mix"])
    # sweep over its own traced hyperparameter and seeds, with --compare-local: one
    # program, and mix 1 is FedAvg.
    cli.main(["sweep", "--algorithm", "fedavg_mix", "--set", "fedavg_mix.mix=0.5,1.0",
              "--seeds", "0,1", "--compare-local", *tiny, "--output", str(tmp_path / "sweep")])
    # The two seeds' Local references run first, as runs of the grid (one program).
    assert "6 runs to do in 2 programs" in capsys.readouterr().err
    records = [json.loads(line) for line in
               (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    local = [r for r in records if r["algorithm"] == "local"]
    assert sorted(r["seed"] for r in local) == [0, 1] and "hurt_fraction" not in local[0]
    records = [r for r in records if r["algorithm"] == "fedavg_mix"]
    assert sorted((r["values"]["mix"], r["seed"]) for r in records) == [
        (0.5, 0), (0.5, 1), (1.0, 0), (1.0, 1)]
    assert all(r["status"] == "complete" and r["hurt_fraction"] is not None for r in records)
    assert all(r["tie_fraction"] is not None for r in records)
    assert "| strict IPR % | ties % | IPR with ties % | hurt % |" in (
        tmp_path / "sweep" / "results.md").read_text()
    # The batched comparison's evaluation records carry the incentives too.
    folder = tmp_path / "compare" / "fedavg_mix" / "seed1"
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    summary = json.loads((folder / "summary.json").read_text())
    assert last["ipr"] == summary["ipr"] and last["tie_fraction"] == summary["tie_fraction"]
    fedavg = {r["seed"]: r["accuracy"] for r in rows["fedavg"]}
    assert {r["seed"]: r["accuracy"] for r in records if r["values"]["mix"] == 1.0} == fedavg


def test_a_plugin_declares_what_it_can_do(small_data):
    """The clock's checks read the algorithm's declared abilities, not a list of names: a
    plug-in that declares asynchronous uploads runs under FedBuff; without, it is refused
    with the reason; a clock refusal names the plug-in's own reason."""
    from fedjax_sim.algorithms.base import Abilities, clocked
    from fedjax_sim.core import system
    from fedjax_sim.core.clock import Clock
    from fedjax_sim.models import make_model

    model = make_model("mlp", small_data.input_shape, small_data.num_classes)
    clock = Clock(system.homogeneous(small_data.num_clients), condition="fedbuff",
                  buffer_size=1)
    try:
        algorithms.register("fedavg_mix", fedavg_mix, MIX)
        plain = algorithms.make("fedavg_mix", model, local_epochs=1)
        assert algorithms.abilities("fedavg_mix") == Abilities()
        with pytest.raises(ValueError, match="fedavg_mix cannot run under the asynchronous"):
            clocked(plain, clock, small_data.num_clients)
        algorithms.register("fedavg_mix", fedavg_mix, MIX,
                            abilities=Abilities(asynchronous=True), replace=True)
        able = algorithms.make("fedavg_mix", model, local_epochs=1)
        timed = clocked(able, clock, small_data.num_clients)
        assert timed.clock is not None and timed.abilities.asynchronous
        assert timed.models == able.models
        algorithms.register("fedavg_mix", fedavg_mix, MIX, replace=True,
                            abilities=Abilities(clock=False, clock_refusal="its own reason"))
        with pytest.raises(ValueError, match="cannot run under condition fedbuff: its own"):
            clocked(algorithms.make("fedavg_mix", model), clock, small_data.num_clients)
    finally:
        algorithms.unregister("fedavg_mix")
    with pytest.raises(TypeError, match=r"Abilities\.asynchronous must be True or False"):
        Abilities(asynchronous="yes")
