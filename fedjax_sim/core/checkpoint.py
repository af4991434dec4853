"""Sharded, asynchronous checkpoints of a ``SimState`` (orbax).

Every process writes the shards of the client state it holds (nothing is gathered), in
the background while the rounds go on. A checkpoint is the directory
``<directory>/<round>``: the state's leaves as one flat dict of uncompressed arrays, with
one checksum per leaf (item ``state``), and a JSON record (item ``meta``) with the
leaves' tree paths, shapes and dtypes, the PRNG key's implementation and the run's own
metadata. Orbax writes each checkpoint into
a temporary directory and renames it once complete, so an interrupted save never shows
up as a round.

Restoring places the arrays on the shardings of the current run, whatever the device or
process count of the run that saved them, and gives back the same bits.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from fedjax_sim.core.state import SimState

# Written into every checkpoint's record; a directory without it was not written here.
FORMAT = "fedjax_sim.SimState/1"


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, unreadable, foreign, or does not fit the
    state it is restored into. The message names the directory."""


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    # TensorStore appends a whole spec to its errors.
    text = text.split(" See full TensorStore details")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raw(state: SimState) -> SimState:
    """The state with its typed key replaced by the key's raw integer data."""
    return state.replace(key=jax.random.key_data(state.key))


def _leaf_records(raw: SimState) -> list[dict]:
    flat, _ = jax.tree_util.tree_flatten_with_path(raw)
    return [{"path": jax.tree_util.keystr(path), "shape": list(np.shape(leaf)),
             "dtype": str(np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else
                          np.asarray(leaf).dtype)}
            for path, leaf in flat]


def jsonable(meta: dict) -> dict:
    """``meta`` as it reads back from a checkpoint (tuples become lists, other
    non-JSON values their ``str``)."""
    return json.loads(json.dumps(meta, default=str))


class Checkpointer:
    """Keeps the latest checkpoints of a run under one directory.

    Every process of a multi-process run must create it with the same directory and call
    ``save``, ``restore``, ``wait`` and ``close`` together.

    Args:
      directory: where the checkpoints go (one subdirectory per round); created by the
        first save (a run stopped before it leaves no empty directory behind).
      async_save: write in the background; ``save`` returns once the arrays are copied
        off the devices.
      max_to_keep: how many of the latest checkpoints to keep (>= 1).
      checksums: save a checksum of every leaf with the arrays, verified on restore
        (uncompressed data read back from a damaged file is otherwise not caught). It is
        computed on the devices before ``save`` returns: negligible on an accelerator,
        about a quarter of an uncompressed write on CPU.

    Raises:
      CheckpointError: if ``directory`` cannot be used (e.g. it is a file).
      ValueError: on a bad ``max_to_keep``.
    """

    def __init__(self, directory: str | os.PathLike, *, async_save: bool = True,
                 max_to_keep: int = 2, checksums: bool = True):
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be an integer >= 1, got {max_to_keep!r}")
        self.directory = Path(directory).absolute()
        self.checksums = bool(checksums)
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint directory is not a directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=False, enable_async_checkpointing=async_save,
            # Leftovers of a save that was cut short are removed when a run starts.
            cleanup_tmp_directories=True)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options,
                # Uncompressed: float parameters shrink little under zstd, and
                # compressing made a save on CPU about twice as long.
                item_handlers={"state": ocp.PyTreeCheckpointHandler(use_compression=False),
                               "meta": ocp.JsonCheckpointHandler()})
        except Exception as err:
            raise CheckpointError(
                f"{self.directory}: cannot open checkpoint directory ({_one_line(err)})"
            ) from err

    def rounds(self) -> list[int]:
        """The rounds with a complete checkpoint, oldest first (after waiting for pending
        saves; a save that was cut short never counts).

        Raises:
          CheckpointError: if a background save failed.
        """
        self.wait()
        return sorted(self._manager.all_steps())

    def latest_round(self) -> int | None:
        """The latest round with a complete checkpoint, or ``None`` (see ``rounds``)."""
        rounds = self.rounds()
        return rounds[-1] if rounds else None

    def path(self, round: int) -> Path:
        """The directory of round ``round``'s checkpoint."""
        return self.directory / str(round)

    def save(self, round: int, state: SimState, meta: dict | None = None) -> None:
        """Starts saving ``state`` as round ``round``'s checkpoint.

        Each process writes the shards it holds. Checkpoints of round ``round`` or later
        already in the directory belong to an earlier run that went further; they are
        deleted first, so that the latest checkpoint is always the newest one. Returns
        once the arrays are copied off the devices (asynchronous) or written (not).

        Args:
          round: rounds completed by ``state`` (>= 0).
          state: the state.
          meta: JSON-able facts about the run (e.g. its configuration), given back by
            ``restore``; values JSON cannot hold are stored as their ``str``.

        Raises:
          ValueError: on a bad ``round``.
          CheckpointError: if the save could not be started.
        """
        if not isinstance(round, int | np.integer) or isinstance(round, bool) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        round = int(round)
        raw = _raw(state)
        record = {"format": FORMAT, "round": round,
                  "key_impl": str(jax.random.key_impl(state.key)),
                  "leaves": _leaf_records(raw), "checksums": self.checksums,
                  "run": jsonable(meta or {})}
        leaves = [leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
                  for leaf in jax.tree.leaves(raw)]
        arrays = {str(i): leaf for i, leaf in enumerate(leaves)}
        if self.checksums:
            # Computed on the devices, saved with the arrays: restore recomputes it.
            arrays[_CHECKSUM] = _checksums(leaves)
        stale = [r for r in self._manager.all_steps() if r >= round]
        if stale:
            self.wait()
            for r in stale:
                self._manager.delete(r)
        try:
            saved = self._manager.save(round, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(record)),
                force=True)
        except Exception as err:
            raise CheckpointError(
                f"{self.path(round)}: cannot save checkpoint ({_one_line(err)})") from err
        if not saved:
            raise CheckpointError(f"{self.path(round)}: checkpoint was not saved")

    def wait(self) -> None:
        """Blocks until every pending save is complete and durable.

        Raises:
          CheckpointError: if a background save failed.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise CheckpointError(
                f"{self.directory}: a checkpoint save failed ({_one_line(err)})") from err

    def close(self) -> None:
        """Waits for pending saves, then releases the manager's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def restore(self, template_state: SimState, shardings: SimState | None = None,
                round: int | None = None) -> tuple[SimState, dict]:
        """Reads a checkpoint back onto the current run's devices.

        Args:
          template_state: a state of the same structure, e.g. the freshly initialized
            one; its tree paths, shapes, dtypes and key implementation must match the
            checkpoint's, and its leaves' shardings are used when ``shardings`` is None.
          shardings: a ``SimState`` of shardings to place the leaves on (e.g. from
            ``runner.place``), or None.
          round: which checkpoint (``None``: the latest).

        Returns:
          ``(state, meta)``: the saved state, bit for bit, and the ``meta`` given to
          ``save``.

        Raises:
          CheckpointError: if there is no such checkpoint, or it is incomplete,
            corrupted, not a checkpoint of a ``SimState``, or of another structure.
        """
        rounds = self.rounds()
        if round is None:
            if not rounds:
                raise CheckpointError(f"{self.directory}: no complete checkpoint found")
            round = rounds[-1]
        elif round not in rounds:
            raise CheckpointError(f"{self.path(round)}: no such checkpoint (complete "
                                  f"rounds: {rounds or 'none'})")
        where = self.path(round)
        others = [r for r in rounds if r != round]
        hint = f"; other rounds: {others}" if others else ""

        record = self._record(round, hint)
        raw_template = _raw(template_state)
        expected = _leaf_records(raw_template)
        impl = str(jax.random.key_impl(template_state.key))
        _check_structure(where, record, expected, impl)

        if shardings is None:
            default = SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda leaf: getattr(leaf, "sharding", None) or default,
                                  raw_template)
        else:
            # The key's (replicated or single-device) sharding fits its raw data too.
            target = shardings
        treedef = jax.tree.structure(raw_template)
        abstract = {
            str(i): jax.ShapeDtypeStruct(tuple(rec["shape"]), np.dtype(rec["dtype"]),
                                         sharding=sharding)
            for i, (rec, sharding) in enumerate(
                zip(expected, jax.tree.leaves(target), strict=True))}
        # Records that do not say always came with checksums.
        verify = bool(record.get("checksums", True))
        if verify:
            abstract[_CHECKSUM] = jax.ShapeDtypeStruct((len(expected),), np.uint32,
                                                       sharding=target.round)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        arrays = self._read(round, {"state": ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args)}, where,
            "incomplete or corrupted checkpoint", hint)["state"]
        if not isinstance(arrays, dict) or set(arrays) != set(abstract):
            raise CheckpointError(f"{where}: incomplete checkpoint (arrays missing){hint}")
        leaves = [arrays[str(i)] for i in range(len(expected))]
        if verify:
            stored = _host(arrays[_CHECKSUM])
            actual = _host(_checksums(leaves))
            if not np.array_equal(stored, actual):
                bad = expected[int(np.flatnonzero(stored != actual)[0])]["path"]
                raise CheckpointError(f"{where}: corrupted checkpoint (checksum mismatch "
                                      f"in {bad}){hint}")
        restored = jax.tree.unflatten(treedef, leaves)
        wrap = jax.jit(lambda data: jax.random.wrap_key_data(data, impl=impl),
                       out_shardings=target.key)
        return restored.replace(key=wrap(restored.key)), record.get("run", {})

    def metadata(self, round: int) -> dict:
        """The ``meta`` given to ``save`` for round ``round``, without reading the arrays.

        Raises:
          CheckpointError: if the checkpoint is missing or its record unreadable.
        """
        if round not in self.rounds():
            raise CheckpointError(f"{self.path(round)}: no such checkpoint")
        return self._record(round, "").get("run", {})

    def _record(self, round: int, hint: str) -> dict:
        """The checkpoint's JSON record, checked to be one written here."""
        where = self.path(round)
        record = self._read(round, {"meta": ocp.args.JsonRestore()}, where,
                            "unreadable checkpoint record", hint)["meta"]
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise CheckpointError(f"{where}: not a fedjax_sim checkpoint (its record has "
                                  f"no format {FORMAT!r}){hint}")
        return record

    def _read(self, round: int, items: dict, where: Path, what: str, hint: str) -> Any:
        """``manager.restore`` of ``items``, any failure turned into a CheckpointError.

        Orbax reads the arrays concurrently: when one read fails, the reads abandoned
        with it report through ``sys.unraisablehook`` (coroutines never awaited, an event
        loop closed under them). Those reports are dropped; the error says what failed.
        """
        previous = sys.unraisablehook

        def hook(unraisable):
            if not (asyncio.iscoroutine(unraisable.object)
                    or "Event loop is closed" in str(unraisable.exc_value)):
                previous(unraisable)

        sys.unraisablehook = hook
        failure = None
        try:
            return self._manager.restore(round, args=ocp.args.Composite(**items))
        except Exception as err:
            # Kept as text: the exception's frames hold the abandoned reads.
            failure = _one_line(err)
        finally:
            if failure is not None:
                gc.collect()
                time.sleep(0.1)  # the abandoned reads' callbacks land now
            sys.unraisablehook = previous
        raise CheckpointError(f"{where}: {what} ({failure}){hint}")


# Name of the extra array holding one checksum per leaf.
_CHECKSUM = "checksum"


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A position-weighted sum of the leaf's bits, modulo 2**32: any flipped bit
    changes it, and so does the same value moved to another position (but for rare
    coincidences). Integer sums are exact in any order, so it is the same however the
    leaf is sharded."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize in (1, 2):
        unsigned = jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    else:  # 4 bytes, or 8 (gains a trailing axis of two words)
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    index = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list) -> jax.Array:
    if not leaves:
        return jnp.zeros((0,), jnp.uint32)
    return jnp.stack([_leaf_checksum(x) for x in leaves])


def _host(x: jax.Array) -> np.ndarray:
    """A replicated array's value (its local copy, in a multi-process run too)."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def _check_structure(where: Path, record: dict, expected: list[dict], impl: str) -> None:
    """Raises CheckpointError naming the first difference between the checkpoint's
    leaves and the template's."""
    saved = record.get("leaves")
    if not isinstance(saved, list):
        raise CheckpointError(f"{where}: checkpoint record lists no leaves")
    if record.get("key_impl") != impl:
        raise CheckpointError(f"{where}: structure mismatch: PRNG key implementation "
                              f"{record.get('key_impl')!r}, this run uses {impl!r}")
    for have, want in zip(saved, expected, strict=False):
        if have != want:
            raise CheckpointError(
                f"{where}: structure mismatch: checkpoint leaf {have.get('path')} "
                f"{have.get('dtype')}{have.get('shape')}, this run has {want['path']} "
                f"{want['dtype']}{want['shape']}")
    if len(saved) != len(expected):
        raise CheckpointError(f"{where}: structure mismatch: checkpoint has {len(saved)} "
                              f"leaves, this run's state has {len(expected)}")
