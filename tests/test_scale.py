"""A round's cost follows the cohort, not K: no (K, ...) copies, donated state updated in
place, temporary memory independent of K."""

from __future__ import annotations

import re

import jax
import pytest
from conftest import random_federated

from fedjax_sim import algorithms
from fedjax_sim.models import make_model
from fedjax_sim.runner import make_round_block, to_device

COHORT = 4


def compiled_round(name: str, num_clients: int):
    data = to_device(random_federated(seed=0, num_clients=num_clients, n_max=12))
    model = make_model("mlp", data.input_shape, data.num_classes, hidden=(16,))
    alg = algorithms.make(name, model, local_steps=2, batch_size=4,
                          join_ratio=COHORT / num_clients)
    state = alg.init(jax.random.key(0), data)
    return make_round_block(alg, 1).lower(state, data).compile(), state, data


@pytest.mark.parametrize("name", ["fedper", "ditto"])
def test_round_copies_no_client_state_and_updates_it_in_place(name):
    k = 96
    compiled, state, _ = compiled_round(name, k)
    hlo = compiled.as_text()
    whole = [line for line in hlo.splitlines() if re.search(rf"= f32\[{k},[^=]*\bcopy\(", line)]
    assert whole == []
    # Every (K, ...) leaf of the donated state is aliased to an output buffer.
    section = hlo[hlo.index("input_output_alias="):hlo.index("entry_computation_layout")]
    aliased = {int(i) for i in re.findall(r"\((\d+), \{\}, (?:may|must)-alias\)", section)}
    # Parameter numbers of the state's leaves, in flattening order: the clients come last.
    num_state = len(jax.tree.leaves(state))
    client_params = set(range(num_state - len(jax.tree.leaves(state.clients)), num_state))
    assert client_params <= aliased


@pytest.mark.parametrize("name", ["fedper"])
def test_round_temporaries_do_not_grow_with_k(name):
    small = compiled_round(name, 32)[0].memory_analysis().temp_size_in_bytes
    large = compiled_round(name, 512)[0].memory_analysis().temp_size_in_bytes
    # Only the O(K) cohort draw may grow (a few bytes per client), never the state.
    assert large - small < 64 * 512
