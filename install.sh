#!/usr/bin/env bash
# Set up artloop in ./.venv. CPU torch 2.13.0 goes in first: an unpinned torch (or a package
# asking for a newer one) pulls a multi-GB CUDA build onto a machine without a GPU.
set -euo pipefail
# --no-compile: Python compiles what it imports on first use instead of byte-compiling every
# installed file up front (for vLLM's environment that was 94 s of a pip install, now 38 s).
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q --no-compile "torch==2.13.0"
.venv/bin/python -m pip install -q --no-compile -e ".[dev]"
echo "artloop installed in $(pwd)/.venv"
