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
from artloop.serve.ui import UIError, serve
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


def drag(page, canvas, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse drag over the canvas's image, from and to fractions of its size."""
    area = canvas.bounding_box()
    page.mouse.move(area["x"] + area["width"] * start[0], area["y"] + area["height"] * start[1])
    page.mouse.down()
    for f in (0.5, 1.0):  # through a middle point, as a hand does
        x = start[0] + (end[0] - start[0]) * f
        y = start[1] + (end[1] - start[1]) * f
        page.mouse.move(area["x"] + area["width"] * x, area["y"] + area["height"] * y, steps=4)
    page.mouse.up()


@pytest.mark.browser
def test_a_person_refines_an_image_with_the_agents(page, ui):  # no server without a browser
    from playwright.sync_api import expect

    url, store, _ = ui
    expect.set_options(timeout=30_000)  # each UI round trip, even on a busy 2-core machine
    page.goto(url)
    page.locator("#start").click()  # no prompt: said beside the field, nothing else changes
    expect(page.locator("#start-error")).to_contain_text("prompt")
    expect(page.locator("#status")).to_have_text("No session yet.")
    page.locator("#prompt textarea").fill("a red circle to the left of a blue square")
    page.locator("#start").click()  # pauses at plan and verdict by default
    status, progress = page.locator("#status"), page.locator("#progress")
    # Progress streams while it runs: the node, iteration i of n, the diffusion steps.
    expect(progress).to_contain_text(re.compile(r"iteration 1 of 2 · .* s in all"), timeout=120_000)
    expect(progress.locator("progress")).to_be_attached(timeout=120_000)
    expect(progress).to_contain_text(re.compile(r"diffusion step \d+ of 20"))
    expect(status).to_contain_text("paused at plan", timeout=180_000)
    expect(page.locator("#start-error")).to_have_text("")
    run_id = re.search(r"([0-9a-f]{16})", status.inner_text()).group(1)
    canvas = page.locator("#canvas .al-canvas img")
    expect(canvas).to_be_visible()

    # The findings as cards; hovering one lights its box on the image.
    findings = page.locator("#findings")
    expect(findings).to_contain_text("Waiting for you: plan")  # the plan as a card
    expect(findings).to_contain_text("Iteration 1 so far")  # its facts and critique
    expect(page.locator("#edit-prompt")).to_contain_text("Revised prompt")
    expect(page.locator("#accept")).to_be_hidden()  # only at the verdict
    found = findings.locator("[data-box-key^='i0-objects-']").first
    key = found.get_attribute("data-box-key")
    box_of_it = page.locator(f"#canvas .bx[data-key='{key}']")
    expect(box_of_it).to_be_visible()
    found.hover()
    expect(box_of_it).to_have_css("box-shadow", re.compile("37, 99, 235"))
    page.screenshot(path=SHOTS / "1-paused-at-plan.png", full_page=True)

    # The plan's box edits are the person's: drag a new one, name it, move it, delete the plan's.
    planned = page.locator("#canvas .bx-yours").count()
    drag(page, canvas, (0.1, 0.6), (0.4, 0.9))
    box_input = page.locator("#box input, #box textarea").first
    expect(box_input).to_have_value(re.compile(r"^\d+,\d+,\d+,\d+$"))
    assert [int(v) for v in box_input.input_value().split(",")] == pytest.approx(
        [100, 600, 400, 900], abs=15
    )
    expect(page.locator("#canvas .bx-pending")).to_be_visible()
    page.locator("#add-box").click()  # no local prompt yet: said beside it, nothing else changes
    expect(page.locator("#box-error")).to_contain_text("a local prompt")
    expect(status).to_contain_text("paused at plan")
    page.locator("#local-prompt textarea, #local-prompt input").first.fill("a red woollen hat")
    page.locator("#add-box").click()
    expect(page.locator("#regions")).to_contain_text("a red woollen hat")
    mine = page.locator(f"#canvas .bx-yours[data-index='{planned}']")
    expect(mine).to_be_visible()
    drag(page, canvas, (0.25, 0.75), (0.35, 0.65))  # grab its middle: moved by (+100, -100)
    expect(page.locator("#regions")).to_contain_text("500")
    for _ in range(planned):  # the plan's own box edits, deleted on the image
        page.locator("#canvas .bx-yours[data-index='0'] .del").click()
    expect(page.locator("#canvas .bx-yours")).to_have_count(1)
    rows = page.locator("#regions").inner_text()
    box = [
        int(v) for v in re.search(r"(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+a red woollen", rows).groups()
    ]
    assert box == pytest.approx([200, 500, 500, 800], abs=15)
    page.screenshot(path=SHOTS / "2-box-drawn.png", full_page=True)

    # A refused answer (no revised prompt) is one line beside the buttons; nothing else changes.
    revised = page.locator("#edit-prompt textarea")
    kept = revised.input_value()
    revised.fill("")
    page.locator("#apply").click()
    expect(page.locator("#answer-error")).to_contain_text("prompt: String should have at least")
    expect(status).to_contain_text("paused at plan")
    expect(page.locator("#regions")).to_contain_text("a red woollen hat")  # the table kept
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)  # no pane turned red
    revised.fill(kept)
    page.locator("#apply").click()
    expect(status).to_contain_text("paused at verdict", timeout=180_000)
    expect(page.locator("#answer-error")).to_have_text("")
    # The verdict is accepted or rejected: no prompt fields, no edit to apply.
    expect(findings).to_contain_text("Waiting for you: verdict")
    for hidden in ("#edit-prompt", "#edit-negative", "#apply"):
        expect(page.locator(hidden)).to_be_hidden()
    expect(page.locator("#compare")).to_be_visible()  # the edit, before and after
    expect(page.locator("#compare img")).to_have_count(2)
    page.screenshot(path=SHOTS / "3-paused-at-verdict.png", full_page=True)
    page.locator("#accept").click()
    expect(status).to_contain_text("accepted", timeout=180_000)
    for title in ("Data-CoT: facts", "Concept-CoT: critique", "Thesis-CoT: plan", "Verdict"):
        expect(findings).to_contain_text(title)
    expect(findings.locator("details.raw").first).to_be_attached()

    # The agents' boxes, each layer toggled on its own.
    layers = page.locator("#box-layers")
    expect(page.locator("#box-legend")).to_contain_text("Data-CoT's objects")
    objects = page.locator("#canvas .bx-objects")
    expect(objects.first).to_be_visible()
    layers.get_by_label("objects").uncheck()
    expect(objects).to_have_count(0)
    page.screenshot(path=SHOTS / "5-objects-off.png", full_page=True)
    layers.get_by_label("objects").check()
    expect(objects.first).to_be_visible()

    run = store.get_run(run_id)
    assert run["status"] == "accepted" and len(run["steps"]) == 1
    step = run["steps"][0]
    assert step["decided_by"] == {"prompt": "agent", "plan": "human", "verdict": "human"}
    assert [(r["box"], r["prompt"]) for r in step["human"]["plan"]["regions"]] == [
        (box, "a red woollen hat")
    ]
    expect(findings.locator(".card-thesis")).to_contain_text("a red woollen hat")  # your edit
    inpaint = [op for op in step["edits"] if op["op"] == "inpaint"]
    assert [(op["box"], op["prompt"]) for op in inpaint] == [(box, "a red woollen hat")]

    # The timeline: choose the iteration, fork a new session from it, run the fork.
    tile = page.locator("#timeline .tile")
    expect(tile).to_have_count(1)
    expect(tile).to_contain_text("accept (human)")
    tile.click()
    page.screenshot(path=SHOTS / "4-accepted.png", full_page=True)
    page.locator("#fork").click()
    expect(status).to_contain_text("ready to go on from iteration 1")
    forked = re.search(r"([0-9a-f]{16})", status.inner_text()).group(1)
    assert forked != run_id
    assert store.get_run(forked)["config"]["forked_from"]["run_id"] == run_id
    page.locator("#resume").click()
    expect(status).to_contain_text(f"{forked}: paused at plan", timeout=180_000)

    # Past sessions: the finished one is listed and exports.
    page.locator("#refresh").click()
    page.locator("#sessions input").click()
    page.locator("#sessions input").fill(run_id)
    page.get_by_role("option", name=re.compile(run_id)).click()
    page.locator("#open").click()
    expect(status).to_contain_text(f"{run_id}: accepted")
    page.locator("#export").click()
    expect(page.locator("#export-file")).to_contain_text(f"export-{run_id}", timeout=60_000)
    assert (store.home / "ui" / f"export-{run_id}.zip").stat().st_size > 1000


@pytest.mark.browser
def test_a_session_from_your_own_image(page, ui, tmp_path):
    """Upload an image: the loop starts from it (its first image is the upload, fitted to the
    model's size), edits it, finishes and exports."""
    from PIL import Image, ImageDraw
    from playwright.sync_api import expect

    url, store, _ = ui
    expect.set_options(timeout=30_000)
    mine = Image.new("RGB", (128, 96), "white")
    ImageDraw.Draw(mine).ellipse((10, 20, 60, 70), fill=(220, 20, 20))
    mine.save(tmp_path / "mine.png")
    page.goto(url)
    page.locator("#prompt textarea").fill("a red circle to the left of a blue square")
    page.locator("#upload input[type=file]").set_input_files(str(tmp_path / "mine.png"))
    page.locator("#pause-at").get_by_label("plan").uncheck()
    page.locator("#pause-at").get_by_label("verdict").uncheck()
    expect(page.locator("#upload img")).to_be_visible()
    page.locator("#start").click()
    status = page.locator("#status")
    expect(status).to_contain_text(re.compile("accepted|max_iters|plateau"), timeout=240_000)
    run_id = re.search(r"([0-9a-f]{16})", status.inner_text()).group(1)
    run = store.get_run(run_id)
    first = Image.open(store.images.path(run["steps"][0]["image"]))
    assert first.size == (64, 64)  # fitted to what the model draws
    assert first.getpixel((16, 32))[0] > 180 and first.getpixel((60, 60)) == (255, 255, 255)
    assert run["config"]["init_image"] == run["steps"][0]["image"]
    expect(page.locator("#timeline .tile").first).to_be_visible()
    page.locator("#export").click()
    expect(page.locator("#export-file")).to_contain_text(f"export-{run_id}", timeout=60_000)


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
