"""The web UI in a real browser: `artloop serve ui` started for real, headless Debian chromium
driven by Playwright. A person starts a session, sees the first image, draws a box on it with a
local prompt, applies the edit, accepts; the stored trajectory records the human's edit.
Screenshots of the main screens go to test-artefacts/ui/."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from artloop.serve.guard import LoginLimiter
from artloop.serve.ui import UIError, box_from_clicks, serve
from artloop.store.trajectories import TrajectoryStore
from conftest import free_port, require
from test_limits import blank_png

ROOT = Path(__file__).resolve().parents[1]
ARTLOOP = str(Path(sys.executable).with_name("artloop"))
SHOTS = ROOT / "test-artefacts" / "ui"


def chromium() -> str:
    path = os.environ.get("ARTLOOP_CHROMIUM") or shutil.which("chromium")
    require(
        path and os.path.isfile(path),
        f"no chromium at {path}" if path else "no chromium on PATH",
        "run scripts/apt-ensure.sh chromium (Debian's package; ./test.sh does) or set ARTLOOP_CHROMIUM",
    )
    return path


@pytest.fixture(params=[None])
def ui(tmp_path, request):
    """`artloop serve ui`; a str param is the token from ARTLOOP_UI_TOKEN, ("file", token) from
    --token-file. Yields (url, store, process)."""
    port, home, token = free_port(), tmp_path / "home", request.param
    env = {**os.environ, "ARTLOOP_LOOP__MAX_ITERS": "2"}
    env.pop("ARTLOOP_UI_TOKEN", None)
    args = [ARTLOOP, "serve", "ui", "--home", str(home), "--port", str(port)]
    if isinstance(token, tuple):
        (tmp_path / "token").write_text(token[1] + "\n")
        args += ["--token-file", str(tmp_path / "token")]
    elif token:
        env["ARTLOOP_UI_TOKEN"] = token
    log = (tmp_path / "ui.log").open("w")
    proc = subprocess.Popen(
        args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
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
    yield url, TrajectoryStore(home), proc
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium(), headless=True, args=["--no-sandbox"]
        )
        yield browser.new_page(viewport={"width": 1600, "height": 1100})
        browser.close()


@pytest.mark.browser
def test_a_person_draws_a_box_and_accepts(page, ui):  # no server started without a browser
    from playwright.sync_api import expect

    url, store, _ = ui
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
    findings = page.locator("#findings")
    expect(findings).to_contain_text("Waiting for you: plan")  # the plan as a card
    expect(findings).to_contain_text("revised prompt")
    expect(page.locator("#edit-prompt")).to_be_visible()  # the plan's revised prompt is edited
    expect(page.locator("#edit-prompt")).to_contain_text("Revised prompt")
    expect(page.locator("#accept")).to_be_hidden()  # only at the verdict

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
    # The verdict is accepted or rejected: no prompt fields, no edit to apply.
    expect(findings).to_contain_text("Waiting for you: verdict")
    for hidden in ("#edit-prompt", "#edit-negative", "#apply"):
        expect(page.locator(hidden)).to_be_hidden()
    page.locator("#accept").click()
    expect(status).to_contain_text("accepted", timeout=180_000)
    # The finished iteration's findings as cards, one per agent, the raw JSON one click away.
    for title in ("Data-CoT: facts", "Concept-CoT: critique", "Thesis-CoT: plan", "Verdict"):
        expect(findings).to_contain_text(title)
    expect(findings.locator("details.raw").first).to_be_attached()
    page.screenshot(path=SHOTS / "4-accepted.png", full_page=True)

    # The agents' boxes are drawn on the image, each layer toggled on its own.
    layers = page.locator("#box-layers")
    expect(layers).to_be_visible()
    expect(page.locator("#box-legend")).to_contain_text("Data-CoT's objects")
    expect(canvas).to_have_attribute("src", re.compile(r"boxes-[0-9a-f]+\.png"))
    drawn = canvas.get_attribute("src")
    for name in ("objects", "artifacts", "edits"):
        expect(layers.get_by_label(name)).to_be_checked()  # all on by default
    layers.get_by_label("objects").uncheck()
    expect(canvas).not_to_have_attribute("src", drawn)  # redrawn without Data-CoT's objects
    expect(canvas).to_have_attribute("src", re.compile(r"boxes-[0-9a-f]+\.png"))
    page.screenshot(path=SHOTS / "5-objects-off.png", full_page=True)
    layers.get_by_label("objects").check()
    expect(canvas).to_have_attribute("src", drawn)  # the same drawing again

    run = store.get_run(run_id)
    assert run["status"] == "accepted" and len(run["steps"]) == 1
    step = run["steps"][0]
    assert step["decided_by"] == {"prompt": "agent", "plan": "human", "verdict": "human"}
    assert step["human"]["plan"]["regions"][0]["box"] == box
    assert step["human"]["plan"]["regions"][0]["prompt"] == "a red woollen hat"
    expect(findings.locator(".card-thesis")).to_contain_text("a red woollen hat")  # your edit
    objects = step["agents"]["data_cot"]["objects"]
    card = findings.locator(".card-data")
    for o in objects:  # each object's label and box, as the Data-CoT agent found them
        expect(card).to_contain_text(f"{o['label']} [{', '.join(map(str, o['box']))}]")
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


TOKEN = "s3cret-pässwort"  # not ASCII: compared as bytes


def png(width: int, height: int, name: str = "a.png") -> dict:
    return {"files": (name, blank_png(width, height), "image/png")}


@pytest.mark.slow  # `artloop serve ui` starts for real
@pytest.mark.parametrize("ui", [("file", TOKEN)], indirect=True)
def test_token_login_and_upload_limits(ui):
    """The token comes from a file (never argv); every route that takes a file caps its size
    (10 MB) and its images' pixels (4096 x 4096, not PIL's 2 x that) with a 413 naming the
    limit; Gradio's analytics are off."""
    import httpx

    url, _, proc = ui
    assert TOKEN.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # not in ps
    client = httpx.Client(base_url=url, timeout=30)
    assert client.get("/config").status_code == 401  # nothing without logging in
    assert client.post("/login", data={"username": "me", "password": "wrong"}).status_code == 400
    assert client.post("/login", data={"username": "me", "password": TOKEN}).status_code == 200
    config = client.get("/config")
    assert config.status_code == 200 and config.json()["analytics_enabled"] is False

    def upload(files: dict, route: str = "/gradio_api/upload") -> httpx.Response:
        return client.post(route, files=files)

    assert upload({"files": ("a.txt", b"0" * 1000, "text/plain")}).status_code == 200
    assert upload(png(4096, 4096)).status_code == 200  # the limit itself is allowed
    big = upload({"files": ("b.png", b"0" * (11 * 1024 * 1024), "image/png")})
    assert big.status_code == 413 and "over the 10 MB limit" in big.text
    for size in ((4097, 4096), (5000, 5000), (20000, 20000)):
        refused = upload(png(*size, name="bomb.png"))
        assert refused.status_code == 413, size
        assert refused.json()["detail"].startswith("bomb.png: image too large: ")
        assert "the limit is 4096x4096" in refused.text
    # The other multipart route is checked before Gradio parses it.
    refused = upload(
        {**png(5000, 5000), "component_id": (None, "1")}, "/gradio_api/component_server"
    )
    assert refused.status_code == 413 and "4096x4096" in refused.text


@pytest.mark.slow
@pytest.mark.parametrize("ui", ["s3cret"], indirect=True)
def test_failed_logins_are_limited(ui):
    """30 wrong passwords in a row: after 5 the client is refused (429) without a check, the
    right password too, until a minute passes; a session already logged in is unaffected."""
    import httpx

    url, _, _ = ui
    client = httpx.Client(base_url=url, timeout=30)
    assert client.post("/login", data={"username": "me", "password": "s3cret"}).status_code == 200
    wrong = httpx.Client(base_url=url, timeout=30)
    start = time.monotonic()
    codes = [
        wrong.post("/login", data={"username": "me", "password": f"guess{i}"}).status_code
        for i in range(30)
    ]
    assert codes == [400] * 5 + [429] * 25 and time.monotonic() - start < 20
    locked = wrong.post("/login", data={"username": "me", "password": "s3cret"})
    assert locked.status_code == 429 and 0 < int(locked.headers["retry-after"]) <= 60
    assert "too many failed logins" in locked.json()["detail"]
    assert client.get("/config").status_code == 200


def test_login_limiter_lifts_after_its_window():
    clock = [0.0]
    limiter = LoginLimiter(max_failures=3, window_s=60, clock=lambda: clock[0])
    for _ in range(3):
        assert limiter.wait("a") == 0
        limiter.attempt("a")
    assert limiter.wait("a") == 60 and limiter.wait("b") == 0  # per client
    clock[0] = 59.5
    assert limiter.wait("a") == pytest.approx(0.5)
    clock[0] = 60.0
    assert limiter.wait("a") == 0  # the oldest failure aged out
    limiter.attempt("a")
    limiter.succeeded("a")
    assert limiter.wait("a") == 0 and not limiter._failures


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--host", "0.0.0.0", "--token", "   "],
            {},
            "--token would show the password to anyone running ps",
        ),
        (["--host", "0.0.0.0"], {"ARTLOOP_UI_TOKEN": "   "}, "the UI token is blank"),
        (["--host", "0.0.0.0"], {}, "binding 0.0.0.0 exposes the UI beyond this machine"),
        (["--port", "99999"], {}, "port 99999 is not a TCP port (1-65535)"),
        (["--host", "203.0.113.7"], {"ARTLOOP_UI_TOKEN": "t"}, "cannot listen on 203.0.113.7:"),
        (["--host", "no-such-host.invalid"], {"ARTLOOP_UI_TOKEN": "t"}, "cannot listen on no-such"),
        (["--port", "IN_USE"], {}, "Address already in use"),
    ],
)
def test_bad_binds_are_refused_at_once(tmp_path, args, env, message):
    """Before anything loads or binds, and before the URL is printed: one line, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = [str(taken.getsockname()[1]) if a == "IN_USE" else a for a in args]
        if "--port" not in args:
            args += ["--port", str(free_port())]
        start = time.monotonic()
        proc = subprocess.run(
            [ARTLOOP, "serve", "ui", "--home", str(tmp_path / "home"), *args],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - start < 15
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "artloop UI at" not in proc.stdout + proc.stderr
    assert not (tmp_path / "home").exists()  # nothing started
