"""Loop variants as config (`loop.enhancer`, `critics`, `edit_modes`, `best_of`, `memory`): the
graph has only the nodes a variant runs, the merged critic answers for three agents in one
call, best-of-N keeps the best candidate, memory = history shows the enhancer every attempt, a
bad variant is one line. On the scripted chat and tiny SD at 64 px, 2 steps."""

from __future__ import annotations

import re

import pytest
from artloop.config import ConfigError, LoopConfig, load_config
from artloop.graphs.refine import NODES, build_graph, check_served
from artloop.graphs.runner import run_session
from artloop.graphs.sessions import view
from artloop.rewards import reward_entry
from artloop.store.report import write_report
from conftest import make_ctx, verdict
from fakes import DEFAULTS, ScriptedChat

CHAIN = ("data_cot", "concept_cot", "thesis_cot")


class Recording(ScriptedChat):
    """The scripted answers, keeping each call's user message (its images and text)."""

    sent: list = []

    def _generate(self, messages, stop=None, run_manager=None, **kw):
        self.sent.append(messages[-1].content)
        return super()._generate(messages, stop, run_manager, **kw)


def text_of(content: list) -> str:
    return " ".join(p["text"] for p in content if p.get("type") == "text")


def steps_of(store, summary) -> list[dict]:
    return store.get_run(summary.run_id)["steps"]


def nodes(**loop) -> list[str]:
    graph = build_graph(LoopConfig(**loop)).compile().get_graph()
    return [n for n in graph.nodes if not n.startswith("__")]


# --- config: every bad variant is one line naming it --------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"critics": ["data_cot", "judge_cot"]}, "loop.critics: 'judge_cot' is not a critic"),
        ({"critics": ["merged", "data_cot"]}, "loop.critics: merged replaces data_cot"),
        ({"critics": ["thesis_cot", "thesis_cot"]}, "loop.critics: 'thesis_cot' is listed twice"),
        ({"critics": ["concept_cot"], "edit_modes": []}, "concept_cot without thesis_cot"),
        ({"critics": []}, "loop: edit_modes img2img, inpaint, tone apply a plan"),
        ({"edit_modes": ["warp"]}, "loop.edit_modes: 'warp' is not an edit mode"),
        ({"edit_modes": ["regional", "inpaint"]}, "inpaint and regional both apply"),
        ({"edit_modes": [], "carry_edits": True}, "loop: carry_edits: with edit_modes = []"),
        ({"enhancer": False, "memory": "history"}, "loop: memory = history is what the enhancer"),
        ({"memory": "everything"}, "loop.memory: Input should be 'last' or 'history'"),
        ({"best_of": 0}, "loop.best_of: Input should be greater than or equal to 1"),
    ],
)
def test_a_bad_variant_is_one_line_naming_it(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides={f"loop.{k}": v for k, v in overrides.items()})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_variants_from_the_environment_and_their_checks(monkeypatch):
    """critics = "merged" from an environment variable; the critics come back in their order;
    a best_of_judge that is no reward and a plan pause without a plan are one line too."""
    from artloop.graphs.context import check_judge
    from artloop.graphs.human import HumanActionError, check_pause_at

    monkeypatch.setenv("ARTLOOP_LOOP__CRITICS", "merged")
    assert load_config().loop.critics == "merged"
    monkeypatch.setenv("ARTLOOP_LOOP__CRITICS", '["thesis_cot", "data_cot"]')
    assert load_config().loop.critics == ["data_cot", "thesis_cot"]
    with pytest.raises(ConfigError, match=r"^loop\.best_of_judge: .*nicety") as e:
        check_judge(LoopConfig(best_of=2, best_of_judge="nicety"))
    assert "\n" not in str(e.value)
    no_plan = LoopConfig(critics=[], edit_modes=[])
    with pytest.raises(HumanActionError, match="^pause_at plan: this loop makes no plan"):
        check_pause_at(["plan"], plans=no_plan.plans)
    assert check_pause_at(["all"], plans=no_plan.plans) == ["all"]


# --- the graph: a part left out is not a node --------------------------------------------------
def test_the_graph_has_the_variants_nodes_only():
    assert nodes() == [fn.__name__ for fn in NODES]
    assert "compose" not in nodes() and "pick" not in nodes() and "critic" not in nodes()
    merged = nodes(critics="merged")
    assert "critic" in merged and not set(CHAIN) & set(merged)
    assert merged.index("generate") < merged.index("critic") < merged.index("review_plan")
    assert nodes(critics=["data_cot", "thesis_cot"]).count("concept_cot") == 0
    bare = nodes(enhancer=False, critics=[], edit_modes=[], best_of=3)
    assert bare == ["begin", "compose", "review_prompt", "generate", "pick", "validate"] + [
        "decide",
        "record",
    ]
    assert "edit" not in nodes(edit_modes=[]) and "review_plan" in nodes(edit_modes=[])
    # decide goes back to the iteration's first node: enhance, or compose without it.
    graph = build_graph(LoopConfig(enhancer=False)).compile().get_graph()
    assert {(e.source, e.target) for e in graph.edges if e.source == "decide"} == {
        ("decide", "compose"),
        ("decide", "record"),
    }


def test_a_server_runs_only_the_default_shape():
    check_served(LoopConfig(memory="history", best_of_judge="darkness", edit_modes=["tone"]))
    with pytest.raises(ConfigError, match=r"^loop: this variant .*adds critic; leaves out co"):
        check_served(LoopConfig(critics="merged"))


# --- sessions ---------------------------------------------------------------------------------
def test_the_merged_critic_is_one_call_with_the_same_step_keys(store, sd_tool):
    """Three critic calls an iteration become one (the image sent once); its answer lands
    under data_cot, concept_cot and thesis_cot, marked as the critic's; the skipped agents
    are neither nodes nor calls."""
    verdicts = {"Verdict": [verdict("revise", 5.0), verdict("accept", 9.0)]}
    chain = ScriptedChat(scripts=verdicts)
    three = steps_of(
        store, run_session(make_ctx(store, sd_tool, chain, max_iters=2), prompt="a fox")
    )
    merged = Recording(scripts=verdicts)
    merged.sent = []
    ctx = make_ctx(store, sd_tool, merged, max_iters=2, critics="merged")
    summary = run_session(ctx, prompt="a fox")
    assert summary.status == "accepted" and summary.iterations == 2
    per_iteration = ["EnhancedPrompt", "ImageFacts", "Critique", "EditPlan", "Verdict"]
    assert chain.calls == per_iteration * 2
    assert merged.calls == ["EnhancedPrompt", "CriticAnswer", "Verdict"] * 2
    critic_call = merged.sent[1]
    assert [p["type"] for p in critic_call].count("image_url") == 1
    for step, alike in zip(steps_of(store, summary), three, strict=True):
        # The same answers as the three agents' (the scripted defaults), under their keys.
        assert {k: step["agents"][k] for k in CHAIN} == {k: alike["agents"][k] for k in CHAIN}
        assert step["plan"] == alike["plan"]
        assert step["answered_by"] == dict.fromkeys(CHAIN, "critic")
        assert set(step["parse_failures"]) == {"enhance", "critic", "validate"}
        assert "critic" in step["timings"] and not set(CHAIN) & set(step["timings"])
        assert [op["op"] for op in step["edits"]] == ["inpaint"]  # the plan was applied
    assert store.get_run(summary.run_id)["config"]["loop"]["critics"] == "merged"


def test_best_of_draws_consecutive_seeds_and_keeps_the_best(store, sd_tool):
    """best_of = 3: three text-to-image draws, seeds 0, 1, 2, each scored by the named reward;
    the best is the step's image and seed, and every candidate is recorded."""
    seeds, t2i = [], sd_tool.text_to_image

    def seeded(prompt, negative, params):
        seeds.append(params.seed)
        return t2i(prompt, negative, params)

    sd_tool.text_to_image = seeded
    try:
        chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
        ctx = make_ctx(store, sd_tool, chat, best_of=3, best_of_judge="darkness")
        step = steps_of(store, run_session(ctx, prompt="a fox"))[0]
    finally:
        sd_tool.text_to_image = t2i
    assert seeds == [0, 1, 2]
    candidates = step["candidates"]
    assert [c["seed"] for c in candidates] == [0, 1, 2] and len(
        {c["image"] for c in candidates}
    ) == 3
    darkness = reward_entry("darkness").fn
    expected = [
        float(darkness([store.images.get(c["image"])], ["a fox"], [{}])[0][0]) for c in candidates
    ]
    assert [c["score"] for c in candidates] == pytest.approx(expected, abs=1e-4)
    best = max(range(3), key=lambda k: expected[k])
    assert step["picked"] == best and step["image"] == candidates[best]["image"]
    assert step["params"]["seed"] == best and "pick" in step["timings"]


def test_best_of_by_the_rater(store, sd_tool):
    """best_of_judge = vlm: the rater scores each candidate (N calls); the first of the best."""
    ratings = [{**DEFAULTS["Rating"], "score": s} for s in (5.0, 8.0, 8.0)]
    chat = ScriptedChat(scripts={"Rating": ratings, "Verdict": [verdict("accept", 9.0)]})
    ctx = make_ctx(store, sd_tool, chat, best_of=3, edit_modes=["tone"])
    step = steps_of(store, run_session(ctx, prompt="a fox"))[0]
    assert chat.calls.count("Rating") == 3 and step["picked"] == 1
    assert [c["score"] for c in step["candidates"]] == [5.0, 8.0, 8.0]
    assert step["parse_failures"]["pick"] == {"ScriptedChat": 0}


def test_memory_history_shows_the_enhancer_every_attempt(store, sd_tool):
    """memory = history: the third enhance sees both earlier attempts (prompt, score, verdict,
    reasons); memory = last: only the last verdict's reasons."""
    prompts = [{**DEFAULTS["EnhancedPrompt"], "prompt": f"a fox, take {i}"} for i in range(3)]
    verdicts = [{**verdict("revise", 3.0 + i), "reasons": [f"reason {i}"]} for i in range(3)]
    scripts = {"EnhancedPrompt": prompts, "Verdict": verdicts}
    seen = {}
    for memory in ("history", "last"):
        chat = Recording(scripts=scripts)
        chat.sent = []
        ctx = make_ctx(store, sd_tool, chat, max_iters=3, plateau_patience=5, memory=memory)
        run_session(ctx, prompt="a fox")
        enhances = [text_of(c) for c in chat.sent if '"title":"EnhancedPrompt"' in text_of(c)]
        seen[memory] = enhances[2]
    assert "a fox, take 0" in seen["history"] and "a fox, take 1" in seen["history"]
    assert "reason 0" in seen["history"] and "reason 1" in seen["history"]
    assert "score 3.0 (revise)" in seen["history"] and "score 4.0 (revise)" in seen["history"]
    assert "reason 1" in seen["last"] and "reason 0" not in seen["last"]
    assert "take 0" not in seen["last"]


def test_no_plan_and_no_enhancer_rerolls_and_judges_the_image_alone(store, sd_tool):
    """critics = [], edit_modes = [], no enhancer: each iteration draws the user's prompt with
    the next seed and the rater judges it alone; no agent but the judge is called."""
    seeds, t2i = [], sd_tool.text_to_image

    def seeded(prompt, negative, params):
        seeds.append((prompt, params.seed))
        return t2i(prompt, negative, params)

    ratings = [{**DEFAULTS["Rating"], "score": s} for s in (4.0, 6.0, 8.0)]
    chat = ScriptedChat(scripts={"Rating": ratings})
    loop = {"enhancer": False, "critics": [], "edit_modes": [], "plateau_patience": 5}
    sd_tool.text_to_image = seeded
    try:
        summary = run_session(make_ctx(store, sd_tool, chat, **loop), prompt="a fox")
    finally:
        sd_tool.text_to_image = t2i
    assert seeds == [("a fox", 0), ("a fox", 1), ("a fox", 2)]
    assert chat.calls == ["Rating"] * 3 and summary.scores == [4.0, 6.0, 8.0]
    assert summary.status == "accepted"  # 8 >= accept_score 7: the rater's score, accepted
    steps = steps_of(store, summary)
    for step in steps:
        assert set(step["agents"]) == {"validate"} and "edited_image" not in step
        assert step["result_image"] == step["image"] and "compose" in step["timings"]
        assert not {"enhance", "edit", "review_plan", *CHAIN} & set(step["timings"])
    assert [s["agents"]["validate"]["verdict"] for s in steps] == ["revise", "revise", "accept"]
    assert store.get_run(summary.run_id)["final_image"] == steps[2]["image"]
    assert write_report(store, summary.run_id).is_file()  # a step with no edit renders


def test_a_plan_without_edit_modes_drives_the_next_prompt(store, sd_tool):
    """edit_modes = [] with the critics, no enhancer: no edit node; the plan's revised and
    negative prompts are iteration 2's (compose), and the planner is told no edit applies;
    a reward judge scores the image alone."""
    chat = Recording()
    chat.sent = []
    loop = {"enhancer": False, "edit_modes": [], "judge": "darkness", "accept_score": 10.0}
    summary = run_session(make_ctx(store, sd_tool, chat, max_iters=2, **loop), prompt="a fox")
    first, second = steps_of(store, summary)
    assert first["prompt"] == "a fox" and first["negative_prompt"] == ""
    plan = DEFAULTS["EditPlan"]
    assert (second["prompt"], second["negative_prompt"]) == (
        plan["revised_prompt"],
        plan["negative_prompt"],
    )
    assert "edits" not in first and first["plan"]["revised_prompt"] == plan["revised_prompt"]
    assert first["parse_failures"]["validate"] == {"reward:darkness": 0}
    assert first["agents"]["validate"]["reasons"][0].startswith("darkness ")
    planner = next(text_of(c) for c in chat.sent if '"title":"EditPlan"' in text_of(c))
    assert "This run does not apply a global img2img strength; regional edits; the tone" in planner


def test_edit_modes_apply_only_their_part_of_the_plan(store, sd_tool):
    plan = {**DEFAULTS["EditPlan"], "params": {**DEFAULTS["EditPlan"]["params"], "exposure": 1.2}}
    chat = ScriptedChat(scripts={"EditPlan": [plan], "Verdict": [verdict("accept", 9.0)]})
    ctx = make_ctx(store, sd_tool, chat, edit_modes=["tone"])
    step = steps_of(store, run_session(ctx, prompt="a fox"))[0]
    assert [op["op"] for op in step["edits"]] == ["tone"]  # not the plan's box edit


def test_a_variant_run_is_viewed_and_resumed_with_its_own_graph(store, sd_tool):
    """The stored run records its loop; sessions read its graph from it; resuming it with
    another variant is refused."""
    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    ctx = make_ctx(store, sd_tool, chat, critics="merged", best_of=2, best_of_judge="darkness")
    first = run_session(ctx, prompt="a fox", interrupt_before=["critic"])
    assert first.status == "interrupted"
    assert view(store, first.run_id).next == ["critic"]
    with pytest.raises(ValueError, match="runs another loop variant"):
        run_session(make_ctx(store, sd_tool, chat), run_id=first.run_id)
    done = run_session(ctx, run_id=first.run_id)
    assert done.status == "accepted" and chat.calls == ["EnhancedPrompt", "CriticAnswer", "Verdict"]
    stored = store.get_run(first.run_id)["config"]["loop"]
    assert (stored["critics"], stored["best_of"], stored["best_of_judge"]) == (
        "merged",
        2,
        "darkness",
    )


def test_the_cli_resumes_a_variant_with_its_stored_loop(tmp_path):
    """`artloop run` with a variant in the config file fails mid-run (a dead server);
    `artloop resume` under a config without that variant still finishes the run as it began:
    the loop stored with the run builds the graph."""
    from artloop.cli import app
    from artloop.store.trajectories import TrajectoryStore
    from typer.testing import CliRunner

    marker = tmp_path / "fail-once"
    marker.touch()
    common = (
        f'home = "{tmp_path / "home"}"\n[chat]\nbackend = "custom"\ncustom_class = '
        '"fakes:FlakyChat"\nmax_retries = 1\nretry_backoff_s = 0\n'
        f'[chat.custom_kwargs]\nmarker = "{marker}"\nfail_on = 5\nfailures = 2\n'
        '[diffusion]\nmodel = "tiny-sd"\nwidth = 64\nheight = 64\nsteps = 2\n'
    )
    variant, plain = tmp_path / "variant.toml", tmp_path / "plain.toml"
    variant.write_text(
        common + '[loop]\nmax_iters = 2\ncritics = "merged"\nmemory = "history"\n'
        'best_of = 2\nbest_of_judge = "darkness"\n'
    )
    plain.write_text(common)
    runner = CliRunner()
    failed = runner.invoke(app, ["run", "a fox", "--config", str(variant)])
    assert failed.exit_code == 1, failed.output
    run_id = re.search(r"artloop resume ([0-9a-f]{16})", " ".join(failed.stderr.split())).group(1)
    resumed = runner.invoke(app, ["resume", run_id, "--config", str(plain), "--json"])
    assert resumed.exit_code == 0, resumed.output
    run = TrajectoryStore(tmp_path / "home").get_run(run_id)
    assert run["status"] == "max_iters" and len(run["steps"]) == 2
    for step in run["steps"]:
        assert set(step["parse_failures"]) == {"enhance", "critic", "validate"}
        assert len(step["candidates"]) == 2 and "pick" in step["timings"]
    assert run["config"]["loop"]["critics"] == "merged"


def test_the_planner_is_told_what_regional_applies():
    """regional applies the plan's box edits (in one pass) as inpaint does: the planner is not
    told they are dropped."""
    from artloop.agents.thesis_cot import unapplied

    assert unapplied(["img2img", "regional", "tone"]) == []
    assert unapplied(["regional"]) == [
        "a global img2img strength",
        "the tone factors (exposure, contrast, saturation)",
    ]
    assert "regional edits" in unapplied(["img2img", "tone"])
