"""``fedjax-sim``: run, compare, sweep and benchmark algorithms from the command line.

  fedjax-sim run --algorithm fedper --dataset digits --alpha 0.1 --output runs/fedper
  fedjax-sim compare                      # the default comparison on digits, 3 seeds
  fedjax-sim sweep --config grid.toml     # a grid of configurations x seeds, resumable
  fedjax-sim bench --model cnn --num-clients 50 --local-steps 10

``run``, ``compare`` and ``sweep`` only parse their options (flags, ``--config`` files,
``--set`` overrides) into ``fedjax_sim.spec.ExperimentSpec`` s; ``spec.build`` makes the
data, models and algorithms and ``fedjax_sim.sweep`` runs grids.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from fedjax_sim.cli.commands import LOCAL_DIR, cmd_bench, cmd_run, cmd_sweep
from fedjax_sim.cli.compare import cmd_compare
from fedjax_sim.cli.parser import (
    COMMANDS,
    DEFAULT_COMPARE,
    DEFAULT_COMPARE_SEEDS,
    _flag,
    _load_plugins,
    _Parser,
    build_parser,
    load_plugin,
)
from fedjax_sim.cli.planning import _REFUSED, check_args, plan
from fedjax_sim.platform import check_environment, configure_cpu_devices, enable_compile_cache
from fedjax_sim.spec import DEFAULT_PUBLIC_FRACTION, DEFAULT_VAL_FRACTION

__all__ = ["COMMANDS", "DEFAULT_COMPARE", "DEFAULT_COMPARE_SEEDS", "DEFAULT_PUBLIC_FRACTION",
           "DEFAULT_VAL_FRACTION", "LOCAL_DIR", "_REFUSED", "build_parser", "check_args",
           "cmd_bench", "cmd_compare", "cmd_run", "cmd_sweep", "load_plugin", "main", "plan"]


def _within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return path == root or root in path.parents


def _error_message(error: BaseException, args: argparse.Namespace | None) -> str:
    """One line for ``error``; an OS error on a path given by an option names the option."""
    if isinstance(error, OSError) and error.filename is not None:
        reason = error.strerror or str(error)
        text = f"{error.filename}: {reason}"
        specs = getattr(args, "_specs", None)
        for key in ("output", "partition_file", "save_partition", "data_dir"):
            value = getattr(args, key, None)
            if value is None and specs:  # set by a config file
                value = getattr(specs[0], key, None)
            if value is not None and _within(error.filename, value):
                where = f"{_flag(key)} {value}"
                same = _within(value, error.filename)
                text = f"{where}: {reason}" if same else f"{where}: {error.filename}: {reason}"
                break
    elif isinstance(error, MemoryError):
        text = f"out of memory: {error}" if str(error) else "out of memory"
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Runs one command.

    Bad input (a ValueError, an OS error on a file, an unreadable JSON file, a JAX backend
    that cannot start) ends the process with one line ``fedjax-sim <command>: error: ...``
    on stderr and exit status 2, and Ctrl-C with ``fedjax-sim <command>: interrupted`` and
    status 130; only an unexpected error type, a bug, shows a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = _Parser(prog="fedjax-sim")  # until the full parser is built
    prog, args = parser.prog + (f" {command}" if command else ""), None
    handlers = {"run": cmd_run, "compare": cmd_compare, "sweep": cmd_sweep,
                "bench": cmd_bench}
    from fedjax_sim.core.checkpoint import CheckpointError
    from fedjax_sim.safety import RunError, StoppedError

    restore = _one_line_warnings(lambda: prog)
    try:
        plugins = _load_plugins(argv)
        parser = build_parser()
        args = parser.parse_args(argv)
        args._argv = argv
        args._plugins = plugins
        prog = f"{parser.prog} {args.command}"
        check_environment()
        check_args(args)  # everything, before any data loads or anything compiles
        # Before anything starts JAX's backends: the device count is fixed from then on.
        configure_cpu_devices(args.cpu_devices)
        if args.compile_cache:
            enable_compile_cache()
        handlers[args.command](args)
    except StoppedError as error:
        parser.exit(error.exit_code, f"{prog}: {error}\n")
    except RunError as error:
        parser.exit(error.exit_code, f"{prog}: error: {error}\n")
    except CheckpointError as error:
        parser.exit(2, f"{prog}: error: checkpoint {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{prog}: interrupted\n")
    except (ValueError, OSError, MemoryError) as error:
        parser.exit(2, f"{prog}: error: {_error_message(error, args)}\n")
    except RuntimeError as error:
        # JAX_PLATFORMS naming a backend that is not there.
        if not str(error).startswith("Unable to initialize backend"):
            raise
        parser.exit(2, f"{prog}: error: {_error_message(error, args)}\n")
    finally:
        restore()
    return 0


def _one_line_warnings(prog: Callable[[], str]) -> Callable[[], None]:
    """Warnings as one line ``fedjax-sim <command>: warning: ...`` (no source line), and
    the libraries' own error logs (orbax on a torn checkpoint, which the run handles and
    reports itself) kept off the terminal; returns what restores both."""
    import logging
    import warnings

    shown = warnings.formatwarning
    warnings.formatwarning = (lambda message, category, filename, lineno, line=None:
                              f"{prog()}: warning: {message}\n")
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)

    def restore() -> None:
        warnings.formatwarning = shown
        absl.setLevel(level)

    return restore
