"""Python API calls with arguments of the wrong type or range are refused at the door.

Each call raises TypeError (wrong type) or ValueError (wrong value) whose message names
the parameter and what it allows, before anything is built, trained or compiled.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedjax_sim import algorithms, runner
from fedjax_sim.models import make_model
from fedjax_sim.runner import Events


@pytest.fixture(autouse=True)
def no_compiling(monkeypatch):
    """Fails any test that reaches the jitted round: every refusal must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the run started before its arguments were checked")

    monkeypatch.setattr(runner, "_single_program", refuse)


@pytest.mark.parametrize(("args", "error", "message"), [
    (("mlp", "64", 10), TypeError, "input_shape must be a tuple of positive integers"),
    (("mlp", 64, 10), TypeError, "input_shape must be a tuple of positive integers"),
    (("mlp", (6.5,), 10), TypeError, "input_shape must be a tuple of positive integers"),
    (("mlp", (6, 0), 10), ValueError, "input_shape must be a non-empty tuple of positive"),
    (("mlp", (6,), "10"), TypeError, "num_classes must be an integer >= 2"),
    (("mlp", (6,), 2.0), TypeError, "num_classes must be an integer >= 2"),
    (("mlp", (6,), True), TypeError, "num_classes must be an integer >= 2"),
    (("mlp", (6,), 0), ValueError, "num_classes must be an integer >= 2"),
    ((["mlp"], (6,), 10), TypeError, "name must be a model name (str)"),
], ids=["shape-str", "shape-int", "shape-float", "shape-zero", "classes-str",
        "classes-float", "classes-bool", "classes-zero", "name-list"])
def test_make_model_checks_its_arguments(args, error, message):
    with pytest.raises(error) as info:
        make_model(*args)
    assert message in str(info.value)


def test_make_model_takes_numpy_shapes_and_counts():
    model = make_model("mlp", np.array([6]), np.int64(4), hidden=(8,))
    assert model.input_shape == (6,) and model.num_classes == 4


@pytest.mark.parametrize("model", ["notamodel", None, 3, [], ["mlp"]],
                         ids=["name", "none", "int", "empty-list", "list-of-names"])
def test_make_refuses_what_is_not_a_model(model):
    with pytest.raises(TypeError) as info:
        algorithms.make("fedper", model)
    assert str(info.value).startswith("model must be a fedjax_sim.models.Model")
    if isinstance(model, str):
        assert "make_model(name, input_shape, num_classes)" in str(info.value)


@pytest.fixture
def fedavg(small_data):
    model = make_model("mlp", small_data.input_shape, small_data.num_classes, hidden=(8,))
    return algorithms.make("fedavg", model, local_epochs=1), small_data


@pytest.mark.parametrize(("which", "message"), [
    ("algorithm", "algorithm must be an Algorithm (from fedjax_sim.algorithms.make), got "
                  "NoneType"),
    ("data", "data must be a FederatedData or RaggedFederatedData, got NoneType"),
    ("events", "events must be an Events or None, got dict"),
])
def test_run_checks_argument_types(fedavg, which, message):
    algorithm, data = fedavg
    kwargs = {"algorithm": algorithm, "data": data, "events": None}
    kwargs[which] = {} if which == "events" else None
    with pytest.raises(TypeError) as info:
        runner.run(kwargs["algorithm"], kwargs["data"], events=kwargs["events"], rounds=1,
                   progress=False)
    assert message in str(info.value)


@pytest.mark.parametrize("local", [
    [0.5, 0.5],                              # too few: the data has 5 clients
    [0.5] * 6,                               # too many
    [0.5, 0.5, 1.5, 0.5, 0.5],               # above 1
    [0.5, 0.5, -0.1, 0.5, 0.5],              # below 0
    [[0.5]] * 5,                             # not flat
    ["0.5"] * 5,                             # not numbers
    0.5,                                     # not a list
], ids=["short", "long", "above-1", "negative", "nested", "text", "scalar"])
def test_run_checks_local_accuracies(fedavg, local):
    algorithm, data = fedavg
    with pytest.raises(ValueError) as info:
        runner.run(algorithm, data, rounds=1, progress=False, local_accuracies=local)
    assert "local_accuracies must be a list of 5 accuracies (one per client)" in str(
        info.value)
    assert "each in [0, 1] or NaN" in str(info.value)


def test_run_accepts_local_accuracies_in_range(fedavg):
    algorithm, data = fedavg
    # NaN stands for a client without test data; the checks pass and the run starts.
    for local in ([0.0, 1.0, math.nan, 0.25, 1], np.linspace(0, 1, 5, dtype=np.float32)):
        with pytest.raises(AssertionError, match="the run started"):
            runner.run(algorithm, data, rounds=1, progress=False, local_accuracies=local)


def test_events_refuse_non_callable_handlers_and_unknown_events():
    events = Events()
    with pytest.raises(TypeError) as info:
        events.on("evaluate", 42)
    assert "handler for event 'evaluate' must be callable" in str(info.value)
    with pytest.raises(ValueError) as info:
        events.on("evaluated", print)
    assert str(info.value).startswith("event must be one of round_start, round_end")
    with pytest.raises(ValueError, match="event must be one of"):
        events.on(["evaluate"], print)
    assert events.on("evaluate", print) is events
