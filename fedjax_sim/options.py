"""The option schema: each option of an experiment declared once, on its field.

A field of :class:`fedjax_sim.spec.ExperimentSpec` is declared with :func:`option`, which
records in the field's metadata what every layer needs to know about it:

* its **section** (``data``, ``model``, ``public``, ``clock``, ``loop``, ``execution``,
  ``output``): the help group of its flag, and what it belongs to;
* whether it changes the **numbers** a run produces (``numbers=False``: where and how a
  run goes, never what it computes; left out of a run's identity);
* its **range** (``low``/``high``, open or closed) or its **choices**, checked by
  :func:`check_value` with one message for every layer (``--alpha must be a finite
  number > 0, got 0``);
* its **help text** and which commands show it as a flag (``commands``), so that
  ``fedjax_sim.cli`` generates the flags and ``fedjax_sim.config`` reads the config-file
  keys with the field's type (:func:`kinds`).

Checks that relate several options (``--deadline`` needs ``--condition deadline``) stay
beside the build code in ``fedjax_sim.spec``; this module holds what one option says
about itself.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedjax_sim.checks import check_choice, check_float, check_int

# The sections in the order the help shows them, with their help-group titles.
SECTIONS = ("algorithm", "data", "model", "public", "clock", "loop", "execution", "output")
ALL_COMMANDS = ("run", "compare", "sweep")


@dataclasses.dataclass(frozen=True)
class Option:
    """What one option says about itself (see the module docstring).

    Attributes:
      section: one of :data:`SECTIONS`.
      help: the flag's help text; ``{name}`` placeholders are filled by the command line
        (e.g. ``{sources}``, the data sources registered when the parser is built).
      numbers: whether the option can change the numbers a run produces.
      low, high, low_open, high_open: the allowed range of a number (None: unbounded).
      choices: the allowed values, or a function returning them (read when checked, so
        that plug-ins registered later count).
      commands: the commands that take the option as a flag.
      aliases: further flag spellings (``--over-select`` for ``--first-m``).
      negated: for a flag that sets a true-by-default option false (``--no-progress``),
        its name.
      run_only: the option acts on one run only: ``compare`` and ``sweep`` refuse it
        as a config-file key.
      check: ``(label, value) -> value``, a check of its own instead of the range (a
        seed's wording, say).
    """

    section: str
    help: str = ""
    numbers: bool = True
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | Callable[[], tuple] | None = None
    commands: tuple[str, ...] = ALL_COMMANDS
    aliases: tuple[str, ...] = ()
    negated: str | None = None
    run_only: bool = False
    check: Callable[[str, Any], Any] | None = None

    def allowed(self) -> tuple | None:
        """The allowed values (None: any value of the option's type in range)."""
        return self.choices() if callable(self.choices) else self.choices


def option(default: Any, section: str, help: str = "", **attributes: Any) -> Any:
    """A dataclass field with ``default`` whose metadata is an :class:`Option`."""
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {', '.join(SECTIONS)}, got {section!r}")
    if section in ("execution", "output"):
        attributes.setdefault("numbers", False)
    described = Option(section, help, **attributes)
    return dataclasses.field(default=default, metadata={"option": described})


def declared(record_type: type) -> dict[str, Option]:
    """Every field of ``record_type`` declared with :func:`option`, by name, in order."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(record_type)
            if "option" in f.metadata}


def kinds(record_type: type) -> tuple[dict[str, type], frozenset[str]]:
    """``({field: type}, {fields that may be unset})`` from ``record_type``'s annotations:
    ``int | None`` is an ``int`` that may be None."""
    hints = typing.get_type_hints(record_type)
    found: dict[str, type] = {}
    optional = set()
    for name in declared(record_type):
        args = typing.get_args(hints[name])
        kind = next((a for a in args if a is not type(None)), hints[name]) if args \
            else hints[name]
        found[name] = kind
        if type(None) in args:
            optional.add(name)
    return found, frozenset(optional)


def in_section(record_type: type, *sections: str) -> tuple[str, ...]:
    """The names of ``record_type``'s options in ``sections``, in declaration order."""
    return tuple(n for n, o in declared(record_type).items() if o.section in sections)


def check_value(described: Option, kind: type, value: Any, label: str) -> Any:
    """``value`` checked against the option's own range or choices (the caller handles
    None for an option that may be unset).

    Returns:
      the value normalized to the option's type (an int given for a float option becomes
      a float), so that equal settings hash equal.

    Raises:
      ValueError: naming ``label`` and what the option allows.
    """
    if described.check is not None:
        return described.check(label, value)
    choices = described.allowed()
    if choices is not None:
        return check_choice(label, value, tuple(choices))
    if kind is bool:
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"{label} must be true or false, got {value!r}")
        return bool(value)
    if kind is int:
        low = None if described.low is None else int(described.low)
        high = None if described.high is None else int(described.high)
        return check_int(label, value, low, high)
    if kind is float:
        return check_float(label, value, described.low, described.high,
                           low_open=described.low_open, high_open=described.high_open)
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{label} must be text, got {value!r}")
    return value


def fill_help(described: Option, context: Mapping[str, str]) -> str:
    """The option's help text with its ``{name}`` placeholders filled from ``context``."""
    return described.help.format_map(context) if "{" in described.help else described.help
