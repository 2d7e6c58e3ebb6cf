#!/usr/bin/env bash
# Set up a fresh machine for ssl_colorize: a virtual environment in .venv with PyTorch and the package.
#   bash scripts/bootstrap.sh            # Python side only
#   bash scripts/bootstrap.sh --system   # also Debian's SLURM (slurm-wlm, munge) and Chromium, for the tests
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--system" ]]; then
  need=()
  command -v slurmctld >/dev/null || need+=(slurm-wlm)
  command -v munged >/dev/null || need+=(munge)
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  if ((${#need[@]})); then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
  fi
fi

PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch, torchvision" 2>/dev/null; then
  # torch 2.14.1 / torchvision 0.29.1 are the newest this project is tested with; pip takes them from a
  # local wheel cache where one is configured, else from PyPI. Any torch>=2.1 works (pyproject.toml).
  case "$(uname -m)" in
    aarch64) python -m pip install -q "torch==2.9.1" "torchvision==0.24.1" ;;
    *) python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" ;;
  esac
fi
python -m pip install -q -e ".[test]"
python -c "import ssl_colorize, torch; print('ssl_colorize ready: torch', torch.__version__)"
