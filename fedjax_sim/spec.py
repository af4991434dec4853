"""Experiment specs: every option of a run in one frozen record, and ``build``.

An :class:`ExperimentSpec` holds what ``fedjax-sim run`` takes on its command line (data,
partition, model, algorithm and its hyperparameters, loop, seeds, output); the command
line, config files, experiment scripts and notebooks all describe a run this way, and
:func:`build` turns a spec into data, model(s), algorithm, public set and the Local
reference, the same way for each of them::

    spec = ExperimentSpec(algorithm="fedper", num_clients=10, rounds=5,
                          hparams={"lr": 0.05})
    spec = check_spec(spec)            # every value against its range, nothing loaded
    result = run_spec(spec)            # build + runner.run

Seeds. ``seed`` seeds the run (initialization, cohorts, batch orders) and, unless
``partition_seed`` is set, also the partition and the clients' train/test split, so that
every seed draws its own split. With ``partition_seed`` every seed uses the split drawn
from it; a ``partition_file`` fixes the split too. ``run``, ``compare`` and ``sweep``
follow this one rule (:attr:`ExperimentSpec.data_seed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from fedjax_sim import algorithms
from fedjax_sim.algorithms.base import Algorithm, check_hparam
from fedjax_sim.checks import (
    check_choice,
    check_input_dir,
    check_input_file,
    check_int,
    check_output_dir,
    check_output_file,
    check_seed,
    parse_list,
)
from fedjax_sim.models.layers import DEFAULT_INIT
from fedjax_sim.options import check_value, declared, in_section, kinds, option

# Federated distillation: public data held out of the pool unless public_dataset is given.
DEFAULT_PUBLIC_FRACTION = 0.2
DEFAULT_VAL_FRACTION = 0.05
# The built-in algorithms that take several architectures (client k runs architecture
# k mod A), for help texts; the checks read each algorithm's declared abilities.
HETEROGENEOUS = tuple(n for n in algorithms.names() if algorithms.abilities(n).heterogeneous)
SWEEP_STRATEGIES = ("auto", "vmap", "map")
DIVERGENCE_POLICIES = ("stop", "warn")


def _choices(module: str, name: str):
    """The choices held in ``module.name``, read when checked (the data modules load only
    when needed, and plug-ins registered later count)."""
    import importlib

    return lambda: tuple(getattr(importlib.import_module(module), name))


def _loop_count(label: str, value: Any) -> int:
    # "an integer >= 1": the wording of runner.validate_run_options.
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    return int(value)


def _models() -> tuple[str, ...]:
    from fedjax_sim.models import MODELS

    return tuple(MODELS)


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """One experiment: every option of ``fedjax-sim run``, named as its flag with
    underscores (``--num-clients`` is ``num_clients``).

    ``hparams`` holds the algorithm's hyperparameters that are set (the others take the
    algorithm's defaults); give a mapping, it is stored as sorted ``(name, value)`` pairs
    so that the spec stays immutable. Nothing is checked on construction: call
    :func:`check_spec`, which names every bad value and its allowed range.

    Each field is declared once with :func:`fedjax_sim.options.option`: its section, help,
    range or choices and the commands that take it; the command-line flags, the config-file
    keys' types and the checks of a single value are generated from that (:data:`OPTIONS`).
    """

    # -- the algorithm (its flags are written by each command) --
    algorithm: str = option("fedavg", "algorithm", commands=())
    hparams: tuple[tuple[str, Any], ...] = ()
    # -- data --
    dataset: str = option(
        "digits", "data", "one of {sources}, or a natural data set read from its files in "
        "--data-dir: {natural} (with --partition natural)")
    data_dir: str | None = option(
        None, "data", "tfds data directory (tfds sources), or the folder of a natural data "
        "set's files (leaf:*, tff:*)", numbers=False)
    partition: str = option("dirichlet", "data", "one of {partitions}",
                            choices=_choices("fedjax_sim.data.partition", "PARTITIONS"))
    alpha: float = option(0.1, "data", "Dirichlet concentration (> 0; --partition dirichlet)",
                          low=0.0, low_open=True)
    num_clients: int | None = option(
        None, "data", "number of clients K (default 20; with --partition-file, the file's "
        "count, which a given value must equal)", low=1)
    num_samples: int | None = option(
        None, "data", "examples the mnist1d generator makes before partitioning (default "
        "5000; mnist1d only)", low=10)
    min_samples: int = option(10, "data", "minimum samples per client (dirichlet)", low=2)
    shards_per_client: int = option(2, "data", "shards of sorted labels per client "
                                    "(--partition shards)", low=1)
    classes_per_client: int = option(2, "data", "labels per client (--partition classes)",
                                     low=1)
    test_ratio: float = option(0.25, "data", "share of each client's data held out for its "
                               "test set", low=0.0, high=1.0, low_open=True, high_open=True)
    val_fraction: float = option(
        0.0, "data", "share of each client's training rows held out as its validation rows, "
        "in [0, 1) (never trained on; drawn once per partition seed; default 0: none)",
        low=0.0, high=1.0, high_open=True)
    eval_split: str = option(
        "test", "data", "test or val: evaluate on the clients' test rows, or on their "
        "validation rows (to choose hyperparameters without the test rows; needs "
        "--val-fraction > 0)", choices=_choices("fedjax_sim.data.partition", "EVAL_SPLITS"))
    partition_seed: int | None = option(
        None, "data", "draw the partition and train/test split from this seed for every seed "
        "(default: each seed draws its own)", check=check_seed)
    partition_file: str | None = option(None, "data",
                                        "load the client split from this JSON file")
    save_partition: str | None = option(None, "data", "write the client split to this JSON "
                                        "file", numbers=False, run_only=True)
    max_examples: int | None = option(
        None, "data", "natural data sets: keep at most this many examples of each client, the "
        "first in file order", low=1)
    data_layout: str = option(
        "auto", "data", "auto, padded or ragged: clients padded to the largest (K, N_max, ...) "
        "or pooled with per-client offsets (memory of the examples alone); auto pads while "
        "that costs little. Same numbers either way", numbers=False,
        choices=_choices("fedjax_sim.data.federated", "LAYOUTS"))
    # -- model --
    model: str = option("auto", "model", "mlp, cnn, resnet or auto (mlp for flat or small "
                        "inputs, else cnn)", choices=lambda: ("auto", *_models()))
    init: str = option(
        DEFAULT_INIT, "model", "parameter initialization: flax (LeCun-normal kernels, zero "
        "biases) or torch (PyTorch's nn.Linear / nn.Conv2d defaults, kernels and biases "
        "U(+-1/sqrt(fan_in)))", choices=_choices("fedjax_sim.models.layers", "INITS"))
    architectures: str | None = option(
        None, "model", "heterogeneous models for {heterogeneous}: comma-separated "
        "mlp[:WIDTHS], cnn, resnet, e.g. mlp:32,mlp:128,mlp:256x128; client k runs "
        "architecture k mod A")
    # -- public data (federated distillation) --
    public_fraction: float | None = option(
        None, "public", "share of the pool held out as public data before partitioning, in "
        "(0, 1) (default {public_fraction} when an algorithm needs public data and "
        "--public-dataset is not given)", low=0.0, high=1.0, low_open=True, high_open=True)
    public_dataset: str | None = option(
        None, "public", "take the public data from this source instead (same input shape)",
        choices=_choices("fedjax_sim.data", "SOURCES"))
    public_size: int | None = option(None, "public", "with --public-dataset: use this many "
                                     "random examples of it", low=1)
    public_val_fraction: float = option(
        DEFAULT_VAL_FRACTION, "public", "share of the pool held out as the server's labeled "
        "validation split (FedDF early stopping), in [0, 1)", low=0.0, high=1.0,
        high_open=True)
    # -- devices and time (core.system, core.clock); unset: no system model --
    system: str | None = option(
        None, "clock", "homogeneous, lognormal or FILE.npz (arrays speed, up, down [, p_off, "
        "p_on, dropout]; one value per client)")
    availability_trace: str | None = option(
        None, "clock", 'JSON {{"intervals": [[[start, end], ...], ...]}}: per client, online '
        "intervals in virtual seconds")
    # 1 drops every client: nothing would ever be aggregated.
    dropout: float | None = option(None, "clock", "probability that a started job is never "
                                   "reported", low=0.0, high=1.0, high_open=True)
    condition: str | None = option(None, "clock",
                                   "wait_all (default), deadline, first_m, fedasync, fedbuff")
    deadline: float | None = option(None, "clock", "deadline T in virtual seconds "
                                    "(--condition deadline)", low=0.0, low_open=True)
    first_m: int | None = option(None, "clock", "aggregate the first M of the sampled "
                                 "(--condition first_m)", low=1, aliases=("--over-select",))
    buffer_size: int | None = option(
        None, "clock", "FedBuff: updates per server step B, in [1, N - 1] below the N = "
        "num_clients x join_ratio clients in flight (default N / 10 rounded down, at least "
        "1: the paper's 10 of 100; B = N waits for as many updates as clients train, with "
        "every client in flight a wait_all round)", low=1)
    async_alpha: float | None = option(None, "clock", "FedAsync: mixing weight alpha in "
                                       "(0, 1] (default 0.6)", low=0.0, high=1.0,
                                       low_open=True)
    staleness_exponent: float | None = option(
        None, "clock", "FedAsync: a of the staleness weight (1 + tau)^-a (default 0.5)",
        low=0.0)
    # -- the loop --
    rounds: int = option(30, "loop", "communication rounds", check=_loop_count)
    eval_every: int = option(5, "loop", "evaluate every N rounds", check=_loop_count)
    seed: int = option(0, "loop", "seed of the run, and of its split unless --partition-seed",
                       check=check_seed, commands=("run", "sweep"))
    compare_local: bool = option(
        False, "loop", "also run Local on the same split and report the hurt fraction and the "
        "incentivized participation rate (`run`: after the run, as a run folder of its own "
        "in OUTPUT/local)", commands=("run", "sweep"))
    # -- how it runs: the same computation; only the order of float sums can change (a
    # different device count can move a 30-round accuracy by about a seed's spread) --
    rounds_per_call: int = option(1, "execution", "rounds per jitted call (lax.scan over "
                                  "rounds)", low=1, commands=("run", "sweep"))
    devices: int | None = option(
        None, "execution", "devices to shard the client axis (a batched program: its "
        "configurations) over (default: all visible)", low=1, commands=("run", "sweep"))
    checkpoint_every: int = option(0, "execution", "save a checkpoint every N rounds "
                                   "(0: none)", low=0, commands=("run",), run_only=True)
    on_divergence: str = option(
        "stop", "execution", "on a NaN or infinite loss or parameter: stop that run at the "
        "round (default; it is reported as diverged), or warn and go on",
        choices=DIVERGENCE_POLICIES)
    sweep_strategy: str = option(
        "auto", "execution", "how configurations batched into one program run: vmap, a "
        "compiled loop, or auto (the loop on CPU, vmap on accelerators)",
        choices=SWEEP_STRATEGIES, commands=("run", "sweep"))
    progress: bool = option(True, "execution", "show a progress bar",
                            negated="--no-progress")
    cpu_devices: str = option(
        "auto", "execution", "on a CPU host, how many XLA devices to show: auto (one per "
        "core; the client axis is sharded over them, each core training its own clients) or "
        "an integer >= 1 (1: one device whose operations use every core). Ignored when "
        "XLA_FLAGS sets --xla_force_host_platform_device_count", commands=())
    distributed: bool = option(
        False, "execution", "call jax.distributed.initialize() first (one process per host; "
        "cluster settings auto-detected on TPU pods, SLURM and Open MPI, or given by "
        "--coordinator/--num-processes/--process-id)", commands=("run",), run_only=True)
    coordinator: str | None = option(None, "execution", "host:port of process 0",
                                     commands=("run",), run_only=True)
    num_processes: int | None = option(None, "execution", "--distributed: the number of "
                                       "processes", low=1, commands=("run",), run_only=True)
    process_id: int | None = option(None, "execution", "--distributed: this process's index, "
                                    "in [0, --num-processes)", low=0, commands=("run",),
                                    run_only=True)
    # -- output --
    output: str | None = option(
        None, "output", "output folder (default: a new {default_output}); an existing "
        "non-empty folder is refused unless {unless}")
    overwrite: bool = option(False, "output", "replace the fedjax-sim results in an existing "
                             "--output folder")
    resume: bool = option(
        False, "output", "continue the run in --output from its latest checkpoint (refused if "
        "any setting that changes results differs; --rounds may grow)", commands=("run",))

    def __post_init__(self):
        hparams = self.hparams
        if isinstance(hparams, Mapping):
            hparams = hparams.items()
        object.__setattr__(self, "hparams", tuple(sorted((str(k), v) for k, v in hparams)))

    @property
    def data_seed(self) -> int:
        """The seed the partition and train/test split are drawn from: ``partition_seed``
        when set, else ``seed`` (each seed its own split)."""
        return self.seed if self.partition_seed is None else self.partition_seed

    @property
    def hparam_dict(self) -> dict[str, Any]:
        """The hyperparameters that are set, as a dict."""
        return dict(self.hparams)

    def resolved_hparams(self) -> dict[str, Any]:
        """Every hyperparameter of the algorithm, defaults filled in
        (``algorithms.resolve``)."""
        return algorithms.resolve(self.algorithm, **self.hparam_dict)

    def replace(self, **values: Any) -> ExperimentSpec:
        """A copy with ``values`` changed; names that are not fields set (or replace)
        hyperparameters."""
        fields = {k: v for k, v in values.items() if k in FIELDS}
        hparams = {k: v for k, v in values.items() if k not in FIELDS and k != "hparams"}
        if "hparams" in values:
            fields["hparams"] = dict(values["hparams"])
        if hparams:
            fields["hparams"] = {**dict(fields.get("hparams", self.hparams)), **hparams}
        return dataclasses.replace(self, **fields)

    def values(self) -> dict[str, Any]:
        """Every field and every set hyperparameter in one flat dict (the keys of config
        files)."""
        flat = {f: getattr(self, f) for f in FIELDS}
        flat.update(self.hparams)
        return flat

    def to_dict(self) -> dict[str, Any]:
        """Every field, ``hparams`` as a dict: what ``ExperimentSpec(**d)`` reads back."""
        record = {f: getattr(self, f) for f in FIELDS}
        record["hparams"] = self.hparam_dict
        return record

    def identity(self) -> dict[str, Any]:
        """The settings that decide the numbers a run produces: every field but those of
        :data:`EXECUTION`, and every hyperparameter resolved (so that a default given
        explicitly is the same experiment). The validation options are left out at their
        defaults (no validation rows, evaluated on the test rows): such a run is the run it
        always was."""
        record = {f: getattr(self, f) for f in FIELDS if f not in EXECUTION
                  and not (f in CLOCK_FIELDS and getattr(self, f) is None)
                  and not (f in VALIDATION_DEFAULTS
                           and getattr(self, f) == VALIDATION_DEFAULTS[f])}
        record["hparams"] = self.resolved_hparams()
        return _jsonable(record)

    def config_hash(self) -> str:
        """A short hash of :meth:`identity` without the seed: the same for every seed of
        one configuration of a sweep."""
        identity = self.identity()
        identity.pop("seed")
        text = json.dumps(identity, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ExperimentSpec)
                                if f.name != "hparams")

# Every option's schema (``fedjax_sim.options``), by field name.
OPTIONS = declared(ExperimentSpec)
# The type of every field (how ``--set`` text is read); ``OPTIONAL`` ones may be unset.
KINDS, OPTIONAL = kinds(ExperimentSpec)

# Fields that change how a run goes or where it writes, never its numbers.
EXECUTION = frozenset(name for name, o in OPTIONS.items() if not o.numbers)

# The per-client validation rows and the rows a run evaluates on, at their defaults (no
# validation rows, the test rows): left out of a run's identity and config.json there.
VALIDATION_DEFAULTS = {"val_fraction": 0.0, "eval_split": "test"}

# Options that decide the data, the partition and the model: recorded in config.json and
# matched on resume (with the algorithm's hyperparameters, the seed and the split itself;
# a partition file or seed fixes the split, which is matched itself).
DATA_OPTIONS = tuple(name for name in in_section(ExperimentSpec, "data", "model", "public")
                     if name not in EXECUTION and name not in VALIDATION_DEFAULTS
                     and name not in ("partition_file", "partition_seed"))

# The options of the virtual clock; unset ones are left out of a run's identity (a run
# without a system model is the run it always was).
CLOCK_FIELDS = in_section(ExperimentSpec, "clock")
SYSTEM_PRESETS = ("homogeneous", "lognormal")
# Fields checked by their declared range or choices alone (None allowed when optional);
# the others also have checks that read other options, in check_spec.
SIMPLE_CHECKS = ("partition", "alpha", "num_clients", "num_samples", "min_samples",
                 "shards_per_client",
                 "classes_per_client", "test_ratio", "partition_seed", "data_layout", "model",
                 "init", "public_size", "public_val_fraction", "max_examples", "dropout",
                 "deadline", "first_m", "buffer_size", "async_alpha", "staleness_exponent",
                 "rounds", "eval_every", "seed", "compare_local", "rounds_per_call", "devices",
                 "checkpoint_every", "on_divergence", "sweep_strategy", "progress",
                 "distributed", "num_processes", "overwrite", "resume")


def check_field(spec: ExperimentSpec, name: str, label: Callable[[str], str]) -> Any:
    """``spec.name`` checked against its declared range or choices (None passes for an
    option that may be unset); the value normalized to the field's type."""
    value = getattr(spec, name)
    if value is None and name in OPTIONAL:
        return None
    return check_value(OPTIONS[name], KINDS[name], value, label(name))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def hparam_names() -> dict[str, algorithms.HParam]:
    """Every hyperparameter of every algorithm, by name (the first spec of each name)."""
    found: dict[str, algorithms.HParam] = {}
    for name in algorithms.ALGORITHMS + algorithms.DISTILLATION:
        for spec in algorithms.hparam_specs(name):
            found.setdefault(spec.name, spec)
    return found


def takes(algorithm: str, hparam: str) -> bool:
    """Whether ``algorithm`` has the hyperparameter ``hparam``."""
    return any(spec.name == hparam for spec in algorithms.hparam_specs(algorithm))


def wants_public(spec: ExperimentSpec) -> bool:
    """Whether ``spec``'s data holds out a public set: its algorithm needs one, or a public
    option is set (so that other algorithms can be compared on the same private data)."""
    return (algorithms.uses_public(spec.algorithm) or spec.public_fraction is not None
            or spec.public_dataset is not None)


def share_public_split(specs: Iterable[ExperimentSpec]) -> list[ExperimentSpec]:
    """Sets the default ``public_fraction`` on every spec that leaves both public options
    unset when any spec's algorithm needs public data, so that every algorithm of a
    comparison or sweep trains on the same private data."""
    specs = list(specs)
    if not any(algorithms.uses_public(s.algorithm) for s in specs):
        return specs
    return [s.replace(public_fraction=DEFAULT_PUBLIC_FRACTION)
            if s.public_fraction is None and s.public_dataset is None else s for s in specs]


# ---- checks ---------------------------------------------------------------------------------


def _check_text(label: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{label} must be text, got {value!r}")
    return value


def parse_architectures(text: str, label: str = "architectures") -> list[tuple[str, dict]]:
    """``mlp:64,mlp:128x64,cnn`` -> ``[(name, options), ...]``; checked before any data
    loads.

    Raises:
      ValueError: naming ``label``: an empty entry, an unknown model, bad widths.
    """
    from fedjax_sim.models import MODELS

    def parse(item: str, _label: str) -> tuple[str, dict]:
        name, _, widths = item.partition(":")
        if name not in MODELS:
            raise ValueError(f"{label}: unknown model {name!r} in {text!r}; "
                             f"valid: {', '.join(MODELS)}")
        options = {}
        if widths:
            if name != "mlp" or not all(w.isdecimal() and int(w) > 0 for w in widths.split("x")):
                raise ValueError(f"{label}: {item!r} must be mlp:W or mlp:W1xW2 with "
                                 "positive widths (only mlp takes widths)")
            options["hidden"] = tuple(int(w) for w in widths.split("x"))
        return name, options

    return parse_list(text, label, parse)


def _check_hparams(spec: ExperimentSpec, label: Callable[[str], str]) -> dict:
    known = hparam_names()
    own = {s.name: s for s in algorithms.hparam_specs(spec.algorithm)}
    checked = {}
    for name, value in spec.hparams:
        if name not in own:
            if name in known:
                raise ValueError(f"{label(name)} does not apply to {spec.algorithm}")
            raise ValueError(f"{label(name)}: no such option or hyperparameter")
        checked[name] = check_hparam(own[name], value, label(name))
    algorithms.resolve(spec.algorithm, **checked)  # the checks across hyperparameters
    return checked


def _check_data(spec: ExperimentSpec, label: Callable[[str], str], values: dict) -> None:
    from fedjax_sim.data import (
        SOURCES,
        check_partition_file,
        check_partition_val,
        check_val_fraction,
    )
    from fedjax_sim.data.sources import check_prepared

    natural = is_natural(spec.dataset)
    if not natural and spec.dataset not in SOURCES:  # SOURCES holds every npz:PATH
        check_choice(label("dataset"), spec.dataset, (*SOURCES, *natural_names()))
    if spec.num_samples is not None and spec.dataset != "mnist1d":
        raise ValueError(f"{label('num_samples')} sets how many examples the mnist1d "
                         f"generator makes; {spec.dataset!r} is not generated by it")
    if spec.max_examples is not None and not natural:
        raise ValueError(f"{label('max_examples')} caps the examples of a natural data "
                         f"set's clients ({', '.join(natural_names())}); "
                         f"{spec.dataset!r} is partitioned, not natural")
    if natural:
        _check_natural(spec, label)
    values["val_fraction"] = check_val_fraction(spec.val_fraction, spec.eval_split,
                                                label=label)
    if spec.public_fraction is not None:
        values["public_fraction"] = check_field(spec, "public_fraction", label)
        if spec.public_dataset is not None:
            raise ValueError(f"give {label('public_fraction')} or {label('public_dataset')}, "
                             "not both")
    if spec.public_dataset is not None:
        check_choice(label("public_dataset"), spec.public_dataset, SOURCES)
    if spec.public_size is not None and spec.public_dataset is None:
        raise ValueError(f"{label('public_size')} applies only with {label('public_dataset')}")
    if wants_public(spec) and spec.public_dataset is None:
        fraction = values.get("public_fraction") or DEFAULT_PUBLIC_FRACTION
        if fraction + values["public_val_fraction"] >= 1:
            raise ValueError(f"{label('public_fraction')} + {label('public_val_fraction')} "
                             f"must be < 1, got {fraction} + {values['public_val_fraction']}")
    if spec.data_dir is not None:
        _check_text(label("data_dir"), spec.data_dir)
        if "://" not in spec.data_dir:
            check_input_dir(label("data_dir"), spec.data_dir)
    for source in (spec.dataset, spec.public_dataset):
        if source is not None and not is_natural(source):
            check_prepared(source, spec.data_dir)
    if spec.partition_file is not None:
        check_partition_file(_check_text(label("partition_file"), spec.partition_file),
                             label("partition_file"))
        check_partition_val(spec.partition_file, values["val_fraction"], label=label)
    if spec.save_partition is not None:
        check_output_file(label("save_partition"),
                          _check_text(label("save_partition"), spec.save_partition))
    if spec.architectures is not None:
        parse_architectures(_check_text(label("architectures"), spec.architectures),
                            label("architectures"))
        if not algorithms.abilities(spec.algorithm).heterogeneous:
            able = [n for n in algorithms.names() if algorithms.abilities(n).heterogeneous]
            raise ValueError(f"{label('architectures')} applies to {' and '.join(able)}"
                             f", not {spec.algorithm}")


def _check_process(spec: ExperimentSpec, label: Callable[[str], str]) -> None:
    from fedjax_sim.platform import parse_cpu_devices

    try:
        parse_cpu_devices(spec.cpu_devices)
    except (ValueError, TypeError):
        raise ValueError(f"{label('cpu_devices')} must be 'auto' or an integer >= 1, got "
                         f"{spec.cpu_devices!r}") from None
    if spec.process_id is not None:
        check_int(label("process_id"), spec.process_id, 0,
                  None if spec.num_processes is None else spec.num_processes - 1)
    if spec.coordinator is not None:
        host, _, port = _check_text(label("coordinator"), spec.coordinator).rpartition(":")
        if not host or not port.isdecimal() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{label('coordinator')} must be host:port with a port in "
                             f"[1, 65535], got {spec.coordinator!r}")
    if not spec.distributed and (spec.coordinator or spec.num_processes
                                 or spec.process_id is not None):
        raise ValueError(f"{label('coordinator')}/{label('num_processes')}/"
                         f"{label('process_id')} need {label('distributed')}")


def _check_clock(spec: ExperimentSpec, label: Callable[[str], str], values: dict,
                 hparams: dict) -> None:
    """The virtual-clock options: ranges, files, the condition's own settings, and
    whether the algorithm can run under it."""
    from fedjax_sim.algorithms.base import check_clock_support
    from fedjax_sim.core.clock import conditions, get_condition

    given = [f for f in CLOCK_FIELDS if getattr(spec, f) is not None]
    if not given:
        return
    if spec.system is None:
        raise ValueError(f"{label(given[0])} needs {label('system')} (homogeneous, lognormal "
                         "or FILE.npz)")
    system = _check_text(label("system"), spec.system)
    if system not in SYSTEM_PRESETS:
        if not system.endswith(".npz"):
            raise ValueError(f"{label('system')} must be one of {', '.join(SYSTEM_PRESETS)} "
                             f"or a FILE.npz, got {system!r}")
        check_input_file(label("system"), system)
    if spec.availability_trace is not None:
        check_input_file(label("availability_trace"),
                         _check_text(label("availability_trace"), spec.availability_trace))
    condition = spec.condition or "wait_all"
    check_choice(label("condition"), condition, conditions())
    if condition == "deadline" and spec.deadline is None:
        raise ValueError(f"{label('condition')} deadline needs {label('deadline')} (virtual "
                         "seconds > 0)")
    if condition == "first_m" and spec.first_m is None:
        raise ValueError(f"{label('condition')} first_m needs {label('first_m')} (updates "
                         "aggregated per round, at most the cohort size)")
    if spec.num_clients is not None:
        from fedjax_sim.core.cohort import cohort_size

        cohort = cohort_size(spec.num_clients,
                             algorithms.resolve(spec.algorithm, **hparams)["join_ratio"])
        if spec.first_m is not None and spec.first_m > cohort:
            raise ValueError(f"{label('first_m')} must be at most the cohort size N = "
                             f"{cohort} (num_clients x join_ratio), got {spec.first_m}")
        # B = N waits for as many updates as clients train at once (wait_all at N = K).
        most = max(1, cohort - 1)
        if spec.buffer_size is not None and spec.buffer_size > most:
            raise ValueError(f"{label('buffer_size')} must be in [1, {most}], below the "
                             f"N = {cohort} clients in flight (num_clients x join_ratio), "
                             f"got {spec.buffer_size}")
    abilities = algorithms.abilities(spec.algorithm)
    if abilities.heterogeneous or algorithms.uses_public(spec.algorithm):
        raise ValueError(f"algorithm {spec.algorithm} cannot run under condition {condition}: "
                         "it does not aggregate client updates through the standard round")
    check_clock_support(spec.algorithm, abilities, condition,
                        get_condition(condition).asynchronous)


# ---- options that act only under a condition ---------------------------------------------

# The partition each partition option belongs to.
PARTITION_OPTIONS = {"alpha": "dirichlet", "shards_per_client": "shards",
                     "classes_per_client": "classes"}
# Options of drawing the split, which a partition file fixes instead.
DRAWN_SPLIT_OPTIONS = ("partition", "alpha", "min_samples", "shards_per_client",
                       "classes_per_client", "test_ratio", "partition_seed")
# Algorithms that read local_epochs even with local_steps set (FedRep: the base's share).
EPOCHS_WITH_STEPS = frozenset({"fedrep"})
# Epoch counts of a second training phase, which local_steps replaces as well.
PHASE_EPOCHS = {"finetune_epochs": "fine-tunes", "personal_epochs": "trains its personal "
                "model"}
# The server optimizers (server_opt) each server option acts in.
SERVER_OPTIONS = {"server_momentum": ("momentum",), "beta1": ("adam", "yogi"),
                  "beta2": ("adam", "yogi"), "tau": ("adam", "yogi", "adagrad")}
# The built-in server condition each clock option acts in (registered conditions may read
# any of them).
CONDITION_OPTIONS = {"deadline": ("deadline",), "first_m": ("first_m",),
                     "buffer_size": ("fedbuff",), "async_alpha": ("fedasync",),
                     "staleness_exponent": ("fedasync",)}
BUILTIN_CONDITIONS = ("wait_all", "deadline", "first_m", "fedasync", "fedbuff")


def no_effect(spec: ExperimentSpec, key: str,
              label: Callable[[str], str] | None = None) -> str | None:
    """Why the option ``key``, given explicitly, would change nothing in ``spec`` (one
    line: the option, why, what to do), or None when it acts.

    The command line refuses an option given explicitly (flag, config-file key or
    ``--set``) that acts in none of its configurations, rather than record a value that
    was silently ignored; defaults are never refused.

    Args:
      spec: a checked experiment.
      key: a field or hyperparameter name.
      label: how messages name a key (default: its name).
    """
    label = label or (lambda name: name)
    flag = label(key)
    if spec.partition_file is not None and key in DRAWN_SPLIT_OPTIONS:
        return (f"{flag} has no effect with {label('partition_file')}: the file fixes the "
                f"clients and their train/test split; drop {flag}")
    if key in PARTITION_OPTIONS and not is_natural(spec.dataset):
        needed = PARTITION_OPTIONS[key]
        if spec.partition != needed:
            return (f"{flag} has no effect with {label('partition')} {spec.partition}: only "
                    f"the {needed} partition uses it; drop {flag} or use "
                    f"{label('partition')} {needed}")
    if (key in PARTITION_OPTIONS or key == "test_ratio") and is_natural(spec.dataset):
        return (f"{flag} has no effect on {spec.dataset}: a natural data set comes with its "
                f"own clients and train/test split; drop {flag}")
    if key == "public_val_fraction" and not wants_public(spec):
        return (f"{flag} has no effect: {spec.algorithm} holds out no public data (federated "
                f"distillation does, or {label('public_fraction')} / "
                f"{label('public_dataset')}); drop {flag}")
    if key == "compare_local" and spec.compare_local and spec.algorithm == "local":
        return (f"{flag} has no effect with {label('algorithm')} local: Local is its own "
                f"reference; drop {flag}")
    if key in CONDITION_OPTIONS:
        condition = spec.condition or "wait_all"
        acts = CONDITION_OPTIONS[key]
        if condition in BUILTIN_CONDITIONS and condition not in acts:
            return (f"{flag} has no effect with {label('condition')} {condition}: only "
                    f"{acts[0]} uses it; drop {flag} or use {label('condition')} {acts[0]}")
    if key not in FIELDS and takes(spec.algorithm, key):
        return _hparam_no_effect(spec, key, label)
    return None


def _hparam_no_effect(spec: ExperimentSpec, key: str,
                      label: Callable[[str], str]) -> str | None:
    flag = label(key)
    hp = spec.resolved_hparams()
    steps = hp.get("local_steps") is not None
    if key == "local_epochs" and steps and spec.algorithm not in EPOCHS_WITH_STEPS:
        return (f"{flag} has no effect with {label('local_steps')}: each round trains "
                f"{label('local_steps')} steps instead of epochs; give one of them")
    if key in PHASE_EPOCHS and steps:
        return (f"{flag} has no effect with {label('local_steps')}: {spec.algorithm} then "
                f"{PHASE_EPOCHS[key]} for {label('local_steps')} steps too; drop one of them")
    if key == "chunk_size" and hp["client_strategy"] != "chunked":
        return (f"{flag} has no effect with {label('client_strategy')} "
                f"{hp['client_strategy']}: only chunked runs the clients in chunks; drop "
                f"{flag} or use {label('client_strategy')} chunked")
    if key in SERVER_OPTIONS and "server_opt" in hp:
        acts = SERVER_OPTIONS[key]
        if hp["server_opt"] not in acts:
            return (f"{flag} has no effect with {label('server_opt')} {hp['server_opt']}: "
                    f"only {' and '.join(acts)} {'use' if len(acts) > 1 else 'uses'} it; "
                    f"drop {flag} or use {label('server_opt')} {acts[0]}")
    if key == "apfl_alpha_lr" and hp.get("apfl_adaptive") is False:
        return (f"{flag} has no effect with {label('apfl_adaptive')} false: α is learned only "
                f"when adaptive; drop {flag}")
    if key == "dsfl_temperature" and hp.get("dsfl_aggregation") not in (None, "era"):
        return (f"{flag} has no effect with {label('dsfl_aggregation')} "
                f"{hp['dsfl_aggregation']}: only era sharpens with a temperature; drop "
                f"{flag}")
    return None


def build_clock(spec: ExperimentSpec, num_clients: int):
    """The ``core.clock.Clock`` of ``spec`` for ``num_clients`` clients, or ``None`` when
    no system model is set. Files are read here.

    Raises:
      ValueError: a malformed system file or availability trace, naming the file.
    """
    from fedjax_sim.core import system as system_lib
    from fedjax_sim.core.clock import Clock

    if spec.system is None:
        return None
    if spec.system == "homogeneous":
        model = system_lib.homogeneous(num_clients)
    elif spec.system == "lognormal":
        model = system_lib.lognormal(num_clients, seed=spec.seed)
    else:
        model = system_lib.load_system(spec.system, num_clients)
    if spec.availability_trace is not None:
        model = system_lib.with_trace(
            model, system_lib.load_trace(spec.availability_trace, num_clients))
    if spec.dropout is not None:
        model = system_lib.with_dropout(model, spec.dropout)
    options = {name: getattr(spec, name) for name in (
        "deadline", "first_m", "buffer_size", "async_alpha", "staleness_exponent")
        if getattr(spec, name) is not None}
    return Clock(model, condition=spec.condition or "wait_all", **options)


def _check_privacy(spec: ExperimentSpec, label: Callable[[str], str], values: dict,
                   hparams: dict) -> dict:
    """Differential privacy: an algorithm that supports it, no virtual clock, and the
    budget (``core.privacy.resolve_budget``: σ calibrated to ``dp_target_epsilon``)."""
    from fedjax_sim.core import privacy

    resolved = algorithms.resolve(spec.algorithm, **hparams)
    if resolved["dp"] == "off":
        given = sorted(n for n in hparams if n.startswith("dp_"))
        if given:
            raise ValueError(f"{label(given[0])} needs {label('dp')} fixed or adaptive")
        return hparams
    algorithms.check_private(spec.algorithm, resolved)
    if spec.system is not None or spec.condition is not None:
        raise ValueError(f"{label('dp')} {resolved['dp']} does not run on the virtual clock "
                         f"({label('system')}, {label('condition')}): its accounting assumes "
                         "the sampling of the synchronous round")
    from fedjax_sim.data import DEFAULT_NUM_CLIENTS

    num_clients = values.get("num_clients")
    if num_clients is None and not (is_natural(spec.dataset) or spec.partition_file):
        num_clients = DEFAULT_NUM_CLIENTS
    return privacy.resolve_budget(spec.algorithm, hparams, rounds=values["rounds"],
                                  num_clients=num_clients, label=label)


def check_spec(spec: ExperimentSpec, *,
               label: Callable[[str], str] | None = None) -> ExperimentSpec:
    """Checks every value of ``spec`` before anything is loaded or compiled.

    Args:
      spec: the experiment.
      label: how messages name a field or hyperparameter (default: its name; the
        command line passes ``--lr``, a config file ``grid.toml: lr``).

    Returns:
      ``spec`` with numbers normalized (an int given for a float option becomes a float),
      so that equal settings hash equal.

    Raises:
      ValueError: naming the option and what it allows, e.g.
        ``--lr must be a finite number > 0, got inf``; paths are checked without creating
        anything.
    """
    label = label or (lambda name: name)
    check_choice(label("algorithm"), spec.algorithm,
                 algorithms.ALGORITHMS + algorithms.DISTILLATION)
    _check_process(spec, label)
    values = {name: check_field(spec, name, label) for name in SIMPLE_CHECKS}
    _check_data(spec, label, values)
    hparams = _check_hparams(spec, label)
    if (takes(spec.algorithm, "incfl_local_rounds") and "incfl_local_rounds" not in hparams
            and hparams.get("incfl_local_epochs") is None):
        # IncFL's thresholds come from the Local reference the run compares against: as
        # many rounds as the run (recorded, so that the identity says what ran).
        hparams["incfl_local_rounds"] = values["rounds"]
    _check_clock(spec, label, values, hparams)
    hparams = _check_privacy(spec, label, values, hparams)
    if spec.output is not None:  # None: a fresh runs/... folder
        check_output_dir(label("output"), _check_text(label("output"), spec.output))
    if spec.resume and spec.overwrite:
        raise ValueError(f"{label('resume')} and {label('overwrite')} exclude each other")
    return spec.replace(hparams=hparams, **values)


# ---- build ----------------------------------------------------------------------------------


class LocalReference(NamedTuple):
    """Local, the reference of ``compare_local``: one Local per architecture and the
    clients that run it (client k runs architecture k mod A, as in FedMD and FCCL)."""

    algorithms: tuple[Algorithm, ...]
    members: tuple[np.ndarray, ...]


class Built(NamedTuple):
    """What a spec turns into.

    Attributes:
      spec: the experiment.
      data: the federated data, split drawn from ``spec.data_seed``.
      public: the public set (federated distillation), or None.
      model: the model, or a tuple of models (``architectures``).
      algorithm: the algorithm, built for ``model``.
      local: the Local reference (``compare_local`` and an algorithm other than Local), or
        None.
    """

    spec: ExperimentSpec
    data: Any
    public: Any
    model: Any
    algorithm: Algorithm
    local: LocalReference | None

    @property
    def config(self) -> dict:
        """The settings that produced the data and the model, for ``runner.run(config=)``
        (written to config.json, matched on resume)."""
        record = {name: getattr(self.spec, name) for name in DATA_OPTIONS}
        if self.spec.partition_seed is not None:
            record["partition_seed"] = self.spec.partition_seed
        for name, default in VALIDATION_DEFAULTS.items():
            if getattr(self.spec, name) != default:
                record[name] = getattr(self.spec, name)
        for name in CLOCK_FIELDS:
            if getattr(self.spec, name) is not None:
                record[name] = getattr(self.spec, name)
        return record

    @property
    def extra_summary(self) -> dict:
        """Facts about the build for summary.json."""
        extra = {"model": model_names(self.model), "init": self.spec.init,
                 "data_seed": None if self.spec.partition_file else self.spec.data_seed}
        if self.public is not None:
            extra.update(public=self.public.name, public_size=self.public.num_samples,
                         public_val_size=self.public.num_val)
        return extra


def model_names(model) -> str:
    return ",".join(m.name for m in model) if isinstance(model, tuple) else model.name


def is_natural(dataset: Any) -> bool:
    """Whether ``dataset`` names a natural federated data set read from its files
    (``leaf:femnist``, ``tff:stackoverflow``, ...: ``fedjax_sim.data.natural``)."""
    return isinstance(dataset, str) and dataset in natural_names()


def natural_names() -> tuple[str, ...]:
    from fedjax_sim.data.natural import NATURAL_DATASETS

    return tuple(NATURAL_DATASETS)


def _check_natural(spec: ExperimentSpec, label: Callable[[str], str]) -> None:
    """A natural data set brings its own clients and train / test split: it is read from
    files under ``data_dir``, with the ``natural`` partition and no public set."""
    if spec.partition != "natural":
        raise ValueError(f"{label('dataset')} {spec.dataset} comes with its own clients and "
                         f"their train / test split: use {label('partition')} natural")
    if spec.data_dir is None:
        raise ValueError(f"{label('dataset')} {spec.dataset} is read from its files: give "
                         f"{label('data_dir')} (README: Natural federated data)")
    for field in ("partition_file", "save_partition", "public_dataset", "public_fraction"):
        if getattr(spec, field) is not None:
            raise ValueError(f"{label(field)} does not apply to the natural data set "
                             f"{spec.dataset}")
    if algorithms.uses_public(spec.algorithm):
        raise ValueError(f"{spec.algorithm} needs a public data set, which the natural data "
                         f"set {spec.dataset} does not hold out; use a partitioned source")


def build_data(spec: ExperimentSpec):
    """``(data, public)`` of ``spec``: the split drawn from ``spec.data_seed``; with a public
    set (and the server validation split) held out of the pool before partitioning when
    :func:`wants_public`, ``public`` is None otherwise. A natural data set is read from
    its files with its own clients and split (``fedjax_sim.data.natural``)."""
    from fedjax_sim.data import make_federated_data

    if is_natural(spec.dataset):
        from fedjax_sim.data.natural import load_natural, natural_size
        from fedjax_sim.safety import check_host_memory

        size = natural_size(spec.dataset, spec.data_dir)
        if size is not None:
            check_host_memory({"client data": size}, what=f"dataset {spec.dataset}",
                              advice="lower --num-clients or --max-examples")
        data, _, _ = load_natural(spec.dataset, spec.data_dir, min_samples=spec.min_samples,
                                  max_examples=spec.max_examples,
                                  max_clients=spec.num_clients,
                                  val_fraction=spec.val_fraction, eval_split=spec.eval_split,
                                  seed=spec.data_seed)
        return data, None

    common = dict(
        partition=spec.partition, num_clients=spec.num_clients, alpha=spec.alpha,
        min_samples=spec.min_samples, shards_per_client=spec.shards_per_client,
        classes_per_client=spec.classes_per_client, test_ratio=spec.test_ratio,
        seed=spec.data_seed, data_dir=spec.data_dir, partition_file=spec.partition_file,
        layout=spec.data_layout, eval_split=spec.eval_split,
        source_options=None if spec.num_samples is None else {"num_samples": spec.num_samples})
    if not wants_public(spec):
        data, _, _ = make_federated_data(spec.dataset, save_partition=spec.save_partition,
                                         val_fraction=spec.val_fraction, **common)
        return data, None
    from fedjax_sim.data.public import make_federated_data_with_public

    fraction = spec.public_fraction
    if fraction is None and spec.public_dataset is None:
        fraction = DEFAULT_PUBLIC_FRACTION
    data, public, _, _ = make_federated_data_with_public(
        spec.dataset, public_fraction=fraction, public_dataset=spec.public_dataset,
        public_size=spec.public_size, val_fraction=spec.public_val_fraction,
        client_val_fraction=spec.val_fraction, save_partition_to=spec.save_partition,
        **common)
    return data, public


# ``auto`` on next-token data: the published model of the data set, else a small
# causal transformer.
SEQUENCE_MODELS = (("shakespeare", "char_lstm"), ("stackoverflow", "so_lstm"))


def build_model(spec: ExperimentSpec, input_shape: tuple[int, ...], num_classes: int,
                data: Any = None):
    """The model (``auto``: mlp for flat or small inputs, else cnn; on next-token data the
    data set's published LSTM, else a small causal transformer), or with
    ``architectures`` a tuple of models."""
    from fedjax_sim.models import make_model

    if spec.architectures is not None:
        return tuple(make_model(name, input_shape, num_classes, init=spec.init, **options)
                     for name, options in parse_architectures(spec.architectures))
    name, options = spec.model, {}
    tokens = (data is not None and len(input_shape) == 1
              and np.issubdtype(data.train_x.dtype, np.integer))
    if name == "auto" and data is not None and data.label_shape:
        name = next((model for key, model in SEQUENCE_MODELS if key in data.name),
                    "transformer")
    elif name == "auto" and tokens:
        name = "sent_lstm"  # one label per token sequence
    elif name == "auto":
        image = len(input_shape) == 3 and min(input_shape[:2]) >= 16
        name = "cnn" if image else "mlp"
    if name == "sent_lstm" and data is not None:
        # Ids 0..max: every word id of the vocabulary occurs in the training split.
        options["vocab"] = 1 + max(int(np.max(np.asarray(data.train_x))),
                                   int(np.max(np.asarray(data.test_x))))
    return make_model(name, input_shape, num_classes, init=spec.init, **options)


def build_algorithm(spec: ExperimentSpec, model, public=None) -> Algorithm:
    """``algorithms.make`` with the spec's algorithm and hyperparameters (and the public
    set when the algorithm takes one)."""
    extra = {"public": public} if algorithms.uses_public(spec.algorithm) else {}
    return algorithms.make(spec.algorithm, model, **extra, **spec.hparam_dict)


def local_hparams(spec: ExperimentSpec) -> dict:
    """The hyperparameters of ``spec`` that Local takes (its reference run's settings)."""
    return {k: v for k, v in spec.hparams if takes("local", k)}


def build_local(spec: ExperimentSpec, model, num_clients: int) -> LocalReference:
    """The Local reference of ``spec`` on ``model`` (one per architecture)."""
    models = model if isinstance(model, tuple) else (model,)
    members = tuple(np.arange(g, num_clients, len(models)) for g in range(len(models)))
    hparams = local_hparams(spec)
    return LocalReference(tuple(algorithms.make("local", m, **hparams) for m in models),
                          members)


def build(spec: ExperimentSpec, *, data=None, public=None) -> Built:
    """Turns ``spec`` into data, model(s), algorithm and the Local reference.

    Args:
      spec: the experiment (see :func:`check_spec`).
      data, public: already built data of this spec (``build_data``), e.g. shared by the
        algorithms of a comparison; built here when ``data`` is None.

    Returns:
      A :class:`Built`.

    Raises:
      ValueError: as ``make_federated_data``, ``make_model`` and ``algorithms.make``.
    """
    if data is None:
        data, public = build_data(spec)
    model = build_model(spec, data.input_shape, data.num_classes, data)
    algorithm = build_algorithm(spec, model, public)
    clock = build_clock(spec, data.num_clients)
    if clock is not None:
        from fedjax_sim.algorithms.base import clocked

        algorithm = clocked(algorithm, clock, data.num_clients)
    local = None
    if spec.compare_local and spec.algorithm != "local":
        local = build_local(spec, model, data.num_clients)
    return Built(spec, data, public, model, algorithm, local)


# ---- running --------------------------------------------------------------------------------


def local_accuracies(built: Built) -> list[float]:
    """Per-client accuracies of the Local reference on ``built.data``, on the run's own
    evaluation schedule and seed."""
    from fedjax_sim import runner

    spec = built.spec
    accuracies = np.zeros(built.data.num_clients)
    for algorithm, idx in zip(built.local.algorithms, built.local.members, strict=True):
        result = runner.run(algorithm, built.data, rounds=spec.rounds,
                            eval_every=spec.eval_every, seed=spec.seed,
                            progress=spec.progress, devices=spec.devices,
                            rounds_per_call=spec.rounds_per_call,
                            on_divergence=spec.on_divergence)
        accuracies[idx] = np.asarray(result.summary["client_accuracies"])[idx]
    return accuracies.tolist()


# ``run_built``'s default output: the spec's own.
_SPEC_OUTPUT: Any = object()


def run_built(built: Built, *, output=_SPEC_OUTPUT, local: list[float] | None = None,
              events=None, options: dict | None = None, extra_summary: dict | None = None,
              resume_hint: str | None = None, overwrite: bool | None = None,
              resume: bool | None = None):
    """``runner.run`` with the loop settings of ``built.spec``.

    Args:
      built: from :func:`build`.
      output: the run folder (default ``built.spec.output``; None writes nothing).
      local: per-client Local accuracies for the hurt fraction and IPR (default: run the
        Local reference when ``built.local`` is set).
      events, resume_hint: as in ``runner.run``.
      options: recorded in config.json (default: the spec's values).
      extra_summary: more fields for summary.json, after those of ``built``.
      overwrite, resume: default the spec's.

    Returns:
      ``runner.RunResult``.
    """
    from fedjax_sim import runner

    spec = built.spec
    if local is None and built.local is not None:
        local = local_accuracies(built)
    return runner.run(
        built.algorithm, built.data, rounds=spec.rounds, eval_every=spec.eval_every,
        seed=spec.seed, events=events,
        output=spec.output if output is _SPEC_OUTPUT else output,
        local_accuracies=local, checkpoint_every=spec.checkpoint_every,
        resume=spec.resume if resume is None else resume,
        overwrite=spec.overwrite if overwrite is None else overwrite,
        progress=spec.progress, extra_summary={**built.extra_summary, **(extra_summary or {})},
        rounds_per_call=spec.rounds_per_call, devices=spec.devices, config=built.config,
        options=spec.values() if options is None else options,
        on_divergence=spec.on_divergence, resume_hint=resume_hint)


def run_spec(spec: ExperimentSpec, **kwargs):
    """Checks, builds and runs ``spec`` (keyword arguments: those of :func:`run_built`).

    Returns:
      ``runner.RunResult``.
    """
    return run_built(build(check_spec(spec)), **kwargs)


def mean_std(values: Iterable[float]) -> str:
    """``"12.34 ± 0.56"`` in percent over the finite values; ``—`` when there are none."""
    values = np.asarray([v for v in values if v is not None], np.float64)
    values = values[np.isfinite(values)] if values.size else values
    if not values.size:
        return "—"
    return f"{100 * values.mean():.2f} ± {100 * values.std():.2f}"


__all__ = [
    "DATA_OPTIONS",
    "DEFAULT_PUBLIC_FRACTION",
    "DEFAULT_VAL_FRACTION",
    "EXECUTION",
    "FIELDS",
    "HETEROGENEOUS",
    "KINDS",
    "OPTIONAL",
    "Built",
    "ExperimentSpec",
    "LocalReference",
    "build",
    "build_algorithm",
    "build_data",
    "build_local",
    "build_model",
    "check_spec",
    "hparam_names",
    "local_accuracies",
    "mean_std",
    "no_effect",
    "parse_architectures",
    "run_built",
    "run_spec",
    "share_public_split",
    "takes",
    "wants_public",
]

