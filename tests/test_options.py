"""The option schema: each option declared once, on its field, and every layer reading it."""

from __future__ import annotations

import dataclasses
import re

import pytest

from fedjax_sim import cli, config, spec
from fedjax_sim.options import SECTIONS, Option, check_value, declared, in_section, kinds, option


def _flags(parser) -> dict[str, object]:
    return {action.dest: action for action in parser._actions if action.option_strings}


def test_every_field_is_declared_once_with_a_section():
    names = [f.name for f in dataclasses.fields(spec.ExperimentSpec) if f.name != "hparams"]
    assert list(spec.OPTIONS) == names
    assert all(o.section in SECTIONS for o in spec.OPTIONS.values())
    # The derived sets are what the build code reads.
    assert spec.CLOCK_FIELDS == in_section(spec.ExperimentSpec, "clock")
    assert set(spec.EXECUTION) == {n for n, o in spec.OPTIONS.items() if not o.numbers}
    assert "alpha" in spec.DATA_OPTIONS and "partition_file" not in spec.DATA_OPTIONS
    assert not set(spec.DATA_OPTIONS) & spec.EXECUTION


@pytest.mark.parametrize("command", ["run", "compare", "sweep"])
def test_flags_are_generated_from_the_schema(command):
    flags = _flags(cli.build_parser().commands[command])
    for name, described in spec.OPTIONS.items():
        dest = described.negated.lstrip("-").replace("-", "_") if described.negated else name
        if command not in described.commands:
            # cpu_devices is a platform flag of every command, bench included.
            if name != "cpu_devices":
                assert dest not in flags or name == "algorithm", (command, name)
            continue
        action = flags[dest]
        if described.negated:
            assert action.option_strings == [described.negated]
            continue
        assert action.option_strings[0] == "--" + name.replace("_", "-")
        assert list(action.option_strings[1:]) == list(described.aliases)
        if spec.KINDS[name] is not bool:
            assert action.default == getattr(spec.ExperimentSpec(), name)
            assert action.type is (None if spec.KINDS[name] is str else spec.KINDS[name])
        # Every flag is explained, its placeholders all filled.
        assert action.help and not re.search(r"\{[a-z_]+\}", action.help), name


def test_config_keys_read_the_declared_types():
    for name, kind in spec.KINDS.items():
        assert config.key_kind(name) == (kind, name in spec.OPTIONAL)
    assert config.key_kind("num_clients") == (int, True)
    assert config.key_kind("alpha") == (float, False)


def test_run_only_options_are_refused_by_compare_and_sweep():
    run_only = {n for n, o in spec.OPTIONS.items() if o.run_only}
    assert run_only == {"save_partition", "checkpoint_every", "distributed", "coordinator",
                        "num_processes", "process_id"}
    for command in ("compare", "sweep"):
        assert run_only <= set(cli._REFUSED[command])


# One value just outside each declared range, and the words the message must hold.
OUT_OF_RANGE = {
    "alpha": (0.0, "> 0"), "test_ratio": (1.0, "in (0, 1)"), "val_fraction": (1.0, "[0, 1)"),
    "min_samples": (1, ">= 2"), "num_clients": (0, "positive"), "dropout": (1.0, "[0, 1)"),
    "deadline": (0.0, "> 0"), "async_alpha": (0.0, "(0, 1]"), "rounds": (0, ">= 1"),
    "checkpoint_every": (-1, ">= 0"), "seed": (-1, "2**32"), "public_val_fraction": (1.0,
                                                                                     "[0, 1)"),
    "staleness_exponent": (-0.5, ">= 0"),
}


@pytest.mark.parametrize("name", sorted(OUT_OF_RANGE))
def test_declared_ranges_are_checked_with_the_label(name):
    value, words = OUT_OF_RANGE[name]
    extra = {"system": "homogeneous"} if name in spec.CLOCK_FIELDS else {}
    with pytest.raises(ValueError) as caught:
        spec.check_spec(spec.ExperimentSpec(**{name: value}, **extra),
                        label=lambda key: f"--{key.replace('_', '-')}")
    message = str(caught.value)
    assert message.startswith(f"--{name.replace('_', '-')} must be"), message
    assert words in message, message


def test_declared_choices_are_read_when_checked():
    with pytest.raises(ValueError, match="partition must be one of iid, dirichlet"):
        spec.check_spec(spec.ExperimentSpec(partition="round_robin"))
    with pytest.raises(ValueError, match="on_divergence must be one of stop, warn"):
        spec.check_spec(spec.ExperimentSpec(on_divergence="ignore"))


def test_a_record_of_its_own_reads_the_schema():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        rate: float = option(0.5, "loop", "a rate", low=0.0, high=1.0, low_open=True)
        label: str | None = option(None, "output", "a name")

    described = declared(Toy)
    assert list(described) == ["rate", "label"]
    assert isinstance(described["rate"], Option) and described["rate"].numbers
    assert not described["label"].numbers  # output never changes the numbers
    assert kinds(Toy) == ({"rate": float, "label": str}, frozenset({"label"}))
    assert check_value(described["rate"], float, 1, "rate") == 1.0
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\], got 0"):
        check_value(described["rate"], float, 0, "rate")
    with pytest.raises(ValueError, match="section must be one of"):
        option(1, "nowhere")
