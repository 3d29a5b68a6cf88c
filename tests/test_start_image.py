"""A session started from a person's own image (`init_image`, `artloop run --image`): the import
and its limits, the loop editing that image and then the best so far, resume and fork, the CLI
and the export, on the tiny SD pipeline with a scripted chat model."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from artloop.cli import app
from artloop.config import ConfigError
from artloop.graphs import sessions
from artloop.graphs.runner import run_session
from artloop.store.trajectories import TrajectoryStore
from artloop.tools.images import (
    MAX_IMAGE_BYTES,
    ImageStore,
    ImageStoreError,
    ImageTooLarge,
    import_image,
)
from conftest import make_ctx, scripted_stack, verdict
from fakes import ScriptedChat
from PIL import Image, ImageFile
from test_limits import blank_png
from typer.testing import CliRunner

SIZE = (64, 64)  # make_ctx's and scripted_stack's generation size


def photo_png(width: int = 200, height: int = 100, mode: str = "RGB") -> bytes:
    """A wide picture: blue in its middle half, red in the quarters at either side."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :] = (220, 30, 30)
    pixels[:, width // 4 : 3 * width // 4] = (30, 30, 220)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def stored(images: ImageStore) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in images.root.rglob("*") if p.is_file()}


# --- the import -------------------------------------------------------------------------------
def test_an_imported_image_is_fitted_to_the_generation_size(store):
    digest = import_image(store.images, photo_png(), SIZE)
    picture = store.images.get(digest)
    assert picture.size == SIZE and picture.mode == "RGB"
    # Scaled to 128x64 and centre-cropped: the red margins are cut off, nothing is squashed.
    pixels = np.asarray(picture).astype(int)
    assert (pixels[:, 4:-4, 2] > 180).all() and (pixels[:, 4:-4, 0] < 70).all()
    # The same image again (a path this time) is the same hash: stored once.
    path = store.home.parent / "photo.png"
    path.write_bytes(photo_png())
    assert import_image(store.images, path, SIZE) == digest
    # Transparency shows white, not the colour the transparent pixels happen to hold.
    clear = io.BytesIO()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(clear, format="PNG")
    white = store.images.get(import_image(store.images, clear.getvalue(), SIZE))
    assert white.getpixel((10, 10)) == (255, 255, 255)


def _bomb(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(blank_png(20000, 20000))  # ~400 KB whose header claims 400 M pixels
    return path


def _not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are my notes, not a picture\n")
    return path


def _too_many_bytes(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.write(photo_png())
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: costs no disk
    return path


REFUSED = {
    "bomb": (
        _bomb,
        ImageTooLarge,
        "image too large: over 178956970 pixels; the limit is 4096x4096",
    ),
    "not an image": (_not_an_image, ImageStoreError, "not a readable image: not in a known format"),
    "too many bytes": (
        _too_many_bytes,
        ImageTooLarge,
        f"image file too large: {MAX_IMAGE_BYTES + 1} bytes; the limit is 64 MiB",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_bad_image_is_refused_by_its_limit_and_stores_nothing(store, tmp_path, monkeypatch, case):
    make, error, message = REFUSED[case]
    path = make(tmp_path)
    kept = import_image(store.images, photo_png(), SIZE)
    before = stored(store.images)

    def never(self):  # the refusal comes from the header: no pixel is decoded
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    for source in (path, path.read_bytes()):
        with pytest.raises(error) as refused:
            import_image(store.images, source, SIZE)
        assert message in str(refused.value) and "\n" not in str(refused.value)
    assert stored(store.images) == before and kept in store.images


def test_a_byte_limit_of_the_callers_and_a_missing_file(store, tmp_path):
    with pytest.raises(ImageTooLarge, match="the limit is 100 bytes"):
        import_image(store.images, photo_png(), SIZE, max_bytes=100)
    with pytest.raises(ImageStoreError, match="cannot read .*: No such file or directory"):
        import_image(store.images, tmp_path / "gone.png", SIZE)
    assert not stored(store.images)


# --- the loop ---------------------------------------------------------------------------------
@pytest.fixture
def spied(sd_tool):
    """The tiny SD tool, recording its text-to-image draws and each edit's input image."""
    calls: dict[str, list] = {"t2i": [], "edited": []}
    t2i, i2i, inpaint = sd_tool.text_to_image, sd_tool.image_to_image, sd_tool.inpaint

    def drawn(*args, **kw):
        calls["t2i"].append(args)
        return t2i(*args, **kw)

    def img2img(image, *args, **kw):
        calls["edited"].append(("img2img", image))
        return i2i(image, *args, **kw)

    def inpainted(image, *args, **kw):
        calls["edited"].append(("inpaint", image))
        return inpaint(image, *args, **kw)

    sd_tool.text_to_image, sd_tool.image_to_image, sd_tool.inpaint = drawn, img2img, inpainted
    yield sd_tool, calls
    sd_tool.text_to_image, sd_tool.image_to_image, sd_tool.inpaint = t2i, i2i, inpaint


def test_a_session_edits_the_persons_image_then_the_best_so_far(store, spied):
    """No text-to-image at all: iteration 1's image is the person's, its edit's input too;
    iteration 2 edits iteration 1's kept result, though loop.carry_edits is off."""
    sd_tool, calls = spied
    digest = import_image(store.images, photo_png(), SIZE)
    chat = ScriptedChat(scripts={"Verdict": [verdict("revise", 4.0), verdict("revise", 5.0)]})
    ctx = make_ctx(store, sd_tool, chat, max_iters=2, plateau_patience=5)
    assert not ctx.loop.carry_edits
    s = run_session(ctx, prompt="a blue wall", init_image=digest)
    run = store.get_run(s.run_id)
    first, second = run["steps"]
    assert calls["t2i"] == []
    assert first["image"] == digest and first["from_image"] is True
    assert first["stats"]["image"]  # measured like a drawn image
    assert calls["edited"][0] == ("inpaint", digest)  # the scripted plan's box edit
    assert second["image"] == first["result_image"] == first["edited_image"] != digest
    assert second["carried"] and "from_image" not in second
    assert calls["edited"][1] == ("inpaint", second["image"])
    assert run["config"]["init_image"] == digest and s.final_image == second["edited_image"]


def test_a_global_edit_of_the_persons_image(store, spied):
    sd_tool, calls = spied
    digest = import_image(store.images, photo_png(), SIZE)
    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    ctx = make_ctx(store, sd_tool, chat, edit_modes=["img2img", "tone"])
    s = run_session(ctx, prompt="a blue wall", init_image=digest)
    assert (s.status, calls["t2i"], calls["edited"]) == ("accepted", [], [("img2img", digest)])


def test_a_bad_start_is_refused_before_anything_is_stored(store, sd_tool):
    ctx = make_ctx(store, sd_tool, ScriptedChat())
    for bad in ("0" * 64, "../../etc/passwd"):
        with pytest.raises(ConfigError, match="init_image: no image .* in the image store"):
            run_session(ctx, prompt="a fox", init_image=bad)
    digest = import_image(store.images, photo_png(), SIZE)
    judged = make_ctx(store, sd_tool, ScriptedChat(), edit_modes=[], critics=[])
    with pytest.raises(ConfigError, match=r"init_image: .* loop.edit_modes is \[\]"):
        run_session(judged, prompt="a fox", init_image=digest)
    assert store.list_runs() == []


def test_resume_and_fork_keep_the_start(store, spied):
    sd_tool, calls = spied
    digest = import_image(store.images, photo_png(), SIZE)
    chat = ScriptedChat(scripts={"Verdict": [verdict("revise", 4.0), verdict("revise", 5.0)]})
    ctx = make_ctx(store, sd_tool, chat, max_iters=2, plateau_patience=5)
    s = run_session(ctx, prompt="a blue wall", init_image=digest, pause_at=["plan"])
    assert s.pause["image"] == digest
    with pytest.raises(ValueError, match="init_image starts a session"):
        run_session(ctx, run_id=s.run_id, init_image=digest)
    while s.status == "paused":
        s = run_session(ctx, run_id=s.run_id)
    steps = store.get_run(s.run_id)["steps"]
    assert steps[0]["image"] == digest and steps[1]["image"] == steps[0]["result_image"]

    # Forked before iteration 2 draws: the fork carries the same image, still no new draw.
    at = next(
        p
        for p in sessions.history(store, s.run_id)
        if p["iteration"] == 1 and "generate" in p["next"]
    )
    child = sessions.fork(store, s.run_id, at["checkpoint_id"])
    assert store.get_run(child)["config"]["init_image"] == digest
    while run_session(ctx, run_id=child).status == "paused":  # its pauses are the parent's
        pass
    forked = store.get_run(child)["steps"]
    assert forked[0] == steps[0] and forked[1]["image"] == steps[0]["result_image"]
    assert calls["t2i"] == []


# --- the CLI and the export -----------------------------------------------------------------------
def test_run_with_an_image_and_export_it(tmp_path):
    home = tmp_path / "home"
    config = str(scripted_stack(tmp_path / "artloop.toml", home=home, max_iters=2))
    photo = tmp_path / "photo.png"
    photo.write_bytes(photo_png())
    expected = import_image(ImageStore(tmp_path / "elsewhere"), photo, SIZE)
    runner = CliRunner()
    ran = runner.invoke(
        app, ["run", "a blue wall", "--image", str(photo), "--config", config, "--json"]
    )
    assert ran.exit_code == 0, (ran.output, ran.exception)
    run = TrajectoryStore(home).get_run(json.loads(ran.stdout)["run_id"])
    assert run["steps"][0]["image"] == expected and run["steps"][0]["from_image"]
    assert run["config"]["init_image"] == expected
    shown = runner.invoke(app, ["show", run["run_id"], "--config", config], env={"COLUMNS": "500"})
    assert f"image {expected}  (the person's image)" in shown.stdout

    raw, sft = tmp_path / "raw", tmp_path / "sft"
    for out, fmt in ((raw, "raw"), (sft, "sft")):
        done = runner.invoke(app, ["export", str(out), "--format", fmt, "--config", config])
        assert done.exit_code == 0, (done.output, done.exception)
    lines = [json.loads(line) for line in (raw / "steps.jsonl").read_text().splitlines()]
    assert lines[0]["step"]["image"] == expected and lines[0]["step"]["from_image"]
    assert (raw / "images" / f"{expected}.png").read_bytes() == photo_bytes(home, expected)
    meta = (sft / "imagefolder" / "train" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(m)["text"] for m in meta] == ["a blue wall"]


def photo_bytes(home, digest: str) -> bytes:
    return TrajectoryStore(home).images.path(digest).read_bytes()


@pytest.mark.parametrize("case", REFUSED)
def test_run_refuses_a_bad_image_in_one_line(tmp_path, case):
    make, _, message = REFUSED[case]
    home = tmp_path / "home"
    config = str(scripted_stack(tmp_path / "artloop.toml", home=home))
    path = make(tmp_path)
    result = CliRunner().invoke(app, ["run", "a fox", "--image", str(path), "--config", config])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --image {path}: "), result.stderr
    assert message in " ".join(result.stderr.split())
    store = TrajectoryStore(home)
    assert store.list_runs() == [] and not stored(store.images)
    assert os.path.exists(path)
