"""Entry points: which module a spec names, its parser, its own validation, and argv editing.

An entry point is a module exposing ``get_args_parser()``, ``main(args)`` and (usually) ``validate(args)``
(the convention of ``ssl_colorize.engine.cli``). A spec is its module name (``ssl_colorize.pretrain``,
``ssl_colorize.benchmarks.linear_probe``) or the launcher script of a benchmark (``benchmarks/linear_probe.py``),
which stands for the module ``ssl_colorize.benchmarks.linear_probe``. Jobs import the entry point by
module name, so an installed package (which has no ``benchmarks/`` folder) runs the same jobs.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from ssl_colorize.engine.cli import UsageError, check_args

PACKAGE = "ssl_colorize"


def module_name(spec: str) -> str:
    """The module an entry point spec names: ``benchmarks/NAME.py`` -> ``ssl_colorize.benchmarks.NAME``,
    ``ssl_colorize/pretrain.py`` -> ``ssl_colorize.pretrain``; a module name stays as it is."""
    if not (spec.endswith(".py") or "/" in spec):
        return spec
    parts = Path(spec).with_suffix("").parts
    if len(parts) >= 2 and parts[-2] == "benchmarks":
        return f"{PACKAGE}.benchmarks.{parts[-1]}"
    if PACKAGE in parts:
        return ".".join(parts[parts.index(PACKAGE):])
    raise UsageError(f"entry point {spec}: not a module; give a module name (ssl_colorize.pretrain, "
                     f"ssl_colorize.benchmarks.linear_probe) or benchmarks/NAME.py")


def job_name(spec: str) -> str:
    """A short name for job names and run ids: the module's last part (``linear_probe``)."""
    return module_name(spec).rsplit(".", 1)[-1]


def load_entry_point(spec: str) -> ModuleType:
    """Import an entry point and check it has ``get_args_parser`` and ``main``; UsageError if not."""
    name = module_name(spec)
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only the entry point itself missing is the user's mistake; a missing dependency is a bug.
        if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
            raise
        raise UsageError(f"entry point {spec}: no module {name}") from None
    for attr in ("get_args_parser", "main"):
        if not callable(getattr(module, attr, None)):
            raise UsageError(f"entry point {spec}: {name} has no {attr}(); an entry point exposes "
                             f"get_args_parser(), validate(args) and main(args)")
    return module


def entry_parser(spec: str) -> argparse.ArgumentParser:
    """The entry point's parser, named after the entry point in its messages (not after sys.argv[0])."""
    parser = load_entry_point(spec).get_args_parser()
    parser.prog = module_name(spec)
    return parser


def refusal(spec: str, argv: Sequence[str]) -> str | None:
    """Why the entry point would refuse ``argv`` (its parser, then its ``validate``), or None.

    The same checks as running it locally, made here so that no job is queued only to fail at start.
    """
    module = load_entry_point(spec)
    parser = entry_parser(spec)
    message = check_args(parser, getattr(module, "validate", None), [str(a) for a in argv])
    if message is None:
        return None
    prefix = f"{parser.prog}: error: "
    return message[len(prefix):] if message.startswith(prefix) else message


def parse_entry_args(spec: str, argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed by the entry point's parser after its validation; UsageError with the reason."""
    why = refusal(spec, argv)
    if why is not None:
        raise UsageError(f"{module_name(spec)} refuses {' '.join(map(str, argv)) or 'no arguments'}: {why}")
    return entry_parser(spec).parse_args([str(a) for a in argv])


# ----------------------------------------------------------------------------------------------------
# argv editing, spelt as the entry point's parser spells its options
# ----------------------------------------------------------------------------------------------------
def parser_option(parser: argparse.ArgumentParser, key: str) -> argparse.Action | None:
    """The parser's action for ``key`` (``lr``, ``out_csv``), spelt ``--key`` or with dashes, else None."""
    for option in (f"--{key}", f"--{key.replace('_', '-')}"):
        action = parser._option_string_actions.get(option)  # argparse keeps no public lookup
        if action is not None:
            return action
    return None


def has_option(argv: Sequence[str], action: argparse.Action) -> bool:
    return any(a.split("=", 1)[0] in action.option_strings for a in argv)


def _values_taken(action: argparse.Action) -> tuple[int, int]:
    """How many values an option takes after its flag: (at least, at most)."""
    nargs = action.nargs
    if nargs is None:
        return 1, 1
    if nargs == "?":
        return 0, 1
    if nargs in ("*", "+", argparse.REMAINDER):
        return (1 if nargs == "+" else 0), sys.maxsize
    return int(nargs), int(nargs)


def _looks_like_value(token: str) -> bool:
    return not token.startswith("-") or re.fullmatch(r"-\d.*", token) is not None


def without_option(argv: Sequence[str], action: argparse.Action) -> list[str]:
    """``argv`` without any occurrence of the option ``action`` (flag and values)."""
    out, pos = [], 0
    argv = list(argv)
    while pos < len(argv):
        token = argv[pos]
        if token.split("=", 1)[0] in action.option_strings:
            pos += 1
            if "=" not in token:
                least, most = _values_taken(action)
                taken = 0
                while pos < len(argv) and taken < most and (taken < least or _looks_like_value(argv[pos])):
                    pos += 1
                    taken += 1
            continue
        out.append(token)
        pos += 1
    return out


def with_option(parser: argparse.ArgumentParser, argv: Sequence[str], key: str, value: str) -> list[str]:
    """``argv`` with ``--key value`` replacing any earlier value, if the entry point has that option."""
    action = parser_option(parser, key)
    if action is None:
        return list(argv)
    return without_option(argv, action) + [action.option_strings[-1], str(value)]


def with_resume(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` continuing the run in ``--out`` from its rolling checkpoint, where the parser has --resume.

    ``--resume`` is a flag in the run contract (``ssl_colorize.engine.run.add_run_args``). An entry point
    whose ``--resume`` still takes a value gets ``auto`` (its rolling checkpoint, when there is one).
    """
    action = parser_option(parser, "resume")
    if action is None:
        return list(argv)
    least, _ = _values_taken(action)
    return without_option(argv, action) + [action.option_strings[-1], *(["auto"] if least else [])]


def options_to_argv(parser: argparse.ArgumentParser, values: dict[str, Any], source: str) -> list[str]:
    """``{"lr": 0.1, "taps": ["conv1", "conv2"], "amp": true}`` -> ``--lr 0.1 --taps conv1 conv2 --amp``,
    spelt as the entry point's parser spells them."""
    argv: list[str] = []
    for key, value in values.items():
        action = parser_option(parser, key)
        if action is None:
            raise UsageError(f"{source}: {key!r} is not an option of the entry point")
        option = action.option_strings[-1]
        if isinstance(action, argparse.BooleanOptionalAction):  # option_strings: --flag, --no-flag
            if not isinstance(value, bool):
                raise UsageError(f"{source}: {key} is a switch; give true or false, not {value!r}")
            argv.append(action.option_strings[0] if value else action.option_strings[1])
        elif action.nargs == 0:  # store_true / store_false / store_const
            if not isinstance(value, bool):
                raise UsageError(f"{source}: {key} is a switch; give true or false, not {value!r}")
            if value != bool(action.default):
                argv.append(option)
        elif isinstance(value, list):
            argv += [option, *map(str, value)]
        else:
            argv += [option, str(value)]
    return argv
