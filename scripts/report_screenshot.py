"""A PNG of an HTML report, through headless Debian chromium (Playwright, a dev dependency;
scripts/apt-ensure.sh chromium): the README's picture of an experiment's report is this.

    .venv/bin/python scripts/report_screenshot.py DIR/report/index.html docs/experiment-report.png \
        [--width 1280] [--height 1700]

The page is shot from its top, `--height` pixels of it (0: the whole page).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1700)
    args = ap.parse_args()
    browser_path = os.environ.get("ARTLOOP_CHROMIUM") or shutil.which("chromium")
    if not browser_path:
        raise SystemExit("error: no chromium on PATH (scripts/apt-ensure.sh chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=browser_path, headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": args.width, "height": args.height or 900})
        page.goto(args.html.resolve().as_uri())
        page.screenshot(path=str(args.png), full_page=not args.height)
        browser.close()
    print(args.png)


if __name__ == "__main__":
    main()
