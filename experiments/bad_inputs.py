"""Every bad command line of tests/test_bad_input.py as a real process, timed.

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
    cases = battery.CLI_CASES
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
