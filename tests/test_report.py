"""The HTML report (store/report.py): rendered for every edit op kind and every run status,
and written by `artloop run` after a plan with global tone factors."""

from __future__ import annotations

import contextlib
import html
import json
from pathlib import Path

import pytest
from artloop.cli import app
from artloop.graphs.runner import run_session
from artloop.store.leases import hold_run
from artloop.store.report import write_report
from artloop.store.trajectories import FINAL_STATUSES
from conftest import make_ctx
from fakes import DEFAULTS, ScriptedChat
from typer.testing import CliRunner

# Every status a run row can hold (store/trajectories.py's schema).
STATUSES = ("running", "paused", "interrupted", "failed", "cancelled", *FINAL_STATUSES)

# Every op kind the edit node records: a global img2img pass, an inpainting pass, tone factors.
PLAN = {**DEFAULTS["EditPlan"], "params": {"strength": 0.5, "exposure": 0.6, "contrast": 1.2}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, _sd_pipeline_cache):
    from artloop.store.trajectories import TrajectoryStore

    store = TrajectoryStore(tmp_path_factory.mktemp("report") / "home")
    ctx = make_ctx(
        store, _sd_pipeline_cache, ScriptedChat(scripts={"EditPlan": [PLAN]}), max_iters=1
    )
    return store, run_session(ctx, prompt="a fox <b>at night</b>").run_id


def report_text(store, run_id) -> str:
    return html.unescape(write_report(store, run_id).read_text())


def test_report_shows_every_op_kind(run):
    store, run_id = run
    step = store.get_run(run_id)["steps"][0]
    assert [op["op"] for op in step["edits"]] == ["img2img", "inpaint", "tone"]
    text = report_text(store, run_id)
    assert "img2img (strength 0.50, steps 2)" in text
    assert "inpaint (box [100, 200, 600, 900], strength 0.50, steps 2): sharp fur" in text
    assert "tone (exposure 0.60, contrast 1.20)" in text
    assert "a fox <b>at night</b>" in text  # the prompt, escaped in the HTML
    assert "<b>at night</b>" not in write_report(store, run_id).read_text()


def test_report_shows_an_op_kind_it_does_not_know(run):
    """A later op kind, with fields of its own and none of the others', still renders."""
    store, run_id = run
    step = store.get_run(run_id)["steps"][0]
    upscale = {"op": "upscale", "factor": 2, "method": "lanczos", "image": step["edited_image"]}
    store.put_step(run_id, 0, {**step, "edits": [*step["edits"], upscale, {"op": "noop"}]})
    try:
        text = report_text(store, run_id)
        assert "upscale (factor 2, method lanczos)" in text and "noop</figcaption>" in text
    finally:
        store.put_step(run_id, 0, step)


@pytest.mark.parametrize("status", STATUSES)
def test_report_renders_for_every_status(run, status):
    store, run_id = run
    done = store.get_run(run_id)
    finished = status in FINAL_STATUSES
    store.finish_run(
        run_id,
        status,
        final_image=done["final_image"] if finished else None,
        best_score=done["best_score"] if finished else None,
        error="boom: the server went away" if status == "failed" else None,
    )
    try:
        # A run reads `running` only while a process holds it (else it reads `interrupted`).
        with hold_run(store, run_id) if status == "running" else contextlib.nullcontext():
            text = report_text(store, run_id)
        assert f"status <b>{status}</b>" in text and "tone (exposure 0.60" in text
        assert ("best score" in text) == finished and ("final (best) image" in text) == finished
        assert ("boom: the server went away" in text) == (status == "failed")
    finally:
        store.finish_run(
            run_id, done["status"], final_image=done["final_image"], best_score=done["best_score"]
        )


def test_run_with_a_tone_plan_writes_its_report(tmp_path):
    """The README's darkening recipe through the CLI: a plan of tone factors alone, one
    iteration; the run used to end in a Jinja traceback after it had finished."""
    config = tmp_path / "tone.toml"
    config.write_text(
        f'home = "{tmp_path / "home"}"\n[chat]\nbackend = "custom"\n'
        'custom_class = "artloop.models.scripted:ScriptedChat"\n[chat.custom_kwargs.scripts]\n'
        'EditPlan = [{revised_prompt = "a dark fox", negative_prompt = "", regional_edits = [], '
        'rationale = "too bright", params = {exposure = 0.6}}]\n'
        '[diffusion]\nmodel = "tiny-sd"\nwidth = 64\nheight = 64\nsteps = 2\n'
    )
    result = CliRunner().invoke(
        app, ["run", "a fox", "--max-iters", "1", "--config", str(config), "--json", "--quiet"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    text = html.unescape(Path(summary["report"]).read_text(encoding="utf-8"))
    assert summary["status"] in ("accepted", "max_iters") and "tone (exposure 0.60)" in text
