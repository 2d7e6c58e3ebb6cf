#!/usr/bin/env bash
# Everything the test suite needs, then the tests: the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --system
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"   # the cluster daemons run as root
$SUDO bash slurm/local_cluster.sh start
export SSL_COLORIZE_REQUIRE_SLURM=1 SSL_COLORIZE_REQUIRE_BROWSER=1
.venv/bin/python -m pytest "$@"
