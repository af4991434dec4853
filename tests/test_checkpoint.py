"""Orbax checkpoints of the simulation state: bit-exact round trips, resume, other device
and process counts, and clear errors on damaged or foreign checkpoints."""

from __future__ import annotations

import glob
import json
import os
import shutil
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TESTS_DIR, random_federated, run_on_cpu_devices, run_two_processes

from fedjax_sim import algorithms
from fedjax_sim.core.checkpoint import Checkpointer, CheckpointError
from fedjax_sim.models import make_model
from fedjax_sim.runner import run, to_device

META = {"algorithm": "ditto", "seed": 3, "hparams": {"lr": 0.1, "sizes": (1, 2)}}


def _setup(num_clients=5):
    data = random_federated(seed=2, num_clients=num_clients)
    model = make_model("mlp", data.input_shape, data.num_classes, hidden=(16,))
    alg = algorithms.make("ditto", model, local_epochs=1, batch_size=8, join_ratio=0.6)
    return alg, data


def _advanced(state, shardings=None):
    """``state`` one step on: round + 1, another key, and every client's leaves moved by
    a different amount, so that no two clients hold the same values (a cheap stand-in
    for a round)."""

    def shift(x):
        index = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
        return x + jnp.sin(index.astype(x.dtype) + jnp.arange(x.size, dtype=x.dtype)
                           .reshape(x.shape))

    def step(state):
        return state.replace(key=jax.random.fold_in(state.key, 1), round=state.round + 1,
                             clients=jax.tree.map(shift, state.clients))

    return jax.jit(step, out_shardings=shardings)(state)


def _raw_leaves(state) -> list[jax.Array]:
    """Every leaf, the key as its raw data."""
    return jax.tree.leaves(state.replace(key=jax.random.key_data(state.key)))


def _bits(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in _raw_leaves(state)]


def _assert_same_bits(a, b):
    left, right = _bits(a), _bits(b)
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def trained():
    """A ditto state with distinct per-client parameters and an advanced key."""
    alg, data = _setup()
    data = to_device(data)
    return alg, data, _advanced(alg.init(jax.random.key(3), data))


@pytest.mark.parametrize("async_save, checksums", [(True, True), (False, True), (True, False)])
def test_round_trip_is_bit_exact_including_the_key(tmp_path, trained, async_save, checksums):
    alg, data, state = trained
    with Checkpointer(tmp_path, async_save=async_save, checksums=checksums) as ckpt:
        ckpt.save(1, state, META)
        ckpt.wait()
        assert ckpt.latest_round() == 1
    template = alg.init(jax.random.key(99), data)
    with Checkpointer(tmp_path) as ckpt:
        restored, meta = ckpt.restore(template)
    _assert_same_bits(restored, state)
    assert restored.key.dtype == state.key.dtype
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(state.key)
    # The restored key draws what the saved one would.
    np.testing.assert_array_equal(jax.random.normal(restored.key, (4,)),
                                  jax.random.normal(state.key, (4,)))
    assert int(restored.round) == 1
    assert meta == {"algorithm": "ditto", "seed": 3, "hparams": {"lr": 0.1, "sizes": [1, 2]}}


def test_keeps_the_latest_two_and_a_fresh_run_replaces_later_rounds(tmp_path, trained):
    _, _, state = trained
    with Checkpointer(tmp_path) as ckpt:
        for r in (2, 4, 6):
            ckpt.save(r, state.replace(round=state.round + r), {"r": r})
        ckpt.wait()
        assert ckpt.rounds() == [4, 6]
        # A new run writing round 4 again supersedes the earlier run's rounds 4 and 6.
        ckpt.save(4, state, {"r": "new"})
        ckpt.wait()
        assert ckpt.rounds() == [4]
        _, meta = ckpt.restore(state)
        assert meta == ckpt.metadata(4) == {"r": "new"}
        with pytest.raises(CheckpointError, match="6: no such checkpoint"):
            ckpt.metadata(6)
    assert sorted(os.listdir(tmp_path)) == ["4"]


def test_resumed_run_equals_uninterrupted(tmp_path):
    alg, data = _setup()
    kw = dict(eval_every=1, progress=False, output=tmp_path, checkpoint_every=1)
    full = run(alg, data, rounds=2, **kw)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.rounds() == [1, 2]
    # As if the run had stopped before its round-2 checkpoint.
    shutil.rmtree(tmp_path / "checkpoints" / "2")
    resumed = run(alg, data, rounds=2, resume=True, **kw)
    _assert_same_bits(resumed.state, full.state)
    assert resumed.history == [{**h, "wall_s": r["wall_s"]}
                               for h, r in zip(full.history, resumed.history, strict=True)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    # A checkpoint of another configuration is refused, naming what differs.
    with pytest.raises(ValueError, match="seed: 0 in the checkpoint, 1 now"):
        run(alg, data, rounds=3, resume=True, seed=1, **kw)


# Saves a state whose client axis is sharded over the devices, and its values.
SAVE_SHARDED = """
import jax, numpy as np
from fedjax_sim.core.checkpoint import Checkpointer
from fedjax_sim.core.state import to_host as _to_host
from fedjax_sim.runner import client_axis_mesh, mesh_context, place

alg, data = _setup(num_clients=4)
mesh = client_axis_mesh(data.num_clients)
with mesh_context(mesh):
    _, state, shardings = place(alg, data, seed=3, mesh=mesh)
    state = _advanced(state, shardings)
    with Checkpointer({out!r} + "/checkpoints") as ckpt:
        ckpt.save(1, state, {{"devices": mesh.size}})
    saved = _to_host(_raw_leaves(state))
    if jax.process_index() == 0:
        np.savez({out!r} + "/reference.npz", *saved)
# Each process holds (and writes) its own block of clients.
local_clients = sorted({{x.addressable_shards[0].data.shape[0]
                         for x in jax.tree.leaves(state.clients)}})
"""

# Restores onto this process's devices and compares with the saved values.
RESTORE = """
import jax, numpy as np
from fedjax_sim.core.checkpoint import Checkpointer
from fedjax_sim.core.state import to_host as _to_host
from fedjax_sim.runner import client_axis_mesh, mesh_context, place

alg, data = _setup(num_clients=4)
mesh = client_axis_mesh(data.num_clients)
with mesh_context(mesh):
    _, template, shardings = place(alg, data, seed=11, mesh=mesh)
    with Checkpointer({out!r} + "/checkpoints") as ckpt:
        state, meta = ckpt.restore(template, shardings)
    with np.load({out!r} + "/reference.npz") as ref:
        expected = [ref[f"arr_{{i}}"] for i in range(len(ref.files))]
    restored = _to_host(_raw_leaves(state))
    equal = all(np.array_equal(a, b) and a.dtype == b.dtype
                for a, b in zip(restored, expected, strict=True))
    client_devices = sorted({{len(x.sharding.device_set) for x in jax.tree.leaves(state.clients)}})
"""

PRELUDE = """
import json, sys
sys.path.insert(0, {tests!r})
from test_checkpoint import _advanced, _raw_leaves, _setup
"""


def test_saved_on_four_devices_restores_on_two_and_one(tmp_path):
    fmt = dict(tests=TESTS_DIR, out=str(tmp_path))
    saved = run_on_cpu_devices((PRELUDE + SAVE_SHARDED).format(**fmt) + textwrap.dedent("""
        print(json.dumps({"devices": mesh.size, "local_clients": local_clients}))
    """), 4)
    assert saved == {"devices": 4, "local_clients": [1]}
    restored = run_on_cpu_devices((PRELUDE + RESTORE).format(**fmt) + textwrap.dedent("""
        print(json.dumps({"equal": equal, "client_devices": client_devices, "meta": meta}))
    """), 2)
    assert restored == {"equal": True, "client_devices": [2], "meta": {"devices": 4}}
    # This process sees one device.
    alg, data = _setup(num_clients=4)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        state, _ = ckpt.restore(alg.init(jax.random.key(11), to_device(data)))
    with np.load(tmp_path / "reference.npz") as ref:
        expected = [ref[f"arr_{i}"] for i in range(len(ref.files))]
    for a, b in zip(_bits(state), expected, strict=True):
        np.testing.assert_array_equal(a, b)


WORKER = """
import sys
process_id, port = int(sys.argv[1]), int(sys.argv[2])
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{{port}}", num_processes=2,
                           process_id=process_id, local_device_ids=[0])
""" + PRELUDE + SAVE_SHARDED + RESTORE + """
print("RESULT " + json.dumps({{"equal": equal, "processes": jax.process_count(),
                               "local_clients": local_clients}}), flush=True)
"""


def test_two_processes_save_their_shards_and_restore(tmp_path):
    script = WORKER.format(tests=TESTS_DIR, out=str(tmp_path))
    for text in run_two_processes(script, tmp_path):
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        assert lines, text[-3000:]
        assert json.loads(lines[-1][len("RESULT "):]) == {
            "equal": True, "processes": 2, "local_clients": [2]}
    # Both processes wrote their shards; one process alone reads the whole state back.
    assert len(glob.glob(str(tmp_path / "checkpoints/1/state/ocdbt.process_*"))) == 2
    alg, data = _setup(num_clients=4)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        state, meta = ckpt.restore(alg.init(jax.random.key(11), to_device(data)))
    assert meta == {"devices": 2}
    with np.load(tmp_path / "reference.npz") as ref:
        expected = [ref[f"arr_{i}"] for i in range(len(ref.files))]
    for a, b in zip(_bits(state), expected, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def saved(tmp_path, trained):
    """A directory holding complete checkpoints of rounds 1 and 2."""
    state = trained[2]
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, {})
        ckpt.save(2, state.replace(round=state.round + 1), {})
    return tmp_path / "ckpt", state


def _data_files(step_dir: Path) -> list[str]:
    return glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)


def _truncate(step_dir, state):
    # Which file holds which array varies between saves: cut every one short.
    for path in _data_files(step_dir):
        os.truncate(path, os.path.getsize(path) // 2)


def _garbage(step_dir, state):
    for path in _data_files(step_dir):
        Path(path).write_bytes(np.random.default_rng(0).bytes(os.path.getsize(path)))


def _flip_one_bit(step_dir, state):
    # One bit inside a client's stored weights (arrays are stored raw), so that only
    # the checksums can notice.
    weights = np.asarray(state.clients["params"]["fc1"]["kernel"]).tobytes()
    for name in _data_files(step_dir):
        path = Path(name)
        raw = bytearray(path.read_bytes())
        at = raw.find(weights)
        if at >= 0:
            raw[at + len(weights) // 2] ^= 0x10
            path.write_bytes(bytes(raw))
            return
    raise AssertionError("the weights were not found in the checkpoint's data files")


def _drop_arrays(step_dir, state):
    shutil.rmtree(step_dir / "state")


def _garbage_record(step_dir, state):
    (step_dir / "meta" / "metadata").write_text("{not json")


def _foreign(step_dir, state):
    shutil.rmtree(step_dir)
    step_dir.mkdir()
    (step_dir / "weights.bin").write_bytes(b"\x00" * 64)


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "corrupted checkpoint"),
    (_garbage, "corrupted checkpoint"),
    (_flip_one_bit, "checksum mismatch in .clients['params']['fc1']['kernel']"),
    (_drop_arrays, "incomplete or corrupted checkpoint"),
    (_garbage_record, "unreadable checkpoint record"),
    (_foreign, "unreadable checkpoint record"),
])
def test_damaged_checkpoint_raises_checkpoint_error_naming_it(saved, capfd, damage, reason):
    directory, state = saved
    damage(directory / "2", state)
    with Checkpointer(directory) as ckpt, pytest.raises(CheckpointError) as info:
        ckpt.restore(state)
    message = str(info.value)
    assert message.startswith(f"{directory / '2'}: ") and reason in message
    assert "other rounds: [1]" in message and "\n" not in message
    # No traceback of the abandoned concurrent reads reaches the terminal.
    assert "Traceback" not in capfd.readouterr().err
    # The earlier round is still there to fall back on.
    with Checkpointer(directory) as ckpt:
        _assert_same_bits(ckpt.restore(state, round=1)[0], state)


def test_missing_checkpoint_raises(tmp_path, trained):
    _, _, state = trained
    with Checkpointer(tmp_path / "none") as ckpt:
        assert ckpt.latest_round() is None
        assert not (tmp_path / "none").exists()  # nothing is created before a save
        with pytest.raises(CheckpointError, match=f"^{tmp_path / 'none'}: no complete"):
            ckpt.restore(state)
        with pytest.raises(CheckpointError, match="7: no such checkpoint"):
            ckpt.restore(state, round=7)
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="file: checkpoint directory is not a dir"):
        Checkpointer(tmp_path / "file")


def test_half_written_checkpoint_is_not_a_round(saved):
    directory, state = saved
    # What a save cut short leaves: the step's temporary directory, never renamed.
    shutil.copytree(directory / "2", directory / "3.orbax-checkpoint-tmp")
    with Checkpointer(directory) as ckpt:
        assert ckpt.rounds() == [1, 2]
        assert int(ckpt.restore(state)[0].round) == int(state.round) + 1


def test_structure_mismatch_names_the_leaf(saved, trained):
    directory, _ = saved
    alg, _, _ = trained
    other = alg.init(jax.random.key(0), to_device(random_federated(seed=2, num_clients=6)))
    with Checkpointer(directory) as ckpt, pytest.raises(
            CheckpointError, match=r"2: structure mismatch: .*clients.*\[5, .*\[6, "):
        ckpt.restore(other)
    data = to_device(random_federated(seed=2))
    model = make_model("mlp", data.input_shape, data.num_classes, hidden=(16,))
    fedavg = algorithms.make("fedavg", model, local_epochs=1, batch_size=8)
    with Checkpointer(directory) as ckpt, pytest.raises(CheckpointError, match="mismatch"):
        ckpt.restore(fedavg.init(jax.random.key(0), data))
