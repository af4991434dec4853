"""Memory is checked before any data is generated or loaded: a refusal (exit 5, one line)
that names the option to change, never an allocation failure or an OOM kill."""

from __future__ import annotations

import time

import pytest

from fedjax_sim import safety
from fedjax_sim.cli import main
from fedjax_sim.data import make_federated_data


@pytest.mark.parametrize("clients", ["1000000", "5000000"])
def test_a_million_client_synthetic_set_is_refused_before_it_is_generated(
        tmp_path, capsys, clients):
    tic = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--dataset", "synthetic", "--partition", "natural", "--num-clients",
              clients, "--output", str(tmp_path / "run"), "--no-progress"])
    assert exit_info.value.code == safety.EXIT_OUT_OF_MEMORY
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "host memory" in err[0] and "--num-clients" in err[0]
    # Counts only: nothing of the ~100 GiB was generated.
    assert time.perf_counter() - tic < 30
    assert not (tmp_path / "run").exists()


def test_padded_refused_where_ragged_fits_and_the_message_says_so(monkeypatch):
    # 300 natural synthetic clients: the largest has ~25,000 samples, most a few hundred.
    monkeypatch.setattr(safety, "host_memory_available", lambda: 600 * 2**20)
    with pytest.raises(safety.OutOfMemoryError, match="--data-layout ragged"):
        make_federated_data("synthetic", partition="natural", num_clients=300,
                            layout="padded")
    data, _, _ = make_federated_data("synthetic", partition="natural", num_clients=300,
                                     layout="auto")
    assert data.layout == "ragged" and data.num_clients == 300


def test_the_estimate_matches_what_is_built():
    from fedjax_sim.data.scale import estimate_source_bytes

    for layout in ("padded", "ragged"):
        data, _, pooled = make_federated_data("synthetic", partition="natural",
                                              num_clients=40, layout=layout)
        _, estimate = estimate_source_bytes("synthetic", {}, partition="natural",
                                            num_clients=40, test_ratio=0.25, layout=layout)
        built = sum(leaf.nbytes for leaf in (data.train_x, data.train_y, data.test_x,
                                             data.test_y))
        assert estimate.exact and estimate.data_bytes >= built
        assert estimate.data_bytes <= 1.01 * built + 4096
        assert estimate.source_bytes == pooled.x.nbytes + pooled.y.nbytes + \
            pooled.groups.nbytes
