"""Config files, --set and grids: parsing, expansion, precedence and refusals (nothing
trains here), and the seed rule shared by run, compare and sweep."""

from __future__ import annotations

import pytest
from conftest import write_toml

from fedjax_sim import cli, config
from fedjax_sim.cli import main
from fedjax_sim.spec import ExperimentSpec, build_data, check_spec
from fedjax_sim.sweep import group_specs

_toml = write_toml


def _plan(argv: list[str]):
    """The checked specs of a command line, as ``main`` computes them."""
    args = cli.build_parser().parse_args(argv)
    args._argv = list(argv)
    return cli.plan(args), args


@pytest.fixture
def no_work(monkeypatch):
    """Loading data and running raise: refusals must come before them."""
    import fedjax_sim.data
    import fedjax_sim.runner

    def reached(*_args, **_kwargs):
        raise AssertionError("bad input was not refused before loading or running")

    for module, name in ((fedjax_sim.data, "load_source"), (fedjax_sim.runner, "run"),
                         (fedjax_sim.runner, "sweep")):
        monkeypatch.setattr(module, name, reached)


def test_axes_tables_and_order(tmp_path):
    path = _toml(tmp_path, """
        dataset = "digits"
        num_clients = 4
        rounds = 3
        algorithm = ["fedavg", "fedobp"]
        lr = [0.01, 0.05]
        seed = [0, 1]

        [fedobp]
        ig_ratio = [0.5, 0.9]
        """)
    specs = config.expand(config.load_config(path))
    fedavg = [s for s in specs if s.algorithm == "fedavg"]
    fedobp = [s for s in specs if s.algorithm == "fedobp"]
    assert len(fedavg) == 2 * 2 and len(fedobp) == 2 * 2 * 2
    assert specs[:4] == fedavg  # algorithm outermost
    assert [(s.hparam_dict["lr"], s.seed) for s in fedavg] == [
        (0.01, 0), (0.01, 1), (0.05, 0), (0.05, 1)]  # seeds fastest
    assert all("ig_ratio" not in s.hparam_dict for s in fedavg)
    assert sorted({(s.hparam_dict["lr"], s.hparam_dict["ig_ratio"]) for s in fedobp}) == [
        (0.01, 0.5), (0.01, 0.9), (0.05, 0.5), (0.05, 0.9)]
    assert all(s.num_clients == 4 and s.rounds == 3 for s in specs)


def test_table_replaces_top_level_value_for_its_algorithm(tmp_path):
    path = _toml(tmp_path, """
        algorithm = ["fedavg", "fedper"]
        lr = [0.01, 0.05]
        [fedper]
        lr = 0.2
        """)
    specs = config.expand(config.load_config(path))
    assert [(s.algorithm, s.hparam_dict["lr"]) for s in specs] == [
        ("fedavg", 0.01), ("fedavg", 0.05), ("fedper", 0.2)]


def test_list_options_as_keys_and_int_for_float(tmp_path):
    path = _toml(tmp_path, """
        algorithms = "fedavg,local"
        seeds = "3,4"
        sweep_lr = [1, 0.5]
        no_progress = true
        """)
    specs = config.expand(config.load_config(path))
    assert len(specs) == 2 * 2 * 2 and {s.seed for s in specs} == {3, 4}
    assert {s.hparam_dict["lr"] for s in specs} == {1.0, 0.5}
    assert all(isinstance(s.hparam_dict["lr"], float) for s in specs)  # normalized
    assert not any(s.progress for s in specs)


def test_set_overrides_the_file_and_its_tables(tmp_path):
    path = _toml(tmp_path, """
        algorithm = ["fedavg", "fedper"]
        rounds = 5
        [fedper]
        lr = [0.3, 0.4]
        """)
    grid = config.merge(config.load_config(path),
                        config.parse_set(["lr=0.1,0.2", "rounds=2", "fedper.local_epochs=2",
                                          "architectures=mlp:32,mlp:64", "no_progress=1"]))
    assert grid.settings["lr"].values == (0.1, 0.2) and grid.settings["lr"].axis
    assert grid.settings["rounds"].values == (2,) and not grid.settings["rounds"].axis
    assert grid.settings["architectures"].values == ("mlp:32,mlp:64",)
    assert grid.settings["progress"].values == (False,)
    assert "lr" not in grid.tables["fedper"]  # a top-level --set replaces tables too
    assert grid.tables["fedper"]["local_epochs"].values == (2,)
    assert grid.settings["lr"].label == "--set lr"


def test_flags_win_over_file_and_set(tmp_path):
    path = _toml(tmp_path, """
        rounds = 5
        lr = [0.01, 0.05]
        seed = [0, 1]
        num_clients = 6
        """)
    specs, _ = _plan(["sweep", "--config", str(path), "--rounds", "2", "--lr", "0.3",
                      "--set", "num_clients=4"])
    assert [(s.rounds, s.hparam_dict["lr"], s.num_clients, s.seed) for s in specs] == [
        (2, 0.3, 4, 0), (2, 0.3, 4, 1)]
    # A default value given explicitly still wins.
    specs, _ = _plan(["sweep", "--config", str(path), "--seed", "0"])
    assert {s.seed for s in specs} == {0}


def test_run_and_compare_read_config_files(tmp_path):
    path = _toml(tmp_path, """
        algorithm = "fedper"
        rounds = 4
        [fedper]
        lr = 0.2
        """)
    specs, args = _plan(["run", "--config", str(path)])
    assert len(specs) == 1 and not args._sweep
    assert (specs[0].algorithm, specs[0].rounds, specs[0].hparam_dict) == (
        "fedper", 4, {"lr": 0.2})
    path = _toml(tmp_path, """
        algorithms = ["fedavg", "fedper"]
        seeds = [0]
        [fedper]
        lr = 0.2
        """, "compare.toml")
    specs, args = _plan(["compare", "--config", str(path)])
    assert args._names == ["fedavg", "fedper"]
    # Local runs first, as the reference, although the file does not list it.
    assert [(s.algorithm, s.hparam_dict.get("lr")) for s in specs] == [
        ("local", None), ("fedavg", None), ("fedper", 0.2)]


BAD_FILES = [
    ("lrr = 0.1", "grid.toml: lrr: unknown key (did you mean lr?)"),
    ("lr = -1", "grid.toml: lr must be > 0, got -1.0"),
    ("lr = [0.1, inf]", "grid.toml: lr must be a finite number > 0, got inf"),
    ('alpha = "x"', "grid.toml: alpha must be a finite number > 0, got 'x'"),
    ("rounds = 2.5", "grid.toml: rounds must be an integer >= 1, got 2.5"),
    ("seed = [0, -1]", "grid.toml: seed must be an integer >= 0 and < 2**32, got -1"),
    ("seed = [0, 0]", "grid.toml: seed lists 0 twice"),
    ("lr = []", "grid.toml: lr is an empty list"),
    ("num_clients = true", "grid.toml: num_clients must be a positive integer, got True"),
    ('dataset = "imagenet"', "grid.toml: dataset must be one of"),
    ("compare_local = 1", "grid.toml: compare_local must be true or false, got 1"),
    ('algorithm = "fedobp"\n[fedobp]\nig_ratio = 2',
     "grid.toml: [fedobp] ig_ratio must be in [0, 1], got 2.0"),
    ("[fedobp]\nfoo = 1", "grid.toml: [fedobp] foo: fedobp has no hyperparameter foo"),
    ("[fedbop]\nlr = 0.1", "grid.toml: [fedbop] is not an algorithm"),
    ("[fedobp]\nig_ratio = 0.5",
     "grid.toml: [fedobp]: fedobp is not among the algorithms of the grid (fedavg)"),
    ('algorithm = ["fedavg", "fedper"]\nig_ratio = 0.5',
     "grid.toml: ig_ratio applies to none of fedavg, fedper (it is a hyperparameter of fedobp)"),
    ("devices = [1, 2]", "grid.toml: devices takes one value, got [1, 2]"),
    ("resume = true", "grid.toml: resume is not taken by `fedjax-sim sweep`"),
    ("seed = 0\nseeds = [1]", "grid.toml: seed and grid.toml: seeds name the same setting"),
    ("lr = ", "not valid TOML"),
]


@pytest.mark.parametrize("text, message", BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_bad_files_are_refused_naming_key_and_file(text, message, tmp_path, capsys, no_work,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    _toml(tmp_path, text + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", "grid.toml", "--output", "out", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedjax-sim sweep: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--set", "lr=abc"], "--set lr entry 1 must be a number, got 'abc'"),
    (["sweep", "--set", "foo=1"], "--set foo: unknown key"),
    (["sweep", "--set", "lr"], "--set takes key=value[,value...], got 'lr'"),
    (["sweep", "--set", "lr=0.1,0.1"], "--set lr lists 0.1 twice"),
    (["sweep", "--set", "fedobp.lrr=1"], "--set fedobp.lrr: fedobp has no hyperparameter"),
    (["sweep", "--set", "rounds=2", "--rounds", "3"],
     "--set rounds and --rounds set the same option"),
    (["sweep", "--set", "lr=0"], "--set lr must be > 0, got 0.0"),
    (["sweep", "--seed", "1", "--seeds", "0,1"], "give --seed or --seeds, not both"),
    (["sweep", "--algorithm", "fedavg", "--algorithms", "fedavg,local"],
     "give --algorithm or --algorithms, not both"),
    (["sweep", "--algorithms", "fedavg,local", "--body-epochs", "2"],
     "--body-epochs applies to none of fedavg, local"),
    (["sweep", "--config", "missing.toml"], "--config missing.toml: no such file"),
    (["run", "--set", "alpha=0.1,0.5"], "--set alpha is a list (a grid axis); "
     "`fedjax-sim run` takes one value, or a list only for lr, seed: use `fedjax-sim sweep`"),
    (["run", "--algorithm", "fedavg", "--set", "fedper.lr=0.1"], None),
    (["compare", "--set", "lr=0.1,0.2"], "--set lr is a list (a grid axis)"),
    (["compare", "--set", "resume=true"], "--set resume is not taken by `fedjax-sim compare`"),
    (["compare", "--save-partition", "x.json"], "--save-partition works with `fedjax-sim run`"),
])
def test_bad_command_lines_are_refused(argv, message, tmp_path, capsys, no_work,
                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    if message is None:  # a table of an algorithm the command line does not run: unused
        specs, _ = _plan(argv)
        assert [s.algorithm for s in specs] == ["fedavg"] and specs[0].hparams == ()
        return
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output", "out", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_values_equal_once_normalized_are_one_configuration():
    # lr = 1 and lr = 1.0 are one configuration once normalized.
    grid = config.grid_from_mapping({"lr": [1, 1.0]}, source="g")
    with pytest.raises(ValueError, match="are the same configuration"):
        config.expand(grid)


def test_check_spec_labels_and_normalizes():
    spec = check_spec(ExperimentSpec(alpha=1, hparams={"lr": 1}))
    assert isinstance(spec.alpha, float) and spec.hparam_dict == {"lr": 1.0}
    assert spec.config_hash() == check_spec(ExperimentSpec(alpha=1.0)).replace(
        lr=1.0).config_hash()
    # A default given explicitly is the same configuration.
    assert ExperimentSpec(hparams={"lr": 0.01}).config_hash() == ExperimentSpec().config_hash()
    with pytest.raises(ValueError, match=r"^x\.toml: lr must be > 0, got -1\.0$"):
        check_spec(ExperimentSpec(hparams={"lr": -1.0}), label=lambda k: f"x.toml: {k}")
    with pytest.raises(ValueError, match="body_epochs does not apply to fedavg"):
        check_spec(ExperimentSpec(hparams={"body_epochs": 2}))


# ---- the seed rule --------------------------------------------------------------------------


def _fingerprint(spec: ExperimentSpec) -> str:
    from fedjax_sim.runner import data_fingerprint

    data, _ = build_data(spec)
    return data_fingerprint(data)


def test_each_seed_draws_its_split_unless_partition_seed():
    base = ExperimentSpec(num_clients=4)
    assert _fingerprint(base.replace(seed=0)) != _fingerprint(base.replace(seed=1))
    fixed = base.replace(partition_seed=5)
    assert _fingerprint(fixed.replace(seed=0)) == _fingerprint(fixed.replace(seed=1))
    assert _fingerprint(fixed) == _fingerprint(base.replace(seed=5))


@pytest.mark.parametrize("extra, same_split", [([], False), (["--partition-seed", "7"], True)])
def test_run_compare_and_sweep_follow_one_seed_rule(extra, same_split):
    seeds = ["--seeds", "0,1"]
    run_specs, _ = _plan(["run", *seeds, *extra])
    sweep_specs, _ = _plan(["sweep", *seeds, *extra])
    compare_specs, _ = _plan(["compare", "--algorithms", "fedavg", *seeds, *extra])
    compare_specs = [s for s in compare_specs if s.algorithm == "fedavg"]
    for specs in (run_specs, sweep_specs, compare_specs):
        assert [(s.seed, s.data_seed) for s in specs] == (
            [(0, 7), (1, 7)] if same_split else [(0, 0), (1, 1)])
    single, _ = _plan(["run", "--seed", "1", *extra])
    assert single[0].data_seed == run_specs[1].data_seed
    # Seeds share one program whether or not they share the split (each reads its own).
    assert [len(g.specs) for g in group_specs(run_specs)] == [2]


def test_group_specs_batches_seeds_splits_and_traced_hparams():
    base = ExperimentSpec(num_clients=4, partition_seed=0)
    specs = [base.replace(seed=s, lr=lr) for lr in (0.1, 0.2) for s in (0, 1)]
    specs.append(base.replace(seed=0, lr=0.1, local_epochs=2))  # another program
    specs.append(base.replace(algorithm="dsfl", seed=0))  # public data: alone
    groups = group_specs(specs)
    assert [(g.batched, len(g.specs)) for g in groups] == [(True, 4), (False, 1), (False, 1)]
    assert groups[0].specs == tuple(specs[:4])
    assert sorted(id(s) for g in groups for s in g.specs) == sorted(id(s) for s in specs)
    # Other splits (partition seed, alpha), momentum and an incomplete product: one program.
    varied = [s.replace(partition_seed=None) for s in specs[:3]] + [
        base.replace(alpha=0.5, momentum=0.9), base.replace(seed=5, partition="iid")]
    assert [len(g.specs) for g in group_specs(varied)] == [5]
    # Structural settings and other algorithms do not share a program.
    apart = [base, base.replace(batch_size=16), base.replace(algorithm="fedper"),
             base.replace(rounds=3)]
    assert [len(g.specs) for g in group_specs(apart)] == [1, 1, 1, 1]
    obp = [base.replace(algorithm="fedobp", ig_ratio=r) for r in (0.99, 0.999)]
    assert [len(g.specs) for g in group_specs(obp)] == [2]
