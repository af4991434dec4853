"""The second reliability probe (issue 28, "Nothing lost, nothing hidden, round two"), rerun
as a new user would: each case runs real commands (``fedjax-sim ...`` in a fresh process,
or a short Python script for the Python API) in temporary folders, with tiny settings, on
the default device setup (no forced XLA flags or strategies: on a 2-core CPU that is two
CPU devices), and checks the behaviour the issue asks for.

Prints one line per check, ``case N.k: held (detail)`` or ``case N.k: FAILED (detail)``,
then a count. Exit status 0 when every check held, 1 otherwise.

    python experiments/probe.py                                   # every case (~5-8 min)
    python experiments/probe.py --cases 2,8                       # some of them
    python experiments/probe.py --out experiments/results/probe_round_two.txt

Case 11 (a wheel / non-editable install imports every module) runs
``tests/test_install.py`` (``-m "slow or not slow"``), which builds the wheel offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Tiny run settings, where the command allows them.
TINY = ["--num-clients", "4", "--rounds", "2", "--local-epochs", "1", "--no-progress"]
# What a user on this machine gets: nothing forced from outside.
UNSET = ("XLA_FLAGS", "FEDJAX_SIM_STRATEGY", "FEDJAX_SIM_STALL_TIMEOUT", "PYTHONPATH")
GIB = 2**30


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in UNSET}


def _fedjax_sim() -> list[str]:
    """The installed console script, as a user types it; ``python -m fedjax_sim`` else."""
    script = shutil.which("fedjax-sim")
    return [script] if script else [sys.executable, "-m", "fedjax_sim"]


class Proc:
    """One finished process: exit status, output, wall time, its own peak RSS."""

    def __init__(self, returncode, stdout, stderr, wall, maxrss, timed_out):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        self.wall, self.maxrss, self.timed_out = wall, maxrss, timed_out

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def brief(self) -> str:
        tail = self.err_lines[-1] if self.err_lines else ""
        return f"exit {self.returncode}, {self.wall:.1f} s, stderr: {_short(tail)}"


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


def run(argv: list[str], *, cwd: Path | None = None, timeout: float = 300, env=None,
        merge: bool = False, on_start=None) -> Proc:
    """Runs ``argv``; returns its :class:`Proc`, with the peak RSS of that process alone
    (``os.wait4``). ``on_start(popen)`` runs in a thread once it started."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        tic = time.perf_counter()
        popen = subprocess.Popen(argv, cwd=cwd or ROOT, env=env or _env(), stdout=out,
                                 stderr=subprocess.STDOUT if merge else err, text=True,
                                 start_new_session=True)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        helper = None
        if on_start is not None:
            helper = threading.Thread(target=on_start, args=(popen,), daemon=True)
            helper.start()
        try:
            _, status, usage = os.wait4(popen.pid, 0)
        finally:
            timer.cancel()
        popen.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - tic
        if helper is not None:
            helper.join(timeout=5)
        out.seek(0)
        err.seek(0)
        return Proc(popen.returncode, out.read(), err.read(), wall,
                    usage.ru_maxrss * 1024, timed_out.is_set())


def cli(*args: str, **kwargs) -> Proc:
    return run([*_fedjax_sim(), *args], **kwargs)


def strict_json(text: str):
    """``json.loads`` that refuses NaN / Infinity literals."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def read_json(path: Path):
    return strict_json(path.read_text())


def one_line_error(proc: Proc, code: int, *needles: str) -> tuple[bool, str]:
    """Exit ``code`` with exactly one stderr line holding every needle, no traceback."""
    lines = proc.err_lines
    ok = (proc.returncode == code and len(lines) == 1 and "Traceback" not in proc.stderr
          and all(n in lines[0] for n in needles))
    if ok:
        return True, f"exit {code}: {_short(lines[0])}"
    return False, (f"expected exit {code} and one stderr line with {needles}; got exit "
                   f"{proc.returncode}, {len(lines)} stderr lines: "
                   f"{_short(' | '.join(lines[-3:]), 300)}")


# ---- the cases: each returns [(id, held, detail), ...] -------------------------------------


def case_1(tmp: Path) -> list:
    """A synthetic natural set too big for the host is refused (exit 5, one line naming
    --num-clients) before it is generated: peak memory stays far below a gigabyte."""
    results = []
    for k, clients in ((1, "100000"), (2, "5000000"), (3, "10000")):
        out = tmp / f"synthetic{clients}"
        proc = cli("run", "--dataset", "synthetic", "--partition", "natural",
                   "--num-clients", clients, "--rounds", "1", "--no-progress",
                   "--output", str(out), timeout=90)
        ok, detail = one_line_error(proc, 5, "host memory", "--num-clients")
        small = proc.maxrss < GIB
        held = ok and small and not out.exists()
        rss = f"peak RSS {proc.maxrss / 2**20:.0f} MiB, {proc.wall:.1f} s"
        if held:
            results.append((f"1.{k}", True, f"--num-clients {clients}: {detail}; {rss}"))
        elif proc.timed_out:
            made = sorted(p.name for p in out.iterdir()) if out.exists() else []
            results.append((f"1.{k}", False, (
                f"--num-clients {clients}: not refused; the data was built (peak RSS "
                f"{proc.maxrss / GIB:.2f} GiB) and the run was still in round 1 after "
                f"{proc.wall:.0f} s, when the probe stopped it (folder: {made})")))
        else:
            results.append((f"1.{k}", False, f"--num-clients {clients}: {detail}; {rss}"
                            + ("" if not out.exists() else "; an output folder was made")))
    return results


DIVERGE_LOCAL = '''"""Only the Local reference of --compare-local diverges (its lr is 1e30), as in
tests/test_cli_options.py."""
import fedjax_sim.spec as spec_module

_real = spec_module.build_local


def _diverging(spec, model, num_clients):
    return _real(spec.replace(lr=1e30), model, num_clients)


spec_module.build_local = _diverging
'''


def case_2(tmp: Path) -> list:
    """--compare-local: a diverging run, a diverging Local reference, SIGTERM in Local."""
    results = []
    out = tmp / "fedper"
    proc = cli("run", "--algorithm", "fedper", "--lr", "1e3", "--compare-local", *TINY,
               "--output", str(out))
    ok, detail = one_line_error(proc, 3, "diverged at round")
    status = read_json(out / "summary.json").get("status") if (out / "summary.json").is_file() \
        else None
    results.append(("2.1", ok and status == "diverged",
                    f"fedper --lr 1e3 --compare-local: {detail}; summary status {status}"))

    plugin = tmp / "diverge_local.py"
    plugin.write_text(DIVERGE_LOCAL)
    out = tmp / "local_diverges"
    proc = cli("run", "--plugin", str(plugin), "--algorithm", "fedper", "--compare-local",
               *TINY, "--output", str(out))
    ok, detail = one_line_error(proc, 3, "the Local reference diverged")
    try:
        local = read_json(out / "local" / "summary.json")["status"]
        main = read_json(out / "summary.json")
        ref = main.get("local_reference")
        state = f"local/summary.json {local}, summary.json {main['status']}, reference {ref}"
        ok = ok and local == "diverged" and main["status"] == "complete" and \
            ref == {"folder": "local", "status": "diverged"}
    except (OSError, ValueError, KeyError) as error:
        ok, state = False, f"summaries unreadable: {error}"
    results.append(("2.2", ok, f"only Local diverges (plug-in sets its lr to 1e30): "
                               f"{detail}; {state}"))

    # SIGTERM from outside once the Local reference has written its first record.
    rounds = "150"
    args = ["run", "--algorithm", "fedper", "--compare-local", "--num-clients", "4",
            "--rounds", rounds, "--local-epochs", "1", "--no-progress"]
    out = tmp / "sigterm"
    sent = {}

    def term_in_local(popen):
        metrics = out / "local" / "metrics.jsonl"
        while popen.poll() is None:
            if metrics.is_file() and metrics.stat().st_size > 0:
                sent["at"] = time.perf_counter()
                popen.send_signal(signal.SIGTERM)
                return
            time.sleep(0.02)

    proc = cli(*args, "--output", str(out), on_start=term_in_local)
    last = proc.err_lines[-1] if proc.err_lines else ""
    match = re.search(r"stopped in the Local reference at round (\d+) of " + rounds, last)
    hint = last.split("resume with: ", 1)[1] if "resume with: " in last else None
    try:
        local = read_json(out / "local" / "summary.json")["status"]
        main = read_json(out / "summary.json")
    except (OSError, ValueError, KeyError):
        local, main = None, {}
    ok = (bool(sent) and proc.returncode == 128 + signal.SIGTERM and match is not None
          and hint is not None and (out / "local" / "checkpoints").is_dir()
          and local == "stopped" and main.get("local_reference", {}).get("status") == "stopped"
          and "Traceback" not in proc.stderr)
    detail = (f"exit {proc.returncode}, local/summary.json {local}, local/checkpoints "
              f"{'kept' if (out / 'local' / 'checkpoints').is_dir() else 'missing'}: "
              f"{_short(last, 200)}" if sent else "the run ended before Local wrote a record")
    results.append(("2.3", ok, f"SIGTERM during the Local reference: {detail}"))

    if hint is None:
        results.append(("2.4", False, "no resume command was printed"))
        return results
    stopped_at = int(match.group(1)) if match else -1
    command = shlex.split(hint)
    if command[:1] == ["fedjax-sim"]:
        command = [*_fedjax_sim(), *command[1:]]
    resumed = run(command)
    whole = tmp / "sigterm_whole"
    straight = cli(*args, "--output", str(whole))
    try:
        a = read_json(out / "local" / "summary.json")
        b = read_json(whole / "local" / "summary.json")
        keys = ("accuracy", "hurt_fraction", "ipr", "tie_fraction")
        ra, rb = read_json(out / "summary.json"), read_json(whole / "summary.json")
        same = (a["client_accuracies"] == b["client_accuracies"]
                and {k: ra.get(k) for k in keys} == {k: rb.get(k) for k in keys})
        ok = (resumed.returncode == 0 and straight.returncode == 0 and a["status"] ==
              "complete" and a.get("resumed_from") == stopped_at and same)
        detail = (f"the printed command exits {resumed.returncode}; Local resumed from round "
                  f"{a.get('resumed_from')}, status {a['status']}; Local's accuracies and the "
                  f"run's accuracy/hurt/IPR {'equal' if same else 'DIFFER from'} an "
                  "uninterrupted run's")
    except (OSError, ValueError, KeyError) as error:
        ok, detail = False, f"{resumed.brief()}; summaries unreadable: {error}"
    results.append(("2.4", ok, f"--resume continues the Local reference: {detail}"))
    return results


def case_3(tmp: Path) -> list:
    """A sweep into a folder of another grid is refused and changes nothing; a seed more
    continues it."""
    out = tmp / "sweep"
    base = ["sweep", "--algorithms", "fedavg", "--num-clients", "4", "--local-epochs", "1",
            "--no-progress", "--output", str(out)]
    first = cli(*base, "--seeds", "0", "--rounds", "5")
    names = ("results.jsonl", "results.md", "grid.json")
    if first.returncode != 0:
        return [("3.1", False, f"the first sweep failed: {first.brief()}")]
    before = {n: (out / n).read_bytes() for n in names}
    other = cli(*base, "--seeds", "0", "--rounds", "6")
    ok, detail = one_line_error(other, 2, "another grid")
    unchanged = {n: (out / n).read_bytes() for n in names} == before
    results = [("3.1", ok and unchanged, f"--rounds 6 after --rounds 5: {detail}; "
                f"results.jsonl/results.md/grid.json {'unchanged' if unchanged else 'CHANGED'}")]
    more = cli(*base, "--seeds", "0,1", "--rounds", "5")
    lines = (out / "results.jsonl").read_text().splitlines()
    skipped = "1 skipped" in more.stdout + more.stderr
    results.append(("3.2", more.returncode == 0 and len(lines) == 2 and skipped,
                    f"--seeds 0,1 after --seeds 0: exit {more.returncode}, results.jsonl "
                    f"{len(lines)} lines, the finished run {'skipped' if skipped else 'rerun'}"))
    return results


def case_4(tmp: Path) -> list:
    """--overwrite refuses a run folder that also holds a user's file, and keeps it."""
    out = tmp / "run"
    first = cli("run", *TINY, "--output", str(out))
    if first.returncode != 0:
        return [("4.1", False, f"the first run failed: {first.brief()}")]
    (out / "notes.txt").write_text("my notes")
    proc = cli("run", *TINY, "--output", str(out), "--overwrite")
    ok, detail = one_line_error(proc, 2, "notes.txt")
    kept = (out / "notes.txt").is_file() and (out / "notes.txt").read_text() == "my notes"
    run_kept = (out / "summary.json").is_file()
    return [("4.1", ok and kept and run_kept,
             f"{detail}; notes.txt {'kept' if kept else 'LOST'}, the run's files "
             f"{'kept' if run_kept else 'removed'}")]


def case_5(tmp: Path) -> list:
    """--resume after metrics.jsonl was deleted: a one-line refusal naming the file."""
    out = tmp / "run"
    first = cli("run", *TINY, "--checkpoint-every", "1", "--output", str(out))
    if first.returncode != 0:
        return [("5.1", False, f"the first run failed: {first.brief()}")]
    (out / "metrics.jsonl").unlink()
    proc = cli("run", *TINY, "--rounds", "3", "--output", str(out), "--resume")
    ok, detail = one_line_error(proc, 2, "metrics.jsonl")
    return [("5.1", ok, detail)]


FAILING_HANDLER = r'''
import json, sys
from fedjax_sim import algorithms
from fedjax_sim.data import make_federated_data
from fedjax_sim.models import make_model
from fedjax_sim.runner import Events, run

out = sys.argv[1]
data, _, _ = make_federated_data("digits", partition="iid", num_clients=4, seed=0)
model = make_model("mlp", data.input_shape, data.num_classes)
algorithm = algorithms.make("fedavg", model, local_epochs=1)

def broken(**_):
    raise RuntimeError("the handler broke")

report = {}
try:
    run(algorithm, data, rounds=2, output=out, events=Events().on("evaluate", broken),
        progress=False)
    report["raised"] = None
except Exception as error:
    report["raised"] = f"{type(error).__name__}: {error}"
report["summary"] = json.load(open(out + "/summary.json"))
try:
    again = run(algorithm, data, rounds=2, output=out, progress=False)
    report["again"] = again.summary["status"]
except Exception as error:
    report["again"] = f"{type(error).__name__}: {error}"
print(json.dumps(report))
'''


def case_6(tmp: Path) -> list:
    """A failure after start leaves status failed with a one-line reason; the next run into
    the folder works without --overwrite."""
    out = tmp / "run"
    proc = run([sys.executable, "-c", FAILING_HANDLER, str(out)])
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [("6.1", False, f"the script failed: {proc.brief()}")]
    summary = report["summary"]
    reason = summary.get("reason")
    strict = True
    try:
        read_json(out / "summary.json")
    except ValueError:
        strict = False
    ok = (report["raised"] == "RuntimeError: the handler broke" and summary.get("status") ==
          "failed" and isinstance(reason, str) and "\n" not in reason and strict)
    return [("6.1", ok, f"handler raising on 'evaluate': raised {report['raised']!r}; "
                        f"summary.json status {summary.get('status')}, reason {reason!r}"),
            ("6.2", report["again"] == "complete",
             f"the next run into the same folder (no overwrite): {report['again']}")]


BAD_CALLS = r'''
import json, os, sys, time
out = sys.argv[1]
from fedjax_sim import algorithms
from fedjax_sim.data import make_federated_data
from fedjax_sim.models import make_model
from fedjax_sim.runner import Events, run

data, _, _ = make_federated_data("digits", partition="iid", num_clients=4, seed=0)
model = make_model("mlp", data.input_shape, data.num_classes)
algorithm = algorithms.make("fedavg", model, local_epochs=1)
calls = [
    ('make_model("mlp", "64", 10)', lambda: make_model("mlp", "64", 10)),
    ('algorithms.make("fedper", "notamodel")', lambda: algorithms.make("fedper", "notamodel")),
    ("run(None, data, ...)", lambda: run(None, data, rounds=1, output=out + "/a",
                                         progress=False)),
    ("run(..., local_accuracies=3 values for 4 clients)",
     lambda: run(algorithm, data, rounds=1, output=out + "/b", progress=False,
                 local_accuracies=[0.5, 0.5, 0.5])),
    ("run(..., local_accuracies=[0.5, 0.5, 0.5, 1.5])",
     lambda: run(algorithm, data, rounds=1, output=out + "/c", progress=False,
                 local_accuracies=[0.5, 0.5, 0.5, 1.5])),
    ('Events().on("evaluate", 42)', lambda: Events().on("evaluate", 42)),
]
report = []
for name, call in calls:
    tic = time.perf_counter()
    try:
        call()
        kind, message = None, ""
    except Exception as error:
        kind, message = type(error).__name__, str(error)
    report.append({"call": name, "error": kind, "message": message,
                   "seconds": time.perf_counter() - tic,
                   "folder": sorted(os.listdir(out))})
print(json.dumps(report))
'''


def case_7(tmp: Path) -> list:
    """Invalid Python API calls raise TypeError / ValueError at once, nothing written."""
    out = tmp / "api"
    out.mkdir()
    proc = run([sys.executable, "-c", BAD_CALLS, str(out)])
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [("7.1", False, f"the script failed: {proc.brief()}")]
    results = []
    for k, item in enumerate(report, 1):
        ok = (item["error"] in ("TypeError", "ValueError") and "\n" not in item["message"]
              and item["seconds"] < 5 and not item["folder"])
        wrote = f", wrote {item['folder']}" if item["folder"] else ""
        results.append((f"7.{k}", ok, f"{item['call']}: {item['error']}: "
                                      f"{_short(item['message'], 140)} "
                                      f"({item['seconds']:.2f} s{wrote})"))
    return results


def _zero_checkpoint(step: Path) -> None:
    """Tears a checkpoint as a crash or a bad disk might: every file over 64 bytes zeroed."""
    for path in step.rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(b"\0" * path.stat().st_size)


def case_8(tmp: Path) -> list:
    results = []
    # 8.1 the latest checkpoint torn: a warning, resume from the one before, same numbers.
    out = tmp / "torn"
    first = cli("run", *TINY, "--checkpoint-every", "1", "--output", str(out))
    whole = tmp / "whole"
    straight = cli("run", *TINY, "--rounds", "3", "--output", str(whole))
    if first.returncode or straight.returncode:
        results.append(("8.1", False, f"setup failed: {first.brief()}; {straight.brief()}"))
    else:
        _zero_checkpoint(out / "checkpoints" / "2")
        proc = cli("run", *TINY, "--rounds", "3", "--output", str(out), "--resume")
        warned = [line for line in proc.err_lines if "cannot be read" in line]
        try:
            a, b = read_json(out / "summary.json"), read_json(whole / "summary.json")
            same = a["client_accuracies"] == b["client_accuracies"]
            ok = proc.returncode == 0 and bool(warned) and a.get("resumed_from") == 1 and same
            detail = (f"exit {proc.returncode}, resumed from round {a.get('resumed_from')}, "
                      f"accuracies {'equal to' if same else 'DIFFER from'} an uninterrupted "
                      f"3-round run's; warning: "
                      f"{_short(warned[0].split('Warning: ')[-1] if warned else 'none', 150)}")
        except (OSError, ValueError, KeyError) as error:
            ok, detail = False, f"{proc.brief()}; {error}"
        noise = [line.strip() for line in proc.err_lines if line not in warned and
                 not line.startswith("results in")]
        if noise:
            detail += (" (stderr also holds, besides the warning with its source location: "
                       + " | ".join(_short(line, 70) for line in noise) + ")")
        results.append(("8.1", ok, f"latest checkpoint torn: {detail}"))

    # 8.2 metrics.jsonl of random bytes.
    out = tmp / "garbage"
    first = cli("run", *TINY, "--checkpoint-every", "1", "--output", str(out))
    (out / "metrics.jsonl").write_bytes(os.urandom(64) + bytes(range(128, 256)))
    proc = cli("run", *TINY, "--rounds", "3", "--output", str(out), "--resume")
    ok, detail = one_line_error(proc, 2, "metrics.jsonl")
    results.append(("8.2", ok and first.returncode == 0,
                    f"metrics.jsonl of random bytes, --resume: {detail}"))

    # 8.3 / 8.4 --on-divergence warn; strict JSON files.
    out = tmp / "warn"
    proc = cli("run", *TINY, "--lr", "1e3", "--on-divergence", "warn", "--output", str(out))
    try:
        summary = read_json(out / "summary.json")
        ok = proc.returncode == 0 and summary["status"] == "diverged" and \
            "accuracy" not in summary
        detail = (f"exit {proc.returncode}, summary status {summary['status']}, accuracy "
                  f"{'absent' if 'accuracy' not in summary else summary['accuracy']}")
    except (OSError, ValueError, KeyError) as error:
        ok, detail = False, f"{proc.brief()}; {error}"
    results.append(("8.3", ok, f"--lr 1e3 --on-divergence warn: {detail}"))
    try:
        texts = {name: (out / name).read_text() for name in ("metrics.jsonl", "summary.json",
                                                              "config.json")}
        records = [strict_json(line) for line in texts["metrics.jsonl"].splitlines()]
        for name in ("summary.json", "config.json"):
            strict_json(texts[name])
        nulls = sum(r.get("train_loss", 0) is None for r in records)
        ok = nulls > 0
        detail = (f"metrics.jsonl ({len(records)} records), summary.json, config.json parse "
                  f"as strict JSON; train_loss null in {nulls} records")
    except (OSError, ValueError) as error:
        ok, detail = False, f"not strict JSON: {_short(str(error))}"
    results.append(("8.4", ok, detail))

    # 8.5 --dropout 1.0.
    out = tmp / "dropout"
    proc = cli("run", *TINY, "--system", "homogeneous", "--dropout", "1.0", "--output", str(out))
    ok, detail = one_line_error(proc, 2, "--dropout")
    results.append(("8.5", ok and not out.exists(),
                    f"--system homogeneous --dropout 1.0: {detail}"))

    # 8.6 a resume refusal names a default as "the default", never None.
    out = tmp / "default"
    first = cli("run", *TINY, "--checkpoint-every", "1", "--output", str(out))
    rest = [a for a in TINY if a not in ("--num-clients", "4")]
    proc = cli("run", *rest, "--output", str(out), "--resume")
    ok, detail = one_line_error(proc, 2, "the default")
    ok = ok and "None" not in proc.stderr and first.returncode == 0
    named = re.findall(r"[\w_]+: [^;:]*the default now", proc.stderr)
    if ok and named:
        detail = f"exit 2, one line, naming {'; '.join(named)}; no 'None'"
    results.append(("8.6", ok, f"resume without --num-clients 4: {detail}"))
    return results


def _readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def case_9(tmp: Path) -> list:
    proc = run([sys.executable, "-m", "fedjax_sim", "--help"], cwd=tmp)
    ok = proc.returncode == 0 and proc.stdout.startswith("usage: fedjax-sim") and \
        not proc.err_lines
    results = [("9.1", ok, f"python -m fedjax_sim --help: exit {proc.returncode}, "
                           f"{_short(proc.stdout.splitlines()[0] if proc.stdout else '')}")]
    script = tmp / "readme_example.py"
    script.write_text(_readme_python())
    proc = run([sys.executable, str(script)], cwd=tmp)
    summary = tmp / "runs" / "fedper-python" / "summary.json"
    try:
        status = read_json(summary)["status"]
    except (OSError, ValueError, KeyError):
        status = None
    results.append(("9.2", proc.returncode == 0 and status == "complete",
                    f"README's Python example, run verbatim in an empty folder: exit "
                    f"{proc.returncode}, runs/fedper-python/summary.json status {status} "
                    f"({proc.wall:.0f} s)"))
    return results


def case_10(tmp: Path) -> list:
    results = []
    for k, args, needles in (
            (1, ["--partition", "iid", "--alpha", "0.3"], ("--alpha has no effect",)),
            (2, ["--local-epochs", "5", "--local-steps", "10"],
             ("--local-epochs has no effect with --local-steps",))):
        out = tmp / f"run{k}"
        proc = cli("run", *args, "--output", str(out))
        ok, detail = one_line_error(proc, 2, *needles)
        results.append((f"10.{k}", ok and not out.exists(), f"run {' '.join(args)}: {detail}"))
    proc = cli("--version")
    ok = proc.returncode == 0 and re.fullmatch(r"fedjax-sim \S+", proc.stdout.strip())
    results.append(("10.3", bool(ok), f"--version: exit {proc.returncode}, "
                                      f"{proc.stdout.strip()!r}"))
    proc = cli("bench", "--num-clients", "4", "--rounds", "2", "--local-steps", "2",
               "--client-strategy", "all", merge=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    records = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    strategies = [r.get("strategy") for r in records]
    ok = (proc.returncode == 0 and first.startswith("fedjax-sim bench: timing")
          and len(records) == len(lines) - 1 == 3
          and strategies == ["vmap", "sequential", "chunked"])
    results.append(("10.4", ok, f"bench --client-strategy all: exit {proc.returncode}, first "
                                f"line {_short(first, 70)!r}, then {len(records)} JSON lines "
                                f"({', '.join(map(str, strategies))})"))
    proc = cli("run", "--algorithms", "fedavg,fedper")
    ok, detail = one_line_error(proc, 2, "run takes --algorithm")
    results.append(("10.5", ok, f"run --algorithms: {detail}"))
    path = tmp / "typo.toml"
    path.write_text('num_client = 4\nrounds = 2\n')
    proc = cli("run", "--config", str(path))
    ok, detail = one_line_error(proc, 2, "did you mean num_clients")
    results.append(("10.6", ok, f"TOML key num_client: {detail}"))
    return results


def case_11(tmp: Path) -> list:
    proc = run([sys.executable, "-m", "pytest", "tests/test_install.py", "-q", "-m",
                "slow or not slow", "-p", "no:cacheprovider", "-n", "0"], timeout=600)
    # The project's addopts hold -q too: with this -q the summary line is gone, so the
    # outcome letters of the progress lines are counted.
    marks = "".join(line.split("[")[0].strip() for line in proc.stdout.splitlines()
                    if re.search(r"\[\s*\d+%\]\s*$", line))
    counts = ", ".join(f"{marks.count(c)} {what}" for c, what in
                       ((".", "passed"), ("F", "failed"), ("E", "errors"), ("s", "skipped"))
                       if marks.count(c) or c == ".")
    return [("11.1", proc.returncode == 0 and marks and set(marks) <= {"."},
             f"pytest tests/test_install.py -m 'slow or not slow': exit {proc.returncode}, "
             f"{counts} ({proc.wall:.0f} s)")]


CASES = {1: case_1, 2: case_2, 3: case_3, 4: case_4, 5: case_5, 6: case_6, 7: case_7,
         8: case_8, 9: case_9, 10: case_10, 11: case_11}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=None,
                        help="comma-separated case numbers (default: all, 1-11)")
    parser.add_argument("--out", default=None, help="also write the lines to this file")
    parser.add_argument("--json", default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    chosen = sorted(CASES) if args.cases is None else [int(c) for c in args.cases.split(",")]
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        parser.error(f"--cases: no case {unknown}; the cases are 1-{max(CASES)}")
    lines, results = [], []
    tic = time.perf_counter()
    for number in chosen:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"probe{number}-") as tmp:
            try:
                found = CASES[number](Path(tmp))
            except Exception as error:  # a broken probe is a failed case, not a crash
                found = [(f"{number}.?", False, f"the probe itself raised "
                                                 f"{type(error).__name__}: {error}")]
        for case, held, detail in found:
            line = f"case {case}: {'held' if held else 'FAILED'} ({detail})"
            print(line, flush=True)
            lines.append(line)
            results.append({"case": case, "held": bool(held), "detail": detail,
                            "seconds": time.perf_counter() - start})
    held = sum(r["held"] for r in results)
    failed = [r["case"] for r in results if not r["held"]]
    total = f"{held} held / {len(results)} checks" + (
        f"; FAILED: {', '.join(failed)}" if failed else "") + \
        f" ({time.perf_counter() - tic:.0f} s; {os.cpu_count()} CPU cores)"
    print(total, flush=True)
    lines.append(total)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
