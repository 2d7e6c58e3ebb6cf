"""Submit any entry point to SLURM: ``python slurm/submit.py [cluster options] -- ENTRYPOINT [ARGS...]``.

The same as ``python -m ssl_colorize.launch submit ...``; see ssl_colorize/launch/submit.py.
"""

import sys

from ssl_colorize.launch.submit import cli

if __name__ == "__main__":
    sys.exit(cli())
