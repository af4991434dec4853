"""The ``compare`` command: the sweep pipeline (plan, group, execute, report) with Local's runs
as every other run's reference, tuning first with ``--tune``, and the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fedjax_sim.cli.commands import (
    _options,
    _output,
)
from fedjax_sim.spec import (
    ExperimentSpec,
)
from fedjax_sim.tuning import describe


def _mean_std(values) -> str:
    values = np.asarray([np.nan if v is None else v for v in values], np.float64)
    if np.isnan(values).all():
        return "—"
    return f"{100 * values.mean():.2f} ± {100 * values.std():.2f}"


def _compare_line(record: dict) -> None:
    accuracy = record.get("accuracy")
    wall = record.get("wall_s")
    print(f"seed {record['seed']} {record['algorithm']}: {record['status']}, accuracy "
          f"{np.nan if accuracy is None else accuracy:.4f} "
          f"({np.nan if wall is None else wall:.1f} s)", file=sys.stderr, flush=True)


def _tune_compare(args: argparse.Namespace, specs: list[ExperimentSpec], out: Path):
    """``compare --tune``: the tuning sweep in ``out/tune``; the specs with the chosen
    learning rates, and the tuning."""
    from fedjax_sim.sweep import print_line
    from fedjax_sim.tuning import own_grid, tune, tuned

    options = args._tune
    lrs = options["lrs"]
    tuning = tune(specs, lrs=lrs, seeds=options["seeds"], output=out, own=options["own"],
                  statistic=options["statistic"], log=print_line)
    for name, values in tuning.chosen.items():
        grids = {"lr": lrs}
        if options["own"] and own_grid(name):
            grids[own_grid(name)[0]] = own_grid(name)[1]
        edges = [key for key, value in values.items()
                 if len(grids[key]) > 1 and value in (min(grids[key]), max(grids[key]))]
        edge = (f" (the edge of its grid in {', '.join(edges)}: the best may lie beyond)"
                if edges else "")
        print(f"tuned {name}: {describe(values)} ({options['statistic']} validation "
              f"accuracy {tuning.scores[name][describe(values)]:.4f}){edge}",
              file=sys.stderr)
    return tuned(specs, tuning.chosen), tuning


def _compare_table(names: list[str], rows_of: dict[str, list[dict]], tuning) -> str:
    """compare.md's table: mean ± std over the seeds, one row per algorithm."""
    # IPR leads with its strict rate (accuracy above Local's), the ties beside it.
    header = ("| algorithm | accuracy % | client mean % | bottom decile % | strict IPR % "
              "| ties % | IPR with ties % | hurt % | MB up | wall s |")
    if tuning is not None:
        header = "| algorithm | tuned | " + header[len("| algorithm | "):]
    lines = [header, "|" + "---|" * (10 + (tuning is not None))]
    for name in names:
        rows = [r for r in rows_of[name] if r["status"] == "complete"]
        failed = len(rows_of[name]) - len(rows)
        if not rows:
            lines.append(f"| {name} | diverged in {failed} of {failed} runs |" + " |" * 8)
            continue
        label = name if not failed else f"{name} ({failed} of {failed + len(rows)} diverged)"
        if tuning is not None:
            label += f" | {describe(tuning.chosen[name])}"
        lines.append(
            f"| {label} | {_mean_std([r['accuracy'] for r in rows])} "
            f"| {_mean_std([r['client_mean_accuracy'] for r in rows])} "
            f"| {_mean_std([r['client_p10'] for r in rows])} "
            f"| {_mean_std([r.get('ipr_strict') for r in rows])} "
            f"| {_mean_std([r.get('tie_fraction') for r in rows])} "
            f"| {_mean_std([r.get('ipr') for r in rows])} "
            f"| {_mean_std([r.get('hurt_fraction') for r in rows])} "
            f"| {np.mean([r.get('bytes_up', np.nan) for r in rows]) / 1e6:.2f} "
            f"| {np.mean([r['wall_s'] for r in rows]):.1f} |"
        )
    return "\n".join(lines)


def _compare_setting(args: argparse.Namespace, specs: list[ExperimentSpec], num_clients: int,
                     tuning) -> str:
    """compare.md's first line: the data setting, seeds, clock and tuning."""
    first = specs[0]
    seeds = list(dict.fromkeys(spec.seed for spec in specs))
    split = ("" if first.partition_seed is None
             else f", split of partition seed {first.partition_seed}")
    timed = next((spec for spec in specs if spec.system is not None), None)
    clock = ("" if timed is None else f"; virtual clock: system {timed.system}, condition "
             f"{timed.condition or 'wait_all'} (Local without it)")
    tuned_note = ""
    if tuning is not None:
        options = args._tune
        what = "lr and each method's own key hyperparameter" if options["own"] else "lr"
        tuned_note = (f"; {what} tuned per method on validation rows ({first.val_fraction:g} "
                      f"of each client's training rows, held out of every run), lr over "
                      f"{', '.join(f'{lr:g}' for lr in options['lrs'])}, seeds "
                      f"{','.join(map(str, options['seeds']))}: best mean "
                      f"{options['statistic']} validation accuracy")
    return (f"{first.dataset}, {first.partition} (alpha={first.alpha}), "
            f"K={num_clients}, {first.rounds} rounds, "
            f"seeds {','.join(map(str, seeds))}{split}{clock}{tuned_note}")


def _num_clients(out: Path, records: list[dict]) -> int | None:
    """The client count the runs recorded (the first summary that says)."""
    for record in records:
        try:
            return json.loads((out / record["path"] / "summary.json").read_text())["num_clients"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def cmd_compare(args: argparse.Namespace) -> list[dict]:
    """``compare``: the plan → group → execute → report pipeline of a sweep
    (``fedjax_sim.sweep``), Local first as every other run's reference, one folder per
    algorithm and seed (``<algorithm>/seed<s>/``), and the table."""
    from fedjax_sim import sweep
    from fedjax_sim.rundir import RunDir, atomic_write_json, atomic_write_text, preflight

    specs = args._specs
    names = args._names
    first = specs[0]
    out = Path(_output(first, "compare"))
    preflight(out, overwrite=first.overwrite)
    with RunDir(out, overwrite=first.overwrite):
        tuning = None
        if getattr(args, "_tune", None) is not None:
            specs, tuning = _tune_compare(args, specs, out)
        grid = sweep.plan(specs, by_algorithm=True, reference="local")
        result = sweep.execute(grid, out, on_result=_compare_line, log=sweep.print_line,
                               options=_options(args, first))
        rows_of = {name: [r for r in result.records if r["algorithm"] == name]
                   for name in names}
        table = _compare_table(names, rows_of, tuning)
        setting = _compare_setting(args, specs, _num_clients(out, result.records), tuning)
        atomic_write_text(out / "compare.md", f"{setting}\n\n{table}\n")
        atomic_write_json(out / "compare.json", {
            **rows_of,
            **({} if tuning is None else {"tuning": {
                "chosen": tuning.chosen, "folder": tuning.folder.name,
                "statistic": tuning.statistic,
                "validation_accuracy": tuning.scores}})})
    print(setting + "\n\n" + table)
    print(f"results in {out}", file=sys.stderr)
    return [r for rows in rows_of.values() for r in rows]
