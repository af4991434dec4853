"""The paper settings of experiments/settings/*.toml parse, pass every check and build
(data, model, algorithm) on fixture files in the published formats, or on tfds' mock
data for the tfds sources."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from natural_fixtures import write_tff

from fedjax_sim.config import expand, load_config
from fedjax_sim.spec import build

SETTINGS = sorted((Path(__file__).resolve().parent.parent / "experiments" / "settings")
                  .glob("*.toml"))


def _built(specs):
    """One spec per algorithm, built; its state's shapes derived without running."""
    seen = {}
    for spec in specs:
        if spec.algorithm in seen:
            continue
        built = build(spec)
        shape = jax.eval_shape(lambda d, b=built: b.algorithm.init(jax.random.key(0), d),
                               built.data)
        seen[spec.algorithm] = (built, shape)
    return seen


@pytest.mark.parametrize("path", [p for p in SETTINGS if "reddi" in p.name],
                         ids=lambda p: p.name)
def test_natural_settings_build_on_fixture_files(path, tmp_path, monkeypatch):
    for name in ("emnist", "shakespeare", "stackoverflow"):
        write_tff(tmp_path / "data" / "tff", name, scale=3)
    monkeypatch.chdir(tmp_path)
    specs = expand(load_config(path))
    assert {s.partition for s in specs} == {"natural"}
    for name, (built, _) in _built(specs).items():
        assert built.model.name == specs[0].model, name
        assert built.data.layout == "ragged"


@pytest.mark.parametrize("path", [p for p in SETTINGS if "reddi" not in p.name],
                         ids=lambda p: p.name)
def test_tfds_settings_build_on_mock_data(path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=400):
        specs = expand(load_config(path), check=False)
        built = _built([s.replace(num_clients=min(s.num_clients or 10, 10)) for s in specs])
    assert {b.model.name for b, _ in built.values()} == {"cnn"}
    assert {b.data.num_clients for b, _ in built.values()} == {10}
