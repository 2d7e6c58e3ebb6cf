"""``python -m ssl_colorize.launch submit ...`` and ``python -m ssl_colorize.launch sweep ...``."""

from __future__ import annotations

import sys
from typing import Sequence

from ssl_colorize.engine.cli import exit_usage

COMMANDS = ("submit", "sweep")


def cli(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m ssl_colorize.launch"
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: {prog} {{submit,sweep}} ...\n\n"
              f"  submit   one job: {prog} submit [cluster options] -- ENTRYPOINT [ARGS...]\n"
              f"  sweep    a sweep file as one job array: {prog} sweep SWEEP.toml [options]\n\n"
              f"{prog} COMMAND --help shows a command's options.")
        return 0
    if not argv or argv[0] not in COMMANDS:
        exit_usage(prog, f"{argv[0] if argv else '(no command)'}: the command must be one of {', '.join(COMMANDS)}")
    command, rest = argv[0], argv[1:]
    if command == "submit":
        from ssl_colorize.launch import submit as module
    else:
        from ssl_colorize.launch import sweep as module
    parser = module.get_args_parser()
    parser.prog = f"{prog} {command}"
    from ssl_colorize.engine.cli import run_cli

    return run_cli(parser, module.main, rest, validate=module.validate)


if __name__ == "__main__":
    sys.exit(cli())
