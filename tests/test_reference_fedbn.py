"""experiments/reference_pytorch_fedbn.py: FedAvg and FedBN on cnn_bn, PyTorch against
fedjax-sim, at a tiny size (one seed, two rounds); and the network mapping both sides start
from (same weights: same logits, and with the biased running variance the same running
statistics after a training-mode pass)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location(
        "reference_pytorch_fedbn", ROOT / "experiments" / "reference_pytorch_fedbn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_script_gives_rows_for_fedavg_and_fedbn(ref, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = ref.main(["--rounds", "2", "--seeds", "0", "--methods", "fedavg,fedbn",
                     "--json", str(out)])
    assert [row["method"] for row in rows] == ["fedavg", "fedbn"]
    for row in rows:
        assert row["alpha"] == 0.1
        for side in ("torch", "fedjax"):
            assert len(row[side]) == 1, row
            assert 0.0 <= row[side][0]["accuracy"] <= 100.0, row
    assert json.loads(out.read_text())["rows"] == rows
    printed = capsys.readouterr().out
    assert "| 0.1 | fedavg |" in printed and "| 0.1 | fedbn |" in printed


@pytest.mark.slow
def test_pytorch_network_is_fedjax_cnn_bn(ref):
    import torch

    data, model = ref.build(ref.default_spec())
    params = ref.initial_params(ref.make_algorithm("fedbn_conv", model), data, 0)
    net = ref.make_net(data.num_classes, running_var="biased")
    net.load_state_dict(ref.state_dict_of(params), strict=False)
    x = np.asarray(data.train_x[1, :33])
    xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
    net.eval()
    np.testing.assert_allclose(net(xt).detach().numpy(), model.apply(params, x), atol=1e-5)
    net.train()
    logits, new = model.train(params, x, np.ones(len(x), np.float32))
    np.testing.assert_allclose(net(xt).detach().numpy(), logits, atol=1e-4)
    for layer in ref.NORMS:
        np.testing.assert_allclose(getattr(net, layer).running_var.numpy(),
                                   new["batch_stats"][layer]["var"], rtol=1e-5, atol=1e-6)
