"""Every bad command line of tests/test_bad_input.py, and those of ``EXTRA_CASES`` below,
as a real process, timed.

Each case runs ``python -m fedjax_sim.cli ...`` on the CPU and counts as rejected with one
line when the process exits with status 2, writes exactly one stderr line
``fedjax-sim <command>: error: ...`` holding the expected message, no traceback, and
creates no output folder (nothing ran). Times are wall clock, start-up (importing JAX)
included; on a shared machine they vary from run to run.

    python experiments/bad_inputs.py            # all cases
    python experiments/bad_inputs.py --ids run-lr-inf,env-jax-platforms
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# More bad command lines, in the battery's form ``(id, argv, expected fragment)``: options
# that would have no effect, unknown options with a hint, plug-in and config-file keys.
# ``{tmp}`` holds the files of ``prepare_extra_files``. tests/test_cli_options.py runs them
# in-process too.
EXTRA_CASES = [
    ("run-alpha-not-dirichlet", "run --partition iid --alpha 0.3",
     "--alpha has no effect with --partition iid: only the dirichlet partition uses it"),
    ("run-shards-not-shards", "run --shards-per-client 3",
     "--shards-per-client has no effect with --partition dirichlet"),
    ("run-classes-not-classes", "run --partition shards --classes-per-client 3",
     "--classes-per-client has no effect with --partition shards"),
    ("run-epochs-with-steps", "run --local-epochs 5 --local-steps 10",
     "--local-epochs has no effect with --local-steps"),
    ("run-finetune-with-steps", "run --algorithm fedbabu --finetune-epochs 2 --local-steps 5",
     "--finetune-epochs has no effect with --local-steps"),
    ("run-chunk-size-not-chunked", "run --chunk-size 4",
     "--chunk-size has no effect with --client-strategy auto"),
    ("run-server-momentum-sgd", "run --algorithm fedopt --server-momentum 0.5",
     "--server-momentum has no effect with --server-opt sgd"),
    ("run-compare-local-local", "run --algorithm local --compare-local",
     "--compare-local has no effect with --algorithm local"),
    ("run-public-val-no-public", "run --public-val-fraction 0.1",
     "--public-val-fraction has no effect"),
    ("run-sweep-strategy-single", "run --sweep-strategy vmap",
     "--sweep-strategy has no effect on a single run"),
    ("run-set-alpha-iid", "run --partition iid --set alpha=0.3",
     "--set alpha has no effect with --partition iid"),
    ("run-config-alpha-iid", "run --config {tmp}/iid_alpha.toml",
     "{tmp}/iid_alpha.toml: alpha has no effect with {tmp}/iid_alpha.toml: partition iid"),
    ("run-config-table-typo", "run --config {tmp}/table_typo.toml",
     "fedobp has no hyperparameter ig_ratoi (did you mean ig_ratio?)"),
    ("run-set-table-typo", "run --algorithm fedobp --set fedobp.ig_ratoi=0.5",
     "fedobp has no hyperparameter ig_ratoi (did you mean ig_ratio?)"),
    ("run-config-key-typo", "run --config {tmp}/key_typo.toml",
     "num_client: unknown key (did you mean num_clients?)"),
    ("run-dropout-one", "run --system homogeneous --dropout 1.0",
     "--dropout must be in [0, 1), got 1.0"),
    ("run-algorithms-plural", "run --algorithms fedavg,fedper",
     "--algorithms is an option of compare and sweep, not of run; run takes --algorithm"),
    ("run-plugin-option-alone", "run --mix 0.7",
     "unrecognized arguments: --mix 0.7 (if a plug-in defines it, pass --plugin MODULE first"),
    ("run-plugin-algorithm-alone", "run --algorithm fedavg_mix",
     "an algorithm of a plug-in needs --plugin MODULE"),
    ("run-set-plugin", "run --set plugin=my_algo",
     "--set plugin: plug-ins are imported before the options are read"),
    ("run-config-plugin-missing", "run --config {tmp}/plugin_missing.toml",
     "{tmp}/plugin_missing.toml: plugin no_such_plugin_xyz: no module named"),
    ("bench-chunk-size-not-chunked", "bench --chunk-size 4",
     "--chunk-size has no effect with --client-strategy auto"),
    ("bench-conv-impl-mlp", "bench --conv-impl xla",
     "--conv-impl has no effect with --model mlp"),
    ("bench-config", "bench --config {tmp}/iid_alpha.toml",
     "--config is an option of run and compare and sweep, not of bench"),
    ("compare-tune-statistic", "compare --tune --tune-statistic median",
     "--tune-statistic: invalid choice: 'median'"),
    ("compare-tune-own-with-mu", "compare --tune --tune-own --algorithms fedprox --mu 0.1",
     "--tune chooses each method's mu (--tune-own); drop --mu"),
    ("compare-tune-own-alone", "compare --tune-own",
     "--tune-own has no effect without --tune"),
    ("compare-tune-table-typo", "compare --config {tmp}/tune_typo.toml",
     "[tune]: unknown key 'lr' (did you mean lrs?)"),
    ("compare-tune-table-type", "compare --config {tmp}/tune_type.toml",
     "[tune] seeds must be a non-empty list"),
    ("sweep-tune-table", "sweep --config {tmp}/tune_ok.toml",
     "[tune] works with `fedjax-sim compare` only"),
]


def prepare_extra_files(tmp: Path) -> None:
    """The files the ``EXTRA_CASES`` point at."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "iid_alpha.toml").write_text('partition = "iid"\nalpha = 0.3\n')
    (tmp / "table_typo.toml").write_text('algorithm = "fedobp"\n[fedobp]\nig_ratoi = 0.5\n')
    (tmp / "plugin_missing.toml").write_text('plugin = "no_such_plugin_xyz"\n')
    (tmp / "key_typo.toml").write_text("num_client = 4\n")
    (tmp / "tune_typo.toml").write_text("[tune]\nlr = [0.1]\n")
    (tmp / "tune_type.toml").write_text("[tune]\nseeds = 0\n")
    (tmp / "tune_ok.toml").write_text("[tune]\nlrs = [0.1]\n")


def extra_cases(battery) -> list:
    """``EXTRA_CASES`` as the battery's cases."""
    return [battery._c(*case) for case in EXTRA_CASES]


def load_battery():
    """The ``tests/test_bad_input.py`` module (its ``CLI_CASES``, ``prepare_files``, ...)."""
    path = ROOT / "tests" / "test_bad_input.py"
    spec = importlib.util.spec_from_file_location("bad_input_battery", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_case(battery, case, tmp: Path) -> dict:
    """Runs one case in a fresh process; returns what it did and whether that passes."""
    battery.prepare_files(tmp)
    prepare_extra_files(tmp)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for key in ("XLA_FLAGS", "FEDJAX_SIM_STRATEGY"):
        env.pop(key, None)
    env.update(dict(case.env))
    argv = battery.command(case, tmp)
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedjax_sim.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - tic
    err = proc.stderr
    prefix = f"fedjax-sim {case.argv[0]}: error: "
    ok = (proc.returncode == 2 and err.count("\n") == 1 and err.startswith(prefix)
          and "Traceback" not in err and battery.expected(case, tmp) in err
          and not (tmp / "out").exists())
    return {"id": case.id, "ok": ok, "returncode": proc.returncode, "elapsed_s": elapsed,
            "stderr": err}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", default=None, help="comma-separated case ids (default: all)")
    parser.add_argument("--json", default=None, help="also write every result to this file")
    args = parser.parse_args(argv)
    battery = load_battery()
    cases = battery.CLI_CASES + extra_cases(battery)
    if args.ids is not None:
        wanted = [i.strip() for i in args.ids.split(",") if i.strip()]
        unknown = sorted(set(wanted) - {c.id for c in cases})
        if unknown:
            parser.error(f"--ids: unknown {', '.join(unknown)}")
        cases = [c for c in cases if c.id in wanted]
    results = []
    for case in cases:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_case(battery, case, Path(tmp))
        results.append(result)
        if not result["ok"]:
            print(f"NOT REJECTED AS EXPECTED {case.id} (status {result['returncode']}):\n"
                  f"{result['stderr'][-2000:]}", file=sys.stderr)
    rejected = sum(r["ok"] for r in results)
    worst = max(results, key=lambda r: r["elapsed_s"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"{len(results)} bad inputs: {rejected} rejected with one line, "
          f"max {worst['elapsed_s']:.1f} s ({worst['id']}), "
          f"median {sorted(r['elapsed_s'] for r in results)[len(results) // 2]:.1f} s")


if __name__ == "__main__":
    main()
