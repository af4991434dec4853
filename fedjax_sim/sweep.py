"""Sweeps: many experiment specs run in one process, written as they finish, resumable.

:func:`run_sweep` takes the specs of a grid (``config.expand``), groups those that can
share one compiled program (:func:`group_specs`), runs each group and writes, in the
sweep folder::

    grid.json                      the resolved grid: every configuration, its seeds, spec
    results.jsonl                  one line per finished (configuration, seed)
    results.md                     mean ± std over seeds per configuration; best marked
    curves.png                     accuracy against rounds, a band over the seeds
    <config>/seed<s>/summary.json  per (configuration, seed), with metrics.jsonl

A configuration is a spec without its seed; its folder name reads the values that vary
in the grid and ends with a hash of every setting (``fedavg_lr0.05-1a2b3c4d``). Rerunning
into the same folder skips every (configuration, seed) whose summary.json says
``complete`` or ``diverged`` (the same seed diverges again), so an interrupted sweep
resumes where it stopped; a diverged configuration is marked and the others go on.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedjax_sim import algorithms
from fedjax_sim.checks import check_seed
from fedjax_sim.rundir import (
    OutputError,
    RunDir,
    atomic_write_json,
    atomic_write_text,
    default_output,
    environment,
    preflight,
    read_jsonl,
    write_jsonl,
)
from fedjax_sim.spec import (
    ExperimentSpec,
    build,
    build_clock,
    build_data,
    check_spec,
    local_accuracies,
    mean_std,
    run_built,
    wants_public,
)

# A (configuration, seed) is finished, and skipped on a rerun, in these states.
FINISHED = ("complete", "diverged")
GRID_FILE = "grid.json"
RESULTS_FILE = "results.jsonl"
# Longest readable part of a configuration's folder name (the hash follows it).
_MAX_NAME = 60


class Group(NamedTuple):
    """Specs run by one program.

    Attributes:
      specs: the specs, in grid order.
      batched: one ``runner.sweep`` program over every spec (each its seed, split and
        traced hyperparameters); else one ``runner.run`` of its single spec.
    """

    specs: tuple[ExperimentSpec, ...]
    batched: bool


class SweepResult(NamedTuple):
    """What a sweep left in its folder.

    Attributes:
      output: the sweep folder.
      records: one results.jsonl record per finished (configuration, seed), grid order.
      ran: how many (configuration, seed) pairs ran now.
      skipped: how many were finished already and skipped.
    """

    output: Path
    records: list[dict]
    ran: int
    skipped: int


def data_key(spec: ExperimentSpec) -> str:
    """The settings that decide ``spec``'s data (and public set): specs with equal keys
    share one ``build_data``."""
    fields = ("dataset", "data_dir", "partition", "alpha", "num_clients", "min_samples",
              "shards_per_client", "classes_per_client", "test_ratio", "partition_file",
              "public_fraction", "public_dataset", "public_size", "public_val_fraction",
              "data_layout", "max_examples", "val_fraction", "eval_split")
    record = {f: getattr(spec, f) for f in fields}
    record.update(data_seed=None if spec.partition_file else spec.data_seed,
                  public=wants_public(spec))
    return json.dumps(record, sort_keys=True, default=str)


# Settings that only choose the split: specs that differ in them share a program (each
# configuration reads its own split, ``runner.stack_splits``).
SPLIT_FIELDS = ("partition", "alpha", "min_samples", "shards_per_client",
                "classes_per_client", "test_ratio", "partition_seed", "partition_file",
                "save_partition", "val_fraction", "eval_split")


def program_key(spec: ExperimentSpec) -> str | None:
    """What the specs of one compiled program share, or None for a spec that runs alone.

    One program (``runner.sweep``) advances configurations that differ in their seed,
    their split of the data (partition settings and seed) and their traced
    hyperparameters (``algorithms.traced_names``: learning rates, momentum, FedOBP's
    ig_ratio, Ditto's λ, ...). The structure must be the same: algorithm, model, data
    set and client count, the other hyperparameters, the loop settings and the virtual
    clock (system model, condition and its settings; a lognormal system is drawn from the
    seed, so its seeds do not share one). Algorithms with public data, several
    architectures or checkpoints run alone.
    """
    if (algorithms.uses_public(spec.algorithm) or spec.architectures is not None
            or spec.checkpoint_every):
        return None
    identity = spec.identity()
    if spec.system != "lognormal":
        # A drawn system model (lognormal) is drawn from the seed: each seed its own clock,
        # its own program; the other clock settings are static and shared.
        identity.pop("seed")
    for field in SPLIT_FIELDS:
        identity.pop(field, None)
    # The privacy budget sets σ (traced) before the run and nothing in the program.
    traced = set(algorithms.traced_names(spec.algorithm)) | {"dp_target_epsilon"}
    identity["hparams"] = {k: v for k, v in identity["hparams"].items() if k not in traced}
    identity.update(rounds_per_call=spec.rounds_per_call, devices=spec.devices,
                    sweep_strategy=spec.sweep_strategy, on_divergence=spec.on_divergence)
    return json.dumps(identity, sort_keys=True, default=str)


def group_specs(specs: Sequence[ExperimentSpec]) -> list[Group]:
    """Groups the specs that can share one compiled program (equal :func:`program_key`);
    a group of one spec, and a spec without a key, runs alone. Groups come in the order
    of their first spec.

    Returns:
      The groups; every spec is in exactly one.
    """
    keyed: dict[str, list[ExperimentSpec]] = {}
    order: list[str | ExperimentSpec] = []
    for spec in specs:
        key = program_key(spec)
        if key is None:
            order.append(spec)
        else:
            if key not in keyed:
                order.append(key)
            keyed.setdefault(key, []).append(spec)
    groups = []
    for entry in order:
        members = keyed[entry] if isinstance(entry, str) else [entry]
        groups.append(Group(tuple(members), len(members) > 1))
    return groups


# ---- names and records --------------------------------------------------------------------


def varying(specs: Sequence[ExperimentSpec]) -> list[str]:
    """The keys (fields and hyperparameters, not the seed or the algorithm) whose values
    differ between ``specs``, in first-seen order."""
    seen: dict[str, set] = {}
    count: dict[str, int] = {}
    for spec in specs:
        for key, value in spec.values().items():
            # compare_local reads in the algorithm: a grid's Local reference runs are local.
            if key in ("seed", "algorithm", "progress", "output", "overwrite",
                       "compare_local"):
                continue
            seen.setdefault(key, set()).add(json.dumps(value, default=str))
            count[key] = count.get(key, 0) + 1
    return [k for k, v in seen.items() if len(v) > 1 or count[k] < len(specs)]


def _text(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.=+-]", "_", text)


def config_name(spec: ExperimentSpec, keys: Iterable[str]) -> str:
    """The folder name of ``spec``'s configuration: the algorithm and the values of
    ``keys`` it sets, then the configuration hash."""
    values = spec.values()
    parts = [spec.algorithm] + [f"{k}{_text(values[k])}" for k in keys if k in values]
    readable = "_".join(parts)[:_MAX_NAME]
    return f"{readable}-{spec.config_hash()}"


def _summary_status(summary: dict) -> tuple[str, int | None]:
    status = summary.get("status", "unknown")
    diverged = summary.get("diverged_at")
    if diverged is None and isinstance(summary.get("diverged"), dict):
        diverged = summary["diverged"].get("round")
    return status, diverged


def make_record(spec: ExperimentSpec, name: str, keys: Sequence[str], summary: dict,
                path: str) -> dict:
    """The results.jsonl record of one finished (configuration, seed)."""
    status, diverged_at = _summary_status(summary)
    values = spec.values()
    complete = status == "complete"
    record = {
        "config": name, "algorithm": spec.algorithm, "seed": spec.seed,
        "values": {k: values[k] for k in keys if k in values},
        "lr": spec.resolved_hparams()["lr"], "status": status,
    }
    for key in ("accuracy", "client_mean_accuracy", "client_p10", "hurt_fraction", "ipr",
                "ipr_strict", "tie_fraction"):
        if key in summary or key == "accuracy":
            record[key] = summary.get(key) if complete else None
    if diverged_at is not None:
        record["diverged_at"] = diverged_at
    if "bytes_up" in summary:
        record["bytes_up"] = summary["bytes_up"]
    for key in ("dp_epsilon", "dp_delta", "dp_noise_multiplier"):  # privacy.SPENT
        if key in summary:
            record[key] = summary[key]
    record.update(rounds=summary.get("rounds", spec.rounds),
                  wall_s=summary.get("wall_s", summary.get("sweep_wall_s")), path=path)
    return record


def _shared(specs: list[dict]) -> dict:
    """The settings every one of ``specs`` has alike."""
    first = specs[0] if specs else {}
    return {k: v for k, v in first.items() if all(s.get(k) == v for s in specs)}


def _check_extends(out: Path, configs: dict[str, dict]) -> None:
    """Refuses a grid that does not hold every (configuration, seed) of the sweep already
    in ``out``: adding configurations or seeds continues it, anything else would replace
    its tables."""
    path = out / GRID_FILE
    try:
        old = json.loads(path.read_text())
        pairs = {(c["config_hash"], int(s)) for c in old["configs"] for s in c["seeds"]}
        old_shared = _shared([c["spec"] for c in old["configs"]])
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise OutputError(f"--output {out}: {path} is not a sweep's grid (torn or edited); "
                          "restore it, give a new folder, or --overwrite to replace the "
                          "sweep") from None
    new = {(h, s) for h, c in configs.items() for s in c["seeds"]}
    if pairs <= new:
        return
    shared = _shared([c["spec"] for c in configs.values()])
    changed = [f"{k} {old_shared[k]!r} there, {shared[k]!r} here"
               for k in sorted(set(old_shared) & set(shared)) if old_shared[k] != shared[k]]
    detail = "; ".join(changed[:4]) if changed else (
        f"{len(pairs - new)} of its runs are not in this grid")
    raise OutputError(
        f"--output {out}: holds a sweep over another grid ({detail}); a sweep continues "
        "only by adding configurations or seeds: give a new folder, or --overwrite to "
        "replace it")


def _finished(out: Path) -> dict[tuple[str, int], tuple[Path, dict]]:
    """Every finished (configuration hash, seed) in ``out``, from the summaries there; a
    summary that does not parse counts as unfinished."""
    found = {}
    for path in sorted(out.glob("*/seed*/summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(summary, dict) or summary.get("status") not in FINISHED:
            continue
        key = (summary.get("config_hash"), summary.get("seed"))
        if None not in key:
            found[key] = (path.parent, summary)
    return found


# ---- running ------------------------------------------------------------------------------


class _Splits:
    """The splits of the group run last, by :func:`data_key`: the next group reuses those
    it shares (a comparison's algorithms all run on the same splits) and the others are
    freed before new ones are built."""

    def __init__(self):
        self.held: dict[str, tuple] = {}

    def get(self, specs: Sequence[ExperimentSpec]) -> list[tuple]:
        """``(data, public)`` of every spec, built once per distinct data key."""
        keys = [data_key(spec) for spec in specs]
        self.held = {k: v for k, v in self.held.items() if k in keys}
        for key, spec in zip(keys, specs, strict=True):
            if key not in self.held:
                self.held[key] = build_data(spec)
        return [self.held[key] for key in keys]


def _tags(spec: ExperimentSpec, name: str, keys: Sequence[str]) -> dict:
    values = spec.values()
    return {"config": name, "config_hash": spec.config_hash(), "spec": spec.to_dict(),
            "values": {k: values[k] for k in keys if k in values}}


def _shared_local(spec: ExperimentSpec, built, locals_: dict) -> list[float] | None:
    """The Local reference's accuracies, run once per split and Local setting."""
    if built.local is None:
        return None
    key = json.dumps([data_key(spec), spec.seed, spec.rounds, spec.eval_every, spec.model,
                      spec.init, spec.architectures,
                      sorted(built.local.algorithms[0].hparams.items())], default=str)
    if key not in locals_:
        locals_[key] = local_accuracies(built)
    return locals_[key]


def _run_single(spec, built, folder: Path, tags: dict, local, resume_hint) -> dict:
    """One (configuration, seed) with ``runner.run`` into ``folder``; a stopped run with a
    checkpoint resumes from it."""
    from fedjax_sim.runner import ResumeError
    from fedjax_sim.safety import DivergedError

    previous = {}
    try:
        previous = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    resume = (isinstance(previous, dict) and previous.get("status") == "stopped"
              and (folder / "checkpoints").is_dir())
    kwargs = dict(output=folder, local=local, extra_summary=tags, resume_hint=resume_hint)
    try:
        try:
            return run_built(built, overwrite=not resume, resume=resume, **kwargs).summary
        except ResumeError:
            return run_built(built, overwrite=True, resume=False, **kwargs).summary
    except DivergedError as error:
        try:
            return json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            return {**tags, "status": "diverged", "algorithm": spec.algorithm,
                    "seed": spec.seed, "diverged_at": error.round}


def _run_batched(group: Group, splits: list[tuple], folders: list[Path], tags: list[dict],
                 env: dict, local: list | None) -> list[dict]:
    """A group as one ``runner.sweep`` program: every spec its own seed, split and traced
    hyperparameters; writes each spec's folder as it goes.

    ``local``: per spec, the accuracies of its Local reference, run before in the grid
    (None: no reference, or one that diverged).
    """
    from fedjax_sim import runner

    specs = group.specs
    first = specs[0]
    distinct, split_of = [], []
    for data, _public in splits:
        if not any(data is d for d in distinct):
            distinct.append(data)
        split_of.append(next(i for i, d in enumerate(distinct) if d is data))
    built = build(first, data=distinct[0])
    traced = set(algorithms.traced_names(first.algorithm))
    configs = [{"seed": spec.seed, "split": split_of[i],
                **{k: v for k, v in spec.resolved_hparams().items() if k in traced}}
               for i, spec in enumerate(specs)]
    if local is not None and any(reference is None for reference in local):
        local = None  # a reference that diverged leaves the group without incentives
    extras = [{**built.extra_summary, "data_seed": None if spec.partition_file
               else spec.data_seed, **tag} for spec, tag in zip(specs, tags, strict=True)]
    records = [{"identity": spec.identity(), "options": spec.values(), "environment": env}
               for spec in specs]
    summaries = runner.sweep(
        first.algorithm, built.model, distinct, configs=configs, rounds=first.rounds,
        eval_every=first.eval_every, hparams=first.resolved_hparams(), outputs=folders,
        overwrite=True, rounds_per_call=first.rounds_per_call,
        config_strategy=first.sweep_strategy, progress=first.progress, devices=first.devices,
        local_accuracies=local, extra_summaries=extras, config_records=records,
        on_divergence=first.on_divergence, clock=build_clock(first, distinct[0].num_clients))
    for summary in summaries:
        summary.pop("history")
    return summaries


# ---- plan -> group -> execute -> report ---------------------------------------------------


class Plan(NamedTuple):
    """A checked grid, ready to run.

    Attributes:
      specs: every (configuration, seed), checked, in grid order.
      keys: the options whose values vary between configurations.
      names: each configuration's folder name, by configuration hash.
      configs: grid.json's configurations, by configuration hash.
      references: for each (configuration hash, seed) measured against a Local reference,
        the (configuration hash, seed) of that reference's run in the grid.
    """

    specs: list[ExperimentSpec]
    keys: list[str]
    names: dict[str, str]
    configs: dict[str, dict]
    references: dict[tuple[str, int], tuple[str, int]]

    def reference_runs(self) -> set[tuple[str, int]]:
        return set(self.references.values())


def local_reference(spec: ExperimentSpec) -> ExperimentSpec:
    """The Local run ``spec`` is measured against (``compare_local``): the same data,
    split, seed, loop and the hyperparameters Local takes, without the virtual clock."""
    from fedjax_sim.spec import CLOCK_FIELDS, local_hparams

    return spec.replace(algorithm="local", hparams=local_hparams(spec), compare_local=False,
                        **dict.fromkeys(CLOCK_FIELDS))


def _with_references(specs: list[ExperimentSpec], reference: str | None
                     ) -> tuple[list[ExperimentSpec], dict]:
    """The grid with the Local references its runs are measured against, and the map
    from each measured run to its reference's run.

    ``reference``: the grid's own algorithm every other run of the same data and seed is
    measured against (a comparison's ``local``). Otherwise a spec with ``compare_local``
    gets :func:`local_reference`, added to the grid (once) where it is not already;
    several architectures keep their Local references in memory (one per architecture,
    ``spec.local_accuracies``).
    """
    references = {}
    if reference is not None:
        own = {(data_key(s), s.seed): (s.config_hash(), s.seed) for s in specs
               if s.algorithm == reference}
        for spec in specs:
            key = (data_key(spec), spec.seed)
            if spec.algorithm != reference and key in own:
                references[(spec.config_hash(), spec.seed)] = own[key]
        return specs, references
    present = {(s.config_hash(), s.seed) for s in specs}
    added = []
    for spec in specs:
        if not spec.compare_local or spec.architectures is not None:
            continue
        local = check_spec(local_reference(spec))
        pair = (local.config_hash(), local.seed)
        references[(spec.config_hash(), spec.seed)] = pair
        if pair not in present:
            present.add(pair)
            added.append(local)
    return added + specs, references


def plan(specs: Sequence[ExperimentSpec], *, by_algorithm: bool = False,
         reference: str | None = None) -> Plan:
    """The grid of ``specs`` checked (once per configuration), with the Local references
    its runs are measured against, and named; refuses an empty grid and a
    (configuration, seed) twice.

    Args:
      by_algorithm: name each configuration by its algorithm alone (a comparison: one
        configuration per algorithm); else by the algorithm, the values that vary and
        the configuration hash (:func:`config_name`).
      reference: the algorithm of the grid whose runs are the others' Local reference
        (a comparison: ``"local"``); without it, each spec with ``compare_local`` gets
        its Local reference as a run of the grid (:func:`local_reference`).
    """
    if not specs:
        raise ValueError("a sweep needs at least one configuration")
    memo: dict[str, ExperimentSpec] = {}
    checked = []
    for spec in specs:
        template = spec.replace(seed=0)  # settings are checked once per configuration
        key = json.dumps(template.to_dict(), sort_keys=True, default=repr)
        if key not in memo:
            memo[key] = check_spec(template)
        checked.append(memo[key].replace(seed=check_seed("seed", spec.seed)))
    checked, references = _with_references(checked, reference)
    keys = varying(checked)
    names = {spec.config_hash(): spec.algorithm if by_algorithm else config_name(spec, keys)
             for spec in checked}
    if len(set(names.values())) < len(names):
        raise ValueError("a comparison takes one configuration per algorithm")
    seen: set[tuple[str, int]] = set()
    for spec in checked:
        pair = (spec.config_hash(), spec.seed)
        if pair in seen:
            raise ValueError(f"{names[pair[0]]} seed {spec.seed} is in the grid twice")
        seen.add(pair)
    return Plan(checked, keys, names, _grid_configs(checked, keys, names), references)


def _grid_configs(specs: list[ExperimentSpec], keys: list[str], names: dict[str, str]
                  ) -> dict[str, dict]:
    """grid.json's configurations: name, hash, varying values, seeds and settings."""
    configs: dict[str, dict] = {}
    for spec in specs:
        entry = configs.setdefault(spec.config_hash(), {
            "config": names[spec.config_hash()], "config_hash": spec.config_hash(),
            "algorithm": spec.algorithm,
            "values": {k: v for k, v in spec.values().items() if k in keys},
            "seeds": [], "spec": {k: v for k, v in spec.to_dict().items() if k != "seed"}})
        entry["seeds"].append(spec.seed)
    return configs


def run_sweep(
    specs: Sequence[ExperimentSpec],
    *,
    output: str | Path | None = None,
    overwrite: bool = False,
    on_result: Callable[[dict], None] | None = None,
    log: Callable[[str], None] | None = None,
    resume_hint: str | None = None,
    options: dict | None = None,
) -> SweepResult:
    """Runs every spec, writing each (configuration, seed) as it finishes.

    Args:
      specs: the grid (``config.expand``); checked again here.
      output: the sweep folder (default a new ``runs/sweep-<dataset>-<time>``). A folder
        holding a sweep (grid.json) is continued, skipping every finished (configuration,
        seed); another non-empty folder is refused unless ``overwrite``, which empties a
        fedjax-sim folder first. A lock keeps other processes out while the sweep runs.
      overwrite: start afresh in ``output``.
      on_result: called with each results.jsonl record as its run finishes.
      log: called with a line of progress now and then (e.g. ``print`` to stderr).
      resume_hint: the command that continues the sweep, printed if a signal stops it.
      options: recorded in grid.json (e.g. the command line's settings).

    Returns:
      A :class:`SweepResult`.

    Raises:
      ValueError: a bad spec, the same configuration and seed twice, an unusable folder.
      fedjax_sim.safety.StoppedError: SIGINT or SIGTERM during a run (rerun to resume).
    """
    grid = plan(specs)
    out = Path(output) if output is not None else default_output("sweep", grid.specs[0].dataset)
    continuing = (out / GRID_FILE).is_file() and not overwrite
    preflight(out, resume=continuing, overwrite=overwrite)
    if continuing:
        _check_extends(out, grid.configs)
    with RunDir(out, resume=continuing, overwrite=overwrite):
        return execute(grid, out, continuing=continuing, on_result=on_result, log=log,
                       resume_hint=resume_hint, options=options)


def execute(grid: Plan, out: Path, *, continuing: bool = False,
            on_result: Callable[[dict], None] | None = None,
            log: Callable[[str], None] | None = None, resume_hint: str | None = None,
            options: dict | None = None) -> SweepResult:
    """Runs a planned grid in ``out``, a folder the caller holds (``RunDir``): writes
    grid.json, skips what is finished when ``continuing``, runs the groups, and reports
    (results.jsonl, results.md, curves.png).

    The Local references of the plan (:attr:`Plan.references`) run first; every run
    measured against one gets its per-client accuracies (hurt fraction, IPR), or none when
    it diverged.
    """
    log = log or (lambda _line: None)
    env = environment()
    atomic_write_json(out / GRID_FILE, {
        "axes": {k: list(dict.fromkeys(s.values()[k] for s in grid.specs
                                       if k in s.values())) for k in grid.keys},
        "configs": list(grid.configs.values()), "runs": len(grid.specs),
        "options": options or {}, "environment": env})
    executor = _Executor(grid, out, env, on_result, resume_hint)
    pending = executor.skip_finished(_finished(out) if continuing else {})
    skipped = len(executor.records)
    write_jsonl(out / RESULTS_FILE, list(executor.records.values()))
    groups = group_specs(pending)
    # The references first (a stable sort keeps the grid order).
    firsts = grid.reference_runs()
    groups.sort(key=lambda g: (g.specs[0].config_hash(), g.specs[0].seed) not in firsts)
    if skipped:
        log(f"{skipped} of {_count(len(grid.specs), 'run')} already finished in {out}: "
            "skipped")
    if pending:
        batched = sum(len(g.specs) for g in groups if g.batched)
        log(f"{_count(len(pending), 'run')} to do in {_count(len(groups), 'program')} "
            f"({batched} batched over seeds, splits and traced hyperparameters)")
    for group in groups:
        executor.run(group)
    return report(grid, out, executor.records, skipped, log)


class _Executor:
    """Runs groups of a planned grid into their folders and records each result as it
    comes (results.jsonl rewritten after every run, so that nothing finished is lost)."""

    def __init__(self, grid: Plan, out: Path, env: dict,
                 on_result: Callable[[dict], None] | None, resume_hint: str | None):
        self.grid, self.out, self.env = grid, out, env
        self.on_result, self.resume_hint = on_result, resume_hint
        self.firsts = grid.reference_runs()
        self.records: dict[tuple[str, int], dict] = {}
        self.order: list[dict] = []
        self.splits = _Splits()
        # Several architectures' references, in memory.
        self.locals: dict[str, list[float]] = {}
        self.accuracies: dict[tuple[str, int], list[float] | None] = {}

    def folder(self, spec: ExperimentSpec) -> Path:
        return self.out / self.grid.names[spec.config_hash()] / f"seed{spec.seed}"

    def skip_finished(self, finished: dict) -> list[ExperimentSpec]:
        """Records the finished runs; returns the specs still to run."""
        pending = []
        for spec in self.grid.specs:
            pair = (spec.config_hash(), spec.seed)
            if pair in finished:
                self.record(spec, finished[pair][1], finished[pair][0], announce=False)
            else:
                pending.append(spec)
        return pending

    def record(self, spec: ExperimentSpec, summary: dict, folder: Path, *,
               announce: bool = True) -> None:
        pair = (spec.config_hash(), spec.seed)
        record = make_record(spec, self.grid.names[pair[0]], self.grid.keys, summary,
                             str(folder.relative_to(self.out)))
        self.records[pair] = record
        self.order.append(record)
        if pair in self.firsts:
            self.accuracies[pair] = (summary.get("client_accuracies")
                                     if record["status"] == "complete" else None)
        if announce:
            write_jsonl(self.out / RESULTS_FILE, self.order)
            if self.on_result is not None:
                self.on_result(record)

    def local(self, spec: ExperimentSpec) -> list[float] | None:
        """The per-client accuracies of ``spec``'s Local reference (None without one, or
        when it diverged)."""
        pair = self.grid.references.get((spec.config_hash(), spec.seed))
        return None if pair is None else self.accuracies.get(pair)

    def measured(self, spec: ExperimentSpec) -> bool:
        return (spec.config_hash(), spec.seed) in self.grid.references

    def run(self, group: Group) -> None:
        specs = group.specs
        folders = [self.folder(spec) for spec in specs]
        tags = [_tags(s, self.grid.names[s.config_hash()], self.grid.keys) for s in specs]
        splits = self.splits.get(specs)
        if group.batched:
            local = ([self.local(s) for s in specs] if self.measured(specs[0]) else None)
            summaries = _run_batched(group, splits, folders, tags, self.env, local)
            for spec, summary, folder in zip(specs, summaries, folders, strict=True):
                self.record(spec, summary, folder)
            return
        spec, (data, public) = specs[0], splits[0]
        built = build(spec, data=data, public=public)
        if self.measured(spec):  # its reference ran in the grid (None: it diverged)
            built, local = built._replace(local=None), self.local(spec)
        else:
            local = _shared_local(spec, built, self.locals)
        summary = _run_single(spec, built, folders[0], tags[0], local, self.resume_hint)
        self.record(spec, summary, folders[0])


def report(grid: Plan, out: Path, records: dict[tuple[str, int], dict], skipped: int,
           log: Callable[[str], None] | None = None) -> SweepResult:
    """Writes results.jsonl in grid order, results.md and curves.png."""
    ordered = [records[(s.config_hash(), s.seed)] for s in grid.specs
               if (s.config_hash(), s.seed) in records]
    write_jsonl(out / RESULTS_FILE, ordered)
    table = results_table(ordered, grid.specs, grid.keys)
    note = plot_curves(out, ordered, grid.keys)
    atomic_write_text(out / "results.md", table + (f"\n{note}\n" if note else ""))
    if note and log is not None:
        log(note)
    return SweepResult(out, ordered, len(grid.specs) - skipped, skipped)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ---- results.md and curves.png ------------------------------------------------------------


def _setting_line(specs: Sequence[ExperimentSpec], keys: Sequence[str]) -> str:
    first = specs[0]
    parts = [f"{k}={getattr(first, k)}" for k in
             ("dataset", "partition", "alpha", "num_clients", "partition_seed", "rounds",
              "model")
             if k not in keys and getattr(first, k) is not None]
    seeds = sorted({s.seed for s in specs})
    return ", ".join(parts) + f"; seeds {','.join(map(str, seeds))}"


# Settings that change the data a configuration is measured on: "best" is only compared
# among configurations that agree on them.
DATA_FIELDS = ("dataset", "num_clients", "public_fraction", "public_dataset",
               *SPLIT_FIELDS)


def _best(rows: dict[str, list[dict]]) -> dict[tuple, str]:
    """Per algorithm and data setting (``DATA_FIELDS`` among the grid's axes) that has
    more than one configuration, the one with the highest mean accuracy."""
    best: dict[tuple, tuple[float, str]] = {}
    sizes: dict[tuple, int] = {}
    for name, records in rows.items():
        values = records[0].get("values", {})
        group = (records[0]["algorithm"],
                 *((k, str(values[k])) for k in DATA_FIELDS if k in values))
        sizes[group] = sizes.get(group, 0) + 1
        accs = [r["accuracy"] for r in records if r["status"] == "complete"
                and r["accuracy"] is not None]
        if not accs:
            continue
        mean = float(np.mean(accs))
        if group not in best or mean > best[group][0]:
            best[group] = (mean, name)
    return {group: name for group, (_, name) in best.items() if sizes[group] > 1}


def results_table(records: Sequence[dict], specs: Sequence[ExperimentSpec],
                  keys: Sequence[str]) -> str:
    """results.md: per configuration, mean ± std over its finished seeds; the best
    configuration of each algorithm on each data setting marked."""
    rows: dict[str, list[dict]] = {}
    expected: dict[str, int] = {}
    algorithm_of: dict[str, str] = {}
    values_of: dict[str, dict] = {}
    for spec in specs:
        name = config_name(spec, keys)
        expected[name] = expected.get(name, 0) + 1
        rows.setdefault(name, [])
        algorithm_of[name] = spec.algorithm
        values_of[name] = {k: v for k, v in spec.values().items() if k in keys}
    for record in records:
        rows.setdefault(record["config"], []).append(record)
    best = set(_best({n: r for n, r in rows.items() if r}).values())
    local = any("hurt_fraction" in r for r in records)
    header = ["algorithm", *keys, "seeds", "accuracy %", "client mean %", "bottom decile %"]
    if local:
        # IPR leads with its strict rate (accuracy above Local's), the ties beside it.
        header += ["strict IPR %", "ties %", "IPR with ties %", "hurt %"]
    header.append("folder")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, found in rows.items():
        complete = [r for r in found if r["status"] == "complete"]
        diverged = [r for r in found if r["status"] == "diverged"]
        seeds = f"{len(complete)}"
        if len(complete) != expected.get(name, len(found)):
            seeds += f" of {expected.get(name, len(found))}"
        if diverged:
            seeds += f" ({len(diverged)} diverged)"
        accuracy = mean_std(r["accuracy"] for r in complete)
        cells = [algorithm_of.get(name, found[0]["algorithm"] if found else "?")]
        cells += [_cell(values_of.get(name, {}).get(k, "—")) for k in keys]
        cells += [seeds, f"**{accuracy}** (best)" if name in best else accuracy,
                  mean_std(r.get("client_mean_accuracy") for r in complete),
                  mean_std(r.get("client_p10") for r in complete)]
        if local:
            cells += [mean_std(r.get("ipr_strict") for r in complete),
                      mean_std(r.get("tie_fraction") for r in complete),
                      mean_std(r.get("ipr") for r in complete),
                      mean_std(r.get("hurt_fraction") for r in complete)]
        cells.append(name)
        lines.append("| " + " | ".join(cells) + " |")
    return _setting_line(specs, keys) + "\n\n" + "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _histories(out: Path, records: Sequence[dict]) -> dict[str, list[list[dict]]]:
    found: dict[str, list[list[dict]]] = {}
    for record in records:
        if record["status"] != "complete":
            continue
        path = out / record["path"] / "metrics.jsonl"
        try:
            history = read_jsonl(path)
        except (OSError, ValueError):
            continue
        if history:
            found.setdefault(record["config"], []).append(history)
    return found


def plot_curves(out: Path, records: Sequence[dict], keys: Sequence[str]) -> str | None:
    """curves.png: per algorithm, each configuration's mean accuracy over its complete
    seeds against rounds, with a band of ± one standard deviation; the best configuration
    of each data setting drawn thicker.

    Returns:
      None, or a note saying why there is no plot.
    """
    try:
        import matplotlib
    except ImportError:
        return "curves.png not drawn: matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    histories = _histories(out, records)
    if not histories:
        return "curves.png not drawn: no configuration completed"
    by_config = {r["config"]: r for r in records}
    algorithms_ = list(dict.fromkeys(by_config[c]["algorithm"] for c in histories))
    rows: dict[str, list[dict]] = {}
    for record in records:
        rows.setdefault(record["config"], []).append(record)
    best = set(_best(rows).values())
    columns = min(3, len(algorithms_))
    lines = math.ceil(len(algorithms_) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.5 * lines),
                             squeeze=False)
    for ax, algorithm in zip(axes.flat, algorithms_, strict=False):
        for config, runs in histories.items():
            if by_config[config]["algorithm"] != algorithm:
                continue
            length = min(len(h) for h in runs)
            rounds = [h["round"] for h in runs[0][:length]]
            acc = np.asarray([[h["accuracy"] for h in run[:length]] for run in runs])
            mean, std = acc.mean(axis=0), acc.std(axis=0)
            values = by_config[config]["values"]
            label = ", ".join(f"{k}={_cell(v)}" for k, v in values.items()) or algorithm
            (line,) = ax.plot(rounds, mean, label=label,
                              linewidth=2.5 if config in best else 1.2)
            ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(),
                            alpha=0.2)
        ax.set_title(algorithm)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("personalized test accuracy")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(algorithms_):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    return None


def print_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


__all__ = [
    "FINISHED",
    "Group",
    "SweepResult",
    "config_name",
    "data_key",
    "group_specs",
    "make_record",
    "plot_curves",
    "program_key",
    "results_table",
    "run_sweep",
    "varying",
]
