"""The web UI in a real browser: `artloop serve ui` started for real, headless Debian chromium
driven by Playwright. A person starts a session, sees the first image, draws a box on it with a
local prompt, applies the edit, accepts; the stored trajectory records the human's edit.
Screenshots of the main screens go to test-artefacts/ui/."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from artloop.serve.ui import UIError, box_from_clicks, serve
from artloop.tools.store import TrajectoryStore
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-artefacts" / "ui"


def chromium() -> str:
    path = os.environ.get("ARTLOOP_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail("no chromium: run scripts/apt-ensure.sh chromium (Debian's package)")
    return path


@pytest.fixture(params=[None])
def ui(tmp_path, request):
    port, home, token = free_port(), tmp_path / "home", request.param
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("artloop")), "serve", "ui", "--home", str(home),
         "--port", str(port)],
        env={**os.environ, "ARTLOOP_LOOP__MAX_ITERS": "2", **({"ARTLOOP_UI_TOKEN": token} if token else {})},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the UI did not start:\n{(tmp_path / 'ui.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url, TrajectoryStore(home)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                    args=["--no-sandbox"])  # fmt: skip
        yield browser.new_page(viewport={"width": 1600, "height": 1100})
        browser.close()


def test_a_person_draws_a_box_and_accepts(ui, page):
    from playwright.sync_api import expect

    url, store = ui
    expect.set_options(timeout=30_000)  # each UI round trip, even on a busy 2-core machine
    page.goto(url)
    page.locator("#prompt textarea").fill("a red fox in the snow")
    page.locator("#start").click()  # pauses at plan and verdict by default
    status = page.locator("#status")
    expect(status).to_contain_text("paused at plan", timeout=180_000)
    canvas = page.locator("#canvas img")
    expect(canvas).to_be_visible()
    page.screenshot(path=SHOTS / "1-paused-at-plan.png", full_page=True)
    run_id = re.search(r"([0-9a-f]{16})", status.inner_text()).group(1)

    # Draw a box: two clicks at opposite corners of the image.
    area = canvas.bounding_box()
    canvas.click(position={"x": area["width"] * 0.2, "y": area["height"] * 0.3})
    canvas.click(position={"x": area["width"] * 0.7, "y": area["height"] * 0.8})
    box_input = page.locator("#box input, #box textarea").first
    expect(box_input).to_have_value(re.compile(r"^\d+,\d+,\d+,\d+$"))
    box = [int(v) for v in box_input.input_value().split(",")]
    assert box == pytest.approx([200, 300, 700, 800], abs=15)
    page.locator("#local-prompt textarea, #local-prompt input").first.fill("a red woollen hat")
    page.locator("#add-box").click()
    expect(page.locator("#regions")).to_contain_text("a red woollen hat")
    page.screenshot(path=SHOTS / "2-box-drawn.png", full_page=True)

    page.locator("#apply").click()
    expect(status).to_contain_text("paused at verdict", timeout=180_000)
    expect(page.locator("#gallery")).to_contain_text("1: edited")
    page.screenshot(path=SHOTS / "3-paused-at-verdict.png", full_page=True)
    page.locator("#accept").click()
    expect(status).to_contain_text("accepted", timeout=180_000)
    page.screenshot(path=SHOTS / "4-accepted.png", full_page=True)

    run = store.get_run(run_id)
    assert run["status"] == "accepted" and len(run["steps"]) == 1
    step = run["steps"][0]
    assert step["decided_by"] == {"prompt": "agent", "plan": "human", "verdict": "human"}
    assert step["human"]["plan"]["regions"][0]["box"] == box
    assert step["human"]["plan"]["regions"][0]["prompt"] == "a red woollen hat"
    inpaint = [op for op in step["edits"] if op["op"] == "inpaint"]
    assert [(op["box"], op["prompt"]) for op in inpaint] == [(box, "a red woollen hat")]

    # Past sessions: the finished one is listed and exports.
    page.locator("#refresh").click()
    page.locator("#export").click()
    expect(page.locator("#export-file")).to_contain_text(f"export-{run_id}", timeout=60_000)
    assert (store.home / "ui" / f"export-{run_id}.zip").stat().st_size > 1000


def test_box_from_clicks_normalises_and_orders():
    assert box_from_clicks((96, 16), (32, 48), (128, 64)) == [250, 250, 750, 750]


def test_a_public_address_needs_a_token(store):
    with pytest.raises(UIError, match="set a token"):
        serve(None, host="0.0.0.0")  # type: ignore[arg-type]


@pytest.mark.parametrize("ui", ["s3cret"], indirect=True)
def test_token_login_and_upload_limits(ui):
    import httpx

    url, _ = ui
    client = httpx.Client(base_url=url, timeout=30)
    assert client.get("/config").status_code == 401  # nothing without logging in
    assert client.post("/login", data={"username": "me", "password": "wrong"}).status_code == 400
    assert client.post("/login", data={"username": "me", "password": "s3cret"}).status_code == 200
    assert client.get("/config").status_code == 200
    small = client.post("/gradio_api/upload", files={"files": ("a.png", b"0" * 1000, "image/png")})
    assert small.status_code == 200
    big = client.post("/gradio_api/upload",
                      files={"files": ("b.png", b"0" * (11 * 1024 * 1024), "image/png")})  # fmt: skip
    assert big.status_code == 413 and "maximum allowed size" in big.text
