"""One error convention for every entry point (DESIGN.md, "Contracts that keep it simple").

A user's mistake (a bad option, a missing path, an unwritable output) is one line on stderr that
names the option and the value, exit status 2, before any slow work and with nothing written.
Tracebacks are kept for our own bugs.

Every entry point is built the same way::

    def get_args_parser(add_help=True) -> ArgumentParser: ...
    def validate(args) -> None: ...          # raises UsageError; creates nothing
    def main(args): ...                      # the work

    def cli(argv=None):
        return run_cli(get_args_parser(), main, argv, validate=validate)

``validate`` checks options, inputs and that every output can be written (without creating it);
``main`` creates its outputs first thing, so a failure there is still before the work.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2


class UsageError(Exception):
    """A user's mistake: the message is printed as one line (``prog: error: message``), exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and --help without "(default: None)" clutter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block first; one line is easier to read in a job's log.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" only where there is a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        if isinstance(action.default, (list, tuple)) and not action.default:
            return text
        return f"{text} (default: %(default)s)"


def fail(option: str, value: Any, why: str) -> UsageError:
    """``--lr -1: must be > 0``: the option, the value as given, and what is wrong with it."""
    return UsageError(f"{option} {value}: {why}")


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], Any],
            argv: Sequence[str] | None = None, validate: Callable[[argparse.Namespace], Any] | None = None) -> Any:
    """Parse, validate, run; a UsageError anywhere becomes one stderr line and exit 2."""
    args = parser.parse_args(argv)
    try:
        if validate is not None:
            validate(args)
        return main(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def check_args(parser: argparse.ArgumentParser, validate: Callable[[argparse.Namespace], Any] | None,
               argv: Sequence[str]) -> str | None:
    """What ``run_cli`` would refuse in ``argv``, as a message; None when it would start the work.

    Used by the SLURM launcher to run an entry point's own validation before anything is submitted.
    """
    import contextlib
    import io

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(list(argv))
    except SystemExit as exc:
        if exc.code in (0, None):
            return None
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {exc.code}"
    try:
        if validate is not None:
            validate(args)
    except UsageError as exc:
        return f"{parser.prog}: error: {exc}"
    return None


# ---------------------------------------------------------------------------------------------
# Checks: each raises UsageError naming the option and the value; none creates anything.
# ---------------------------------------------------------------------------------------------

def check_number(option: str, value: float | int | None, *, minimum: float | None = None,
                 maximum: float | None = None, exclusive_minimum: bool = False, allow_none: bool = True) -> None:
    """``value`` within [minimum, maximum] (or (minimum, ...] with exclusive_minimum); None passes when allowed."""
    if value is None:
        if allow_none:
            return
        raise fail(option, value, "a value is required")
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(option, value, "must be a finite number")
    if minimum is not None:
        if exclusive_minimum and not value > minimum:
            raise fail(option, value, f"must be > {minimum:g}")
        if not exclusive_minimum and value < minimum:
            raise fail(option, value, f"must be >= {minimum:g}")
    if maximum is not None and value > maximum:
        raise fail(option, value, f"must be <= {maximum:g}")


def check_positive(option: str, value: float | int | None) -> None:
    check_number(option, value, minimum=0, exclusive_minimum=True)


def check_non_negative(option: str, value: float | int | None) -> None:
    check_number(option, value, minimum=0)


def check_choice(option: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise fail(option, value, f"must be one of {', '.join(map(str, choices))}")


def check_input_file(option: str, path: str | os.PathLike | None) -> Path | None:
    """An existing, readable file."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise fail(option, path, "no such file")
    if not p.is_file():
        raise fail(option, path, "not a file")
    if not os.access(p, os.R_OK):
        raise fail(option, path, "not readable")
    return p


def check_input_dir(option: str, path: str | os.PathLike | None) -> Path | None:
    """An existing, readable folder."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise fail(option, path, "no such folder")
    if not p.is_dir():
        raise fail(option, path, "not a folder")
    if not os.access(p, os.R_OK | os.X_OK):
        raise fail(option, path, "not readable")
    return p


def check_input_path(option: str, path: str | os.PathLike | None) -> Path | None:
    """An existing file or folder."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise fail(option, path, "no such file or folder")
    return check_input_dir(option, p) if p.is_dir() else check_input_file(option, p)


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_file(option: str, path: str | os.PathLike | None) -> Path | None:
    """A file that can be created or replaced: its folder exists and is writable, or can be made."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() and p.is_dir():
        raise fail(option, path, "is a folder, not a file")
    if p.exists() and not os.access(p, os.W_OK):
        raise fail(option, path, "not writable")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise fail(option, path, f"{base} is a file, so the folder cannot be made")
    if not os.access(base, os.W_OK | os.X_OK):
        raise fail(option, path, f"cannot write in {base}")
    return p


def check_output_dir(option: str, path: str | os.PathLike | None) -> Path | None:
    """A folder that exists and is writable, or can be made."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise fail(option, path, "is a file, not a folder")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise fail(option, path, f"{base} is a file, so the folder cannot be made")
    if not os.access(base, os.W_OK | os.X_OK):
        raise fail(option, path, f"cannot write in {base}")
    return p


def usage_error_from(exc: Exception) -> UsageError:
    """A ValueError raised while reading a user's file (our readers say which file) as a UsageError."""
    return UsageError(str(exc))


def exit_usage(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def check_device(option: str, value: str | None) -> None:
    """A torch device name this machine has ("auto" and None pass: they pick what there is)."""
    if value is None or value == "auto":
        return
    import torch

    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise fail(option, value, "not a device name (cpu, cuda, cuda:1 ...)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail(option, value, "CUDA is not available on this machine")


def check_tensorboard(option: str = "--tensorboard") -> None:
    """TensorBoard logging is an optional dependency: say how to get it instead of failing later."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError(f"{option}: needs the tensorboard package (pip install tensorboard)")
