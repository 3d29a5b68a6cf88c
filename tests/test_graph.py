"""The refine graph on the tiny SD pipeline with a scripted chat model: stop rules, state,
the stored trajectory, and resuming after a fault mid-run."""

from __future__ import annotations

import pytest
from artloop.graphs.runner import open_checkpointer, run_session
from artloop.models.structured import ChatServerError
from conftest import make_ctx, verdict
from fakes import DEFAULTS, ScriptedChat

AGENTS = {"enhance", "data_cot", "concept_cot", "thesis_cot", "validate"}


def test_accept_stops_after_one_iteration(store, sd_tool):
    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    summary = run_session(make_ctx(store, sd_tool, chat), prompt="a red fox")
    assert (summary.status, summary.iterations, summary.scores) == ("accepted", 1, [9.0])
    run = store.get_run(summary.run_id)
    assert run["status"] == "accepted" and run["best_score"] == 9.0
    assert run["final_image"] == run["steps"][0]["edited_image"] in store.images


def test_accept_needs_the_threshold(store, sd_tool):
    """An 'accept' below accept_score is not an acceptance: the loop goes on."""
    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 6.0), verdict("accept", 8.0)]})
    summary = run_session(make_ctx(store, sd_tool, chat, accept_score=7.0), prompt="a fox")
    assert (summary.status, summary.scores) == ("accepted", [6.0, 8.0])


def test_max_iters_gives_up_with_the_best_image(store, sd_tool):
    chat = ScriptedChat(
        scripts={
            "Verdict": [verdict("revise", 4.0), verdict("revise", 6.0), verdict("revise", 5.0)]
        }
    )
    summary = run_session(
        make_ctx(store, sd_tool, chat, max_iters=3, plateau_patience=5), prompt="a fox"
    )
    assert (summary.status, summary.scores, summary.best_score) == ("max_iters", [4, 6, 5], 6.0)
    run = store.get_run(summary.run_id)
    assert [s["iteration"] for s in run["steps"]] == [0, 1, 2]
    assert run["final_image"] == run["steps"][1]["edited_image"]


def test_a_rejected_edit_keeps_the_image_before_it(store, sd_tool):
    chat = ScriptedChat(scripts={"Verdict": [verdict("reject", 3.0), verdict("revise", 2.0)]})
    summary = run_session(make_ctx(store, sd_tool, chat, max_iters=2), prompt="a fox")
    run = store.get_run(summary.run_id)
    first = run["steps"][0]
    assert first["result_image"] == first["image"] != first["edited_image"]
    assert run["final_image"] == first["image"] and run["best_score"] == 3.0


def test_plateau_stops_early(store, sd_tool):
    chat = ScriptedChat(
        scripts={
            "Verdict": [verdict("revise", 5.0), verdict("revise", 5.1), verdict("revise", 5.2)]
        }
    )
    ctx = make_ctx(store, sd_tool, chat, max_iters=10, plateau_patience=2, plateau_min_delta=0.25)
    summary = run_session(ctx, prompt="a fox")
    assert (summary.status, summary.iterations) == ("plateau", 3)


def test_trajectory_records_every_step(store, sd_tool):
    chat = ScriptedChat(scripts={"Verdict": [verdict("revise", 5.0), verdict("accept", 9.0)]})
    ctx = make_ctx(store, sd_tool, chat)
    summary = run_session(ctx, prompt="a fox", config={"k": 1})
    run = store.get_run(summary.run_id)
    # The caller's config, and the loop that ran (its variant: tests/test_variants.py).
    assert run["config"] == {"k": 1, "loop": ctx.loop.model_dump()}
    assert run["models"]["diffusion"]["family"] == "sd"
    first, second = run["steps"]
    for step in (first, second):
        assert set(step["agents"]) == AGENTS
        assert step["image"] in store.images and step["edited_image"] in store.images
        assert set(step["timings"]) == AGENTS | {
            "generate",
            "edit",
            "review_prompt",
            "review_plan",
            "decide",
        }
        # No pauses asked for: the agents decided everything.
        assert step["decided_by"] == {"prompt": "agent", "plan": "agent", "verdict": "agent"}
        assert set(step["parse_failures"]) == AGENTS
        assert step["params"]["seed"] == 0 and {"brightness", "sharpness"} <= set(
            step["stats"]["image"]
        )
    # The regional edit was applied by inpainting its box; the plan's params carried forward.
    assert [op["op"] for op in first["edits"]] == ["inpaint"]
    assert first["edits"][0]["box"] == [100, 200, 600, 900]
    assert second["params"]["guidance_scale"] == 6.0
    # The second enhance saw the first verdict's reasons and the plan's revised prompt.
    assert second["agents"]["enhance"] == DEFAULTS["EnhancedPrompt"]


def test_state_holds_hashes_not_pixels(store, sd_tool):
    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    summary = run_session(make_ctx(store, sd_tool, chat), prompt="a fox")
    from artloop.graphs.refine import builder

    with open_checkpointer(store) as saver:
        graph = builder.compile(checkpointer=saver)
        values = graph.get_state({"configurable": {"thread_id": summary.run_id}}).values
    assert len(values["best_image"]) == 64 and len(str(values)) < 20_000


def test_invalid_output_is_repaired_and_counted(store, sd_tool):
    chat = ScriptedChat(
        scripts={
            "Critique": ["not json", {"summary": "wrong shape"}, DEFAULTS["Critique"]],
            "Verdict": [verdict("accept", 9.0)],
        }
    )
    summary = run_session(make_ctx(store, sd_tool, chat), prompt="a fox")
    step = store.get_run(summary.run_id)["steps"][0]
    assert step["parse_failures"]["concept_cot"] == {"ScriptedChat": 2}
    assert step["parse_failures"]["validate"] == {"ScriptedChat": 0}


@pytest.mark.parametrize("fail_at", ["ImageFacts", "EditPlan", "Verdict"])
def test_resume_after_a_fault_mid_run(store, sd_tool, fail_at):
    """A dead server mid-run fails the run visibly; resuming finishes it from the checkpoint,
    without re-running what was done and without duplicate steps."""
    scripts = {"Verdict": [verdict("revise", 5.0), verdict("accept", 9.0)]}
    # Iteration 2 hits a connection error at `fail_at` (the first call of it succeeds).
    scripts[fail_at] = [
        DEFAULTS[fail_at] if fail_at != "Verdict" else verdict("revise", 5.0),
        ConnectionError("server went away"),
    ]
    broken = ScriptedChat(scripts=scripts)
    with pytest.raises(ChatServerError, match="server went away"):
        run_session(make_ctx(store, sd_tool, broken), prompt="a fox", run_id="00000000000000aa")
    run = store.get_run("00000000000000aa")
    assert run["status"] == "failed" and "server went away" in run["error"]
    assert len(run["steps"]) == 1  # iteration 1 was stored before the fault

    healthy = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    summary = run_session(make_ctx(store, sd_tool, healthy), run_id="00000000000000aa")
    assert summary.status == "accepted" and summary.scores == [5.0, 9.0]
    # Only the unfinished node onwards ran again: no enhance/data_cot before a later fault.
    assert healthy.calls[0] == fail_at
    run = store.get_run("00000000000000aa")
    assert run["status"] == "accepted" and [s["iteration"] for s in run["steps"]] == [0, 1]


def test_resume_after_an_interrupt_before_any_node(store, sd_tool):
    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    ctx = make_ctx(store, sd_tool, chat)
    first = run_session(ctx, prompt="a fox", interrupt_before=["edit"])
    assert first.status == "interrupted" and store.get_run(first.run_id)["steps"] == []
    done = run_session(ctx, run_id=first.run_id)
    assert done.status == "accepted" and len(store.get_run(first.run_id)["steps"]) == 1
    with pytest.raises(ValueError, match="nothing left to resume"):
        run_session(ctx, run_id=first.run_id)


def test_same_seed_replays_the_same_images(store, sd_tool):
    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    a = run_session(make_ctx(store, sd_tool, chat), prompt="a fox")
    b = run_session(make_ctx(store, sd_tool, ScriptedChat(scripts=chat.scripts)), prompt="a fox")
    step_a, step_b = (store.get_run(s.run_id)["steps"][0] for s in (a, b))
    assert (step_a["image"], step_a["edited_image"]) == (step_b["image"], step_b["edited_image"])


def test_a_context_keeps_what_the_caller_gave(monkeypatch, tmp_path):
    """A part left out is filled from the configured defaults, and only that part: a chat and
    a loop without a diffusion tool keep that chat and that loop."""
    from artloop.config import LoopConfig
    from artloop.graphs import context
    from artloop.graphs.context import RefineContext

    def forget() -> None:  # the defaults are read once per process: from this environment here
        for name in ("default_config", "default_context"):
            if hasattr(context, name):
                getattr(context, name).cache_clear()

    monkeypatch.setenv("ARTLOOP_HOME", str(tmp_path / "configured"))
    monkeypatch.setenv("ARTLOOP_DIFFUSION__STEPS", "7")
    forget()
    try:
        chat = ScriptedChat()
        ctx = RefineContext(chat=chat, loop=LoopConfig(max_iters=9, judge="darkness"))
        assert ctx.chat is chat
        assert (ctx.loop.max_iters, ctx.loop.judge) == (9, "darkness")
        base = context.default_context()
        assert ctx.diffusion is base.diffusion and ctx.store is base.store  # built once
        assert ctx.store.home == tmp_path / "configured" and ctx.diffusion_config.steps == 7
        assert ctx.vlm_slots is None  # the caller's chat: not the default chat's call slots
    finally:
        forget()


def test_carry_edits_edits_the_best_image_further(store, sd_tool):
    """loop.carry_edits: iteration 2 starts from iteration 1's kept image (no new
    text-to-image), and its box edit is a new draw (seed + iteration); a rejected edit is
    not carried. Off, every iteration draws anew with the same seed."""
    calls = {"t2i": 0, "seeds": []}
    t2i, inpaint = sd_tool.text_to_image, sd_tool.inpaint

    def counted(*args, **kw):
        calls["t2i"] += 1
        return t2i(*args, **kw)

    def seeded(image, box, prompt, negative, params, strength):
        calls["seeds"].append(params.seed)
        return inpaint(image, box, prompt, negative, params, strength)

    sd_tool.text_to_image, sd_tool.inpaint = counted, seeded
    try:
        verdicts = [verdict("revise", 4.0), verdict("reject", 3.0), verdict("revise", 6.0)]
        chat = ScriptedChat(scripts={"Verdict": verdicts})
        ctx = make_ctx(store, sd_tool, chat, max_iters=3, plateau_patience=5, carry_edits=True)
        steps = store.get_run(run_session(ctx, prompt="a fox").run_id)["steps"]
        assert calls["t2i"] == 1 and calls["seeds"] == [0, 1, 2]
        assert steps[1]["image"] == steps[0]["edited_image"] and steps[1]["carried"]
        assert steps[2]["image"] == steps[0]["edited_image"]  # iteration 2's edit was rejected
        calls.update(t2i=0, seeds=[])
        chat = ScriptedChat(scripts={"Verdict": verdicts})
        ctx = make_ctx(store, sd_tool, chat, max_iters=3, plateau_patience=5)
        steps = store.get_run(run_session(ctx, prompt="a fox").run_id)["steps"]
        assert calls["t2i"] == 3 and calls["seeds"] == [0, 0, 0] and "carried" not in steps[1]
    finally:
        sd_tool.text_to_image, sd_tool.inpaint = t2i, inpaint
