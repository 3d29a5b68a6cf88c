#!/usr/bin/env bash
# Set up artloop in ./.venv. CPU torch 2.13.0 goes in first: an unpinned torch (or a package
# asking for a newer one) pulls a multi-GB CUDA build onto a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "artloop installed in $(pwd)/.venv"
