#!/usr/bin/env bash
# Debian's chromium for the browser tests (Playwright drives it by its path; Playwright cannot
# download its own browser here). Installs with apt-get when missing and prints the path.
set -euo pipefail
path="${ARTLOOP_CHROMIUM:-$(command -v chromium || true)}"
if [ -z "$path" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "chromium is missing: sudo apt-get install chromium (or set ARTLOOP_CHROMIUM)" >&2
        exit 1
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
    path="$(command -v chromium)"
fi
echo "$path"
