"""Run folders: never overwritten, never shared, every file written atomically.

A run folder holds ``config.json`` (every resolved option, the command line, versions,
devices), ``metrics.jsonl`` (one record per evaluation), ``summary.json``, plots and
checkpoints. The rules:

* an existing non-empty folder is refused unless the run resumes it or is told to
  overwrite it; --overwrite removes only what fedjax-sim writes and refuses a folder that
  holds anything else; a folder whose run failed is reused as if empty;
* a lock file keeps a second process out while a run uses the folder;
* every file is written under a temporary name unique to the process, flushed to disk
  and renamed over the old one, so that a kill at any moment leaves either the old or
  the new file, never a torn one.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

# Files that mark a folder as a fedjax-sim run (or comparison, or sweep) folder.
RUN_MARKERS = ("config.json", "metrics.jsonl", "summary.json", "compare.md", "sweep.json",
               "grid.json", "results.jsonl", "checkpoints")
# Everything a run, comparison or sweep writes at the top of a folder (its subfolders are
# run folders themselves); --overwrite removes these and nothing else.
RUN_FILES = frozenset({
    "config.json", "metrics.jsonl", "summary.json", "compare.md", "compare.json",
    "sweep.json", "grid.json", "results.jsonl", "results.md", "accuracy.png", "clients.png",
    "accuracy_vs_time.png", "curves.png"})
RUN_DIRS = frozenset({"checkpoints"})
LOCK_NAME = ".lock"


class OutputError(ValueError):
    """An output folder that cannot be used as asked (exists, is locked, is a file)."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically: a temporary file unique to this process,
    fsync, rename, then fsync of the folder so that the rename itself is durable."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinity as None: the files stay strict JSON (null),
    which every parser reads, where Python would write the non-standard ``NaN``."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON (non-finite numbers as null; other objects by ``str``)."""
    return json.dumps(strict_json(value), default=str, allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, dumps(value, indent=2) + "\n")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """The whole record list, atomically (records are small: one per evaluation)."""
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file; a line that does not parse is an error naming the
    file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OutputError(f"{path}: not a text file of JSON lines (random or binary bytes); "
                          "restore it or start a fresh run") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise OutputError(f"{path}: line {number} is not valid JSON (a torn or edited "
                              "file); restore it or start a fresh run") from None
        if not isinstance(record, dict):
            raise OutputError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def default_output(kind: str, dataset: str, *, root: str | os.PathLike = "runs") -> Path:
    """A fresh folder name ``runs/<kind>-<dataset>-<YYYYmmdd-HHMMSS>`` (with a numeric
    suffix when a folder of that name exists already)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{kind}-{dataset}")
    base = Path(root) / f"{safe}-{stamp}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _is_run_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS)


def _visible_entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != LOCK_NAME]


def written_by_runs(entry: Path) -> bool:
    """Whether ``entry`` is something fedjax-sim writes in a run folder: a known file, a
    temporary file of an atomic write, the checkpoints, or a subfolder (a comparison's
    or sweep's run, the Local reference) that holds only such things."""
    if entry.is_symlink():
        return False
    if entry.is_file():
        return entry.name in RUN_FILES or (entry.name.startswith(".")
                                           and entry.name.endswith(".tmp"))
    if not entry.is_dir():
        return False
    return entry.name in RUN_DIRS or all(written_by_runs(e) for e in _visible_entries(entry))


def _not_written_by_runs(folder: Path) -> list[str]:
    return sorted(e.name for e in _visible_entries(folder) if not written_by_runs(e))


def failed_run(folder: Path) -> bool:
    """A run folder whose summary says the run failed, holding nothing but what runs
    write: it is reused without --overwrite."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(summary, dict) and summary.get("status") == "failed"
            and not _not_written_by_runs(folder))


def _overwrite_refusal(folder: Path, option: str) -> str | None:
    """Why --overwrite may not empty ``folder``, or None."""
    if not _is_run_folder(folder):
        return (f"{option} {folder}: --overwrite only replaces a fedjax-sim run folder, and "
                "this one holds other files")
    foreign = _not_written_by_runs(folder)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        return (f"{option} {folder}: --overwrite removes only what fedjax-sim writes, and "
                f"the folder also holds {shown}; move them out or choose another folder")
    return None


def _clear_run_files(folder: Path) -> None:
    for entry in _visible_entries(folder):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def preflight(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
              option: str = "--output") -> None:
    """The checks of :class:`RunDir` that need no lock, made before any data loads or
    anything compiles; raises OutputError."""
    path = Path(path)
    if resume and overwrite:
        raise OutputError("--resume and --overwrite exclude each other")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path}: exists and is not a folder")
    if resume:
        if not path.is_dir():
            raise OutputError(f"--resume: {option} {path} does not exist; nothing to resume")
        return
    if not path.is_dir() or not _visible_entries(path) or failed_run(path):
        return
    if not overwrite:
        raise OutputError(
            f"{option} {path}: the folder is not empty; give a new folder, --resume to "
            "continue the run in it, or --overwrite to replace it")
    refusal = _overwrite_refusal(path, option)
    if refusal:
        raise OutputError(refusal)


class RunDir:
    """An output folder held by this process for the length of a run.

    Use as a context manager: ``with RunDir(path, resume=..., overwrite=...) as out:``.
    Only process 0 of a multi-process run creates, locks and writes the folder (pass
    ``lead=False`` elsewhere).
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False,
                 overwrite: bool = False, lead: bool = True, option: str = "--output"):
        if resume and overwrite:
            raise OutputError("resume and overwrite exclude each other")
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self.lead = lead
        self.option = option
        self._lock_fd: int | None = None

    def __enter__(self) -> RunDir:
        if self.lead:
            self._open()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _open(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise OutputError(f"{self.option} {path}: exists and is not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"{self.option} {path}: cannot create it "
                              f"({error.strerror or error})") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{self.option} {path}: not writable")
        self._lock()
        entries = _visible_entries(path)
        if not entries or self.resume:
            return
        if failed_run(path):  # a failed run leaves nothing worth keeping but its reason
            _clear_run_files(path)
            return
        if not self.overwrite:
            self.release()
            raise OutputError(
                f"{self.option} {path}: the folder is not empty; give a new folder, "
                "--resume to continue the run in it, or --overwrite to replace it")
        refusal = _overwrite_refusal(path, self.option)
        if refusal:
            self.release()
            raise OutputError(refusal)
        _clear_run_files(path)

    def _lock(self) -> None:
        lock_path = self.path / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                holder = lock_path.read_text().strip() or "another process"
                raise OutputError(
                    f"{self.option} {self.path}: in use by {holder}; wait for it to end or "
                    "choose another folder") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"fedjax-sim process {os.getpid()} on {platform.node()}".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
            try:
                (self.path / LOCK_NAME).unlink()
            except OSError:
                pass


def environment() -> dict:
    """Versions, command line, git commit and devices of this process, for config.json."""
    import jax
    import jaxlib

    from fedjax_sim import __version__

    devices = jax.devices()
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "fedjax_sim": __version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "host": platform.node(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _git_commit() -> str | None:
    """The commit of the source tree this package runs from, if it is a git checkout."""
    source = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    return commit + ("-dirty" if dirty.stdout.strip() else "")
