"""Run a sweep file as one SLURM job array: ``python slurm/sweep.py SWEEP.toml [--dry-run|--wait|--collect]``.

The same as ``python -m ssl_colorize.launch sweep ...``; see ssl_colorize/launch/sweep.py.
"""

import sys

from ssl_colorize.launch.sweep import cli

if __name__ == "__main__":
    sys.exit(cli())
