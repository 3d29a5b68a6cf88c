"""Measured judges and VLM rewards: the reward judge in the validator's place, the tone edit it
rewards, the rater ("vlm") and SynArtifact rewards, their canaries (the control images, the
schedule and cache of the check, the validator's watch), and run tags for export."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
from artloop.agents.schemas import Verdict
from artloop.cli import app
from artloop.config import ConfigError, LoopConfig, load_config
from artloop.graphs.context import check_judge
from artloop.graphs.runner import run_session
from artloop.prompts import artifact_taxonomy
from artloop.rewards import (
    REWARDS,
    BrokenJudgeError,
    JudgeWatch,
    clip_text_embedder,
    judge_by_reward,
    reward,
    synartifact_reward,
    vlm_reward,
)
from artloop.rewards.vlm import canary_image
from artloop.store.export import ExportFilters, select_runs
from artloop.tools.image_facts import measure
from artloop.tools.images import adjust_tone
from fakes import DEFAULTS, ScriptedChat
from PIL import Image
from test_graph import make_ctx
from typer.testing import CliRunner

GREY = Image.new("RGB", (64, 64), (128, 128, 128))
DARKER = Image.new("RGB", (64, 64), (64, 64, 64))


def test_adjust_tone_scales_brightness_and_leaves_none_alone():
    assert measure(adjust_tone(GREY, exposure=0.5))["brightness"] == pytest.approx(0.25, abs=0.01)
    assert np.array_equal(np.asarray(adjust_tone(GREY)), np.asarray(GREY))
    flat = adjust_tone(Image.radial_gradient("L").convert("RGB"), contrast=0.5)
    assert (
        measure(flat)["contrast"] < measure(Image.radial_gradient("L").convert("RGB"))["contrast"]
    )


def test_reward_judge_scores_accepts_and_rejects():
    darker = judge_by_reward(GREY, DARKER, "a fox", "darkness", accept_score=7.0).output
    assert darker.score == pytest.approx(10 * (1 - 64 / 255), abs=0.05)
    assert (darker.verdict, darker.better_than_before) == ("accept", True)
    not_enough = judge_by_reward(GREY, DARKER, "a fox", "darkness", accept_score=8.0).output
    assert not_enough.verdict == "revise"
    brighter = judge_by_reward(DARKER, GREY, "a fox", "darkness", accept_score=0.0).output
    assert (brighter.verdict, brighter.better_than_before) == ("reject", False)
    assert brighter.score == pytest.approx(7.5, abs=0.05)  # the kept image's: the one before
    assert "darkness 0.749 -> 0.498" in brighter.reasons[0]


def test_unknown_judge_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="judge.*unknown judge 'darknes'"):
        check_judge(load_config(overrides={"loop.judge": "darknes"}).loop)


@pytest.mark.parametrize("name", ["sharpness", "colourfulness", "synartifact"])
def test_a_reward_without_a_range_is_refused_as_judge(name):
    """10 x an unbounded reward, capped at 10, accepted any improvement: such a reward cannot
    judge, in the config and in the judge itself, and the refusal says why."""
    why = f"reward '{name}' has no declared range"
    with pytest.raises(ConfigError, match=f"loop.judge.*{why}"):
        check_judge(load_config(overrides={"loop.judge": name}).loop)
    with pytest.raises(ValueError, match=why):
        judge_by_reward(GREY, DARKER, "a fox", name, accept_score=7.0)
    assert name in REWARDS and REWARDS[name].range is None  # still a reward (DDPO, eval)


def test_cli_refuses_an_unbounded_judge_in_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["run", "a fox", "--judge", "sharpness", "--home", str(tmp_path / "home")]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    message = " ".join(result.stderr.split())
    assert "reward 'sharpness' has no declared range" in message and "darkness" in message


def test_judge_maps_a_rewards_declared_range_onto_0_10():
    half = Image.new("RGB", (64, 64), (64, 64, 64))
    half.paste((192, 192, 192), (0, 0, 32, 64))  # luma std 64/255: contrast 0.251 of 0-0.5
    flat = judge_by_reward(GREY, half, "a fox", "contrast", accept_score=5.0).output
    assert flat.score == pytest.approx(10 * (64 / 255) / 0.5, abs=0.05)
    assert (flat.verdict, flat.better_than_before) == ("accept", True)
    try:  # a lower-is-better reward on -1..1, and one with a normaliser instead of a range
        reward("glare", range=(-1.0, 1.0), higher_is_better=False)(REWARDS["brightness"].fn)
        reward("tamed", normalise=lambda v: v / (v + 0.5))(REWARDS["brightness"].fn)
        glare = judge_by_reward(GREY, DARKER, "a fox", "glare", accept_score=0.0).output
        # brightness 64/255 on -1..1, lower the better: 10 x (1 - (0.251 + 1) / 2)
        assert glare.better_than_before and glare.score == pytest.approx(
            10 * (1 - 64 / 255) / 2, abs=0.05
        )
        worse = judge_by_reward(DARKER, GREY, "a fox", "glare", accept_score=0.0).output
        assert (worse.verdict, worse.better_than_before) == ("reject", False)
        tamed = judge_by_reward(DARKER, GREY, "a fox", "tamed", accept_score=0.0).output
        b = measure(GREY)["brightness"]
        assert tamed.better_than_before and tamed.score == pytest.approx(
            10 * b / (b + 0.5), abs=0.05
        )
    finally:
        del REWARDS["glare"], REWARDS["tamed"]


def test_loop_with_a_darkness_judge_keeps_the_darkened_image(store, sd_tool):
    """The plan asks for exposure 0.6: the edit applies it, the judge measures it and accepts."""
    plan = {
        **DEFAULTS["EditPlan"],
        "regional_edits": [],
        "params": {"strength": 0.0, "exposure": 0.6},
    }
    chat = ScriptedChat(scripts={"EditPlan": [plan]})
    ctx = make_ctx(store, sd_tool, chat, judge="darkness", accept_score=6.0)
    summary = run_session(ctx, prompt="a fox at night")
    run = store.get_run(summary.run_id)
    step = run["steps"][0]
    assert [e["op"] for e in step["edits"]] == ["tone"] and step["edits"][0]["exposure"] == 0.6
    before, after = step["stats"]["image"]["brightness"], step["stats"]["edited"]["brightness"]
    assert after == pytest.approx(0.6 * before, abs=0.02)
    assert step["score"] == pytest.approx(10 * (1 - after), abs=0.06)
    assert summary.status == "accepted" and run["final_image"] == step["edited_image"]
    assert "Verdict" not in chat.calls  # the judge, not the VLM, validated
    assert step["parse_failures"]["validate"] == {"reward:darkness": 0}


def test_the_judges_identity_is_stored_with_the_run_and_on_the_export_card(
    store, sd_tool, tmp_path
):
    """A scorer that judges records its identity (its model's weights) in the run's models and
    so on every export card of the run (issue 17, item 3b)."""
    from artloop.store.export import export_dataset, provenance

    weights = {"id": "test/dark", "revision": "local", "sha256": "0123456789abcdef"}
    reward("test-dark", range=(0.0, 1.0), model=lambda: dict(weights))(REWARDS["darkness"].fn)
    try:
        ctx = make_ctx(store, sd_tool, ScriptedChat(), judge="test-dark", accept_score=0.0)
        summary = run_session(ctx, prompt="a fox at night")
        judge = store.get_run(summary.run_id)["models"]["judge"]
        assert judge == {
            "name": "test-dark",
            "range": [0.0, 1.0],
            "higher_is_better": True,
            "model": weights,
        }
        export_dataset(store, tmp_path / "ds", "prompts")
        (models,) = provenance(tmp_path / "ds")["models"]
        assert models["judge"]["model"] == weights
        vlm = make_ctx(store, sd_tool, ScriptedChat())
        assert "judge" not in vlm.models()  # the validator agent is the chat model's
    finally:
        del REWARDS["test-dark"]


def test_fact_scorers_are_checked_and_their_identities_stored(store, sd_tool):
    with pytest.raises(ConfigError, match="loop.fact_scorers: unknown reward 'no-such-scorer'"):
        check_judge(LoopConfig(fact_scorers=["no-such-scorer"]))
    ctx = make_ctx(store, sd_tool, ScriptedChat(), fact_scorers=["darkness", "contrast"])
    facts = ctx.models()["fact_scorers"]
    assert list(facts) == ["darkness", "contrast"] and facts["contrast"]["range"] == (0.0, 0.5)


class TellingChat(ScriptedChat):
    """A scripted chat that keeps the text of every request (class-wide: a pydantic model)."""

    texts: ClassVar[list[str]] = []

    def _generate(self, messages, stop=None, run_manager=None, **kw):
        content = next(m for m in messages if m.type == "human").content
        parts = content if isinstance(content, list) else [content]
        self.texts.append(" ".join(p if isinstance(p, str) else p.get("text", "") for p in parts))
        return super()._generate(messages, stop, run_manager, **kw)


def test_fact_scorers_reach_data_cot_and_the_step(store, sd_tool):
    """loop.fact_scorers (--fact-scorer): each image's scores go to Data-CoT as measured facts
    beside the statistics, and into the step record (issue 17, item 3a)."""
    TellingChat.texts.clear()
    ctx = make_ctx(store, sd_tool, TellingChat(), fact_scorers=["darkness", "sharpness"])
    summary = run_session(ctx, prompt="a fox at night")
    step = store.get_run(summary.run_id)["steps"][0]
    scores = step["scores"]["image"]
    assert list(scores) == ["darkness", "sharpness"]
    brightness = step["stats"]["image"]["brightness"]
    assert scores["darkness"]["score"] == pytest.approx(1 - brightness, abs=1e-3)
    assert scores["darkness"]["range"] == [0.0, 1.0] and scores["sharpness"]["range"] is None
    facts = [t for t in TellingChat.texts if "you describe pictures precisely" in t]
    assert len(facts) == len(store.get_run(summary.run_id)["steps"])  # one per iteration
    darkness = f"- darkness: {scores['darkness']['score']} (range [0.0, 1.0], higher is better)"
    assert darkness in facts[0]  # this iteration's score, its range and its direction
    assert all("Scores measured by other models" in t and "- sharpness: " in t for t in facts)
    TellingChat.texts.clear()
    plain = run_session(make_ctx(store, sd_tool, TellingChat()), prompt="a fox at night")
    assert "scores" not in store.get_run(plain.run_id)["steps"][0]
    facts = [t for t in TellingChat.texts if "you describe pictures precisely" in t]
    assert facts and not any("Scores measured by other models" in t for t in facts)


def test_watch_scorers_are_recorded_and_reported_but_no_agent_sees_them(store, sd_tool):
    """loop.watch_scorers (--watch): each iteration's image and edit scored for the record and
    the report (issue 19, item 5: the `shapes` score per iteration); no agent's prompt holds
    them, and a prompt the scorer cannot read records why instead of failing the run."""
    from artloop.store.report import write_report

    with pytest.raises(ConfigError, match="loop.watch_scorers: unknown reward 'nope'"):
        check_judge(LoopConfig(watch_scorers=["nope"]))
    TellingChat.texts.clear()
    ctx = make_ctx(store, sd_tool, TellingChat(), watch_scorers=["darkness", "shapes"])
    summary = run_session(ctx, prompt="a red circle")
    run = store.get_run(summary.run_id)
    assert set(run["models"]["watch_scorers"]) == {"darkness", "shapes"}
    step = run["steps"][0]
    dark = step["watch"]["image"]["darkness"]["score"]
    assert dark == pytest.approx(1 - step["stats"]["image"]["brightness"], abs=1e-3)
    edited = step["watch"]["edited"]["darkness"]["score"]
    assert edited == pytest.approx(1 - step["stats"]["edited"]["brightness"], abs=1e-3)
    assert 0.0 <= step["watch"]["image"]["shapes"]["score"] <= 1.0
    assert "scores" not in step  # not a fact: Data-CoT was told nothing
    assert TellingChat.texts and not any("darkness" in t for t in TellingChat.texts)
    html = write_report(store, summary.run_id).read_text()
    assert "watched (image)" in html and f"darkness <b>{dark:.2f}</b>" in html
    odd = run_session(ctx, prompt="a fox at night")  # names no shape: `shapes` cannot read it
    step = store.get_run(odd.run_id)["steps"][0]
    assert "names no shape" in step["watch"]["image"]["shapes"]["error"]
    assert "score" in step["watch"]["image"]["darkness"]


def test_cli_refuses_an_unknown_fact_scorer_in_one_line(tmp_path):
    home = tmp_path / "home"
    result = CliRunner().invoke(
        app, ["run", "a fox", "--fact-scorer", "no-such-scorer", "--home", str(home), "--quiet"]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "loop.fact_scorers: unknown reward 'no-such-scorer'" in lines[0]
    for command in (["run"], ["batch"], ["session", "new"]):  # the one shared option
        shown = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
        assert "--fact-scorer" in shown.stdout and "--watch" in shown.stdout, command


def test_vlm_reward_scales_the_raters_score():
    chat = ScriptedChat(
        scripts={
            "Rating": [{"score": 7.5, "reasons": ["ok"]}, {"score": 2.0, "reasons": ["blurry"]}]
        }
    )
    scores, info = vlm_reward(chat)([GREY, DARKER], ["a", "b"], [{}, {}])
    assert scores.tolist() == pytest.approx([0.75, 0.2]) and info["reasons"][1] == ["blurry"]


def test_vlm_reward_with_the_tiny_vlm(tiny_chat):
    """The in-process path end to end, canaries included. The tiny Qwen2-VL has random weights:
    it rates pure noise as it rates the images, so its canaries refuse it (this test used to
    pass it: two images were too few for the agreement check); with them off, its scores are
    still read and scaled."""
    with pytest.raises(BrokenJudgeError, match=r"^vlm judge rated the noise canary \(pure noise\)"):
        vlm_reward(tiny_chat)([GREY, DARKER], ["a fox", "a fox"], [{}, {}])
    scores, info = vlm_reward(tiny_chat, canaries="off")([GREY, DARKER], ["a fox"] * 2, [{}, {}])
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()
    assert all(1 <= len(r) <= 3 for r in info["reasons"])
    assert info["canaries"] == {"checked": "off", "schedule": "off"}


def _sharpness(image: Image.Image) -> float:
    return measure(image)["sharpness"]


def test_canaries_are_the_same_control_images_every_time():
    """Noise, a flat grey frame and a heavy blur, at the real image's size, byte-identical on
    every call (the check is reproducible), and each what it says it is."""
    real = Image.radial_gradient("L").convert("RGB").resize((96, 64))
    real.paste((255, 0, 0), (10, 10, 30, 30))
    for kind in ("noise", "grey", "blur"):
        a, b = canary_image(kind, real), canary_image(kind, real)
        assert a.size == (96, 64) and a.mode == "RGB" and a.tobytes() == b.tobytes()
    noise = np.asarray(canary_image("noise", real)).astype(float)
    assert noise.std() > 60 and abs(noise.mean() - 127.5) < 5  # uniform over 0-255
    assert np.unique(np.asarray(canary_image("grey", real))).tolist() == [128]
    assert _sharpness(canary_image("blur", real)) < 0.2 * _sharpness(real)
    with pytest.raises(ValueError, match="unknown canary 'fog'"):
        canary_image("fog", real)


def spotted(artifacts: list[str]) -> dict:
    """The artifact spotter's answer naming `artifacts` (class ids; [] = none)."""
    return {"notes": "", "artifacts": artifacts}


def test_a_judge_that_tells_the_canaries_apart_passes():
    """Varied real answers, canaries answered as they should be: rated low (noise 0.5, grey 3
    against a mean of 6), artifacts named (noise, the blurred copy)."""
    rater = ScriptedChat(
        scripts={"Rating": [{"score": s, "reasons": ["r"]} for s in (8.0, 4.0, 6.0, 0.5, 3.0)]}
    )
    scores, info = vlm_reward(rater)([GREY, DARKER, GREY], ["a fox"] * 3, [{}] * 3)
    assert scores.tolist() == pytest.approx([0.8, 0.4, 0.6])
    assert info["canaries"]["canaries"] == {"noise": 0.5, "grey": 3.0}
    assert info["canaries"]["passed"] and rater.calls.count("Rating") == 3 + 2
    found = [["blur"], [], ["omission", "object_distortion"], ["blur"]]
    spotter = ScriptedChat(scripts={"ArtifactAnswer": [spotted(a) for a in found]})
    _, info = synartifact_reward(spotter, embed=bag_of_words)([GREY, DARKER], ["a"] * 2, [{}] * 2)
    assert info["answers"] == ["blur", "No artifacts"] and info["canaries"]["passed"]
    assert info["artifacts"] == found[:2]
    assert info["canaries"]["canaries"] == {"noise": found[2], "blur": ["blur"]}


def test_the_canary_check_is_scheduled_and_its_outcome_cached():
    """ "once" (the default): asked on the first call only, then cached, in calls and in the
    info; a judge found broken stays refused without being asked again; N: again every N
    calls; "agreement": only once different images got one answer; "off": never."""
    low = {"score": 1.0, "reasons": ["no fox"]}
    good = {"score": 8.0, "reasons": ["a fox"]}
    images, prompts = [GREY, DARKER], ["a fox"] * 2

    def calls(chat):
        return chat.calls.count("Rating")

    chat = ScriptedChat(scripts={"Rating": [good, good, low, low, good]})
    fn = vlm_reward(chat)
    assert fn(images, prompts, [{}, {}])[1]["canaries"]["checked"] == "now" and calls(chat) == 4
    _, info = fn(images, prompts, [{}, {}])
    assert calls(chat) == 6 and info["canaries"]["checked"] == "cached (from call 1)"
    assert info["canaries"]["calls"] == 0 and info["canaries"]["passed"]

    broken = ScriptedChat(scripts={"Rating": [good]})
    fn = vlm_reward(broken)
    for _ in range(2):  # the second call asks its images, not the canaries again
        with pytest.raises(BrokenJudgeError, match="the noise canary"):
            fn(images, prompts, [{}, {}])
    assert calls(broken) == 2 + 2 + 2

    every = ScriptedChat(scripts={"Rating": [good, good, low, low]})
    fn = vlm_reward(every, canaries=2)
    checked = [fn(images, prompts, [{}, {}])[1]["canaries"]["checked"] for _ in range(4)]
    assert checked[0] == checked[2] == "now" and checked[1] == "cached (from call 1)"
    assert checked[3] == "cached (from call 3)"

    seen = ScriptedChat(scripts={"Rating": [good, low, good, good, good]})
    fn = vlm_reward(seen, canaries="agreement")
    assert fn(images, prompts, [{}, {}])[1]["canaries"]["checked"] == "not yet"
    with pytest.raises(BrokenJudgeError):  # three different images, one answer: it looks
        fn([GREY, DARKER, Image.new("RGB", (64, 64))], ["a fox"] * 3, [{}] * 3)

    off = ScriptedChat(scripts={"Rating": [good]})
    assert vlm_reward(off, canaries="off")(images, prompts, [{}, {}])[0].tolist() == [0.8] * 2
    assert calls(off) == 2
    with pytest.raises(ValueError, match="canary schedule 'always'"):
        vlm_reward(off, canaries="always")


def _verdict(v: str, score: float, better: bool) -> Verdict:
    return Verdict(verdict=v, score=score, better_than_before=better, reasons=["r"])


def test_the_validator_watch_asks_its_canary_pairs():
    """The watch of a judge asked one edit at a time ("once": at its first verdict here): the
    canary pairs are the image before edited into noise and into grey; a validator that
    rejects them passes, one that takes them for an improvement is refused with the runs of
    its window, and stays refused."""
    asked: list[tuple] = []

    def asker(answer: Verdict):
        def ask(after: Image.Image) -> Verdict:
            asked.append((after.size, np.asarray(after).std() > 0))
            return answer

        return ask

    honest = JudgeWatch(schedule="once")
    check = honest.check(
        "r1",
        "img1",
        _verdict("revise", 5.0, True),
        "validator",
        ask=asker(_verdict("reject", 1.0, False)),
        before=GREY,
    )
    assert check is not None and check.broken is None
    assert asked == [((64, 64), True), ((64, 64), False)]  # noise, then the flat grey frame
    assert (
        honest.check(
            "r2",
            "img2",
            _verdict("revise", 5.0, True),
            "validator",
            ask=asker(_verdict("reject", 1.0, False)),
            before=GREY,
        )
        is check
    )
    assert len(asked) == 2  # cached

    broken = JudgeWatch(schedule="once")
    with pytest.raises(BrokenJudgeError, match="the verdict 'revise', better than before") as e:
        broken.check(
            "r1",
            "img1",
            _verdict("revise", 5.0, True),
            "validator",
            ask=asker(_verdict("revise", 5.0, True)),
            before=GREY,
        )
    assert e.value.runs == ("r1",)
    with pytest.raises(BrokenJudgeError) as e:  # found broken once: refused from then on
        broken.check(
            "r2",
            "img2",
            _verdict("accept", 9.0, True),
            "validator",
            ask=asker(_verdict("reject", 1.0, False)),
            before=GREY,
        )
    assert e.value.runs == ("r1", "r2") and len(asked) == 4
    # Rejected, but scored like the real edits: it did not look either.
    with pytest.raises(BrokenJudgeError, match=r"scored the noise canary pair .* 5/10, as high"):
        JudgeWatch(schedule="once").check(
            "r1",
            "img1",
            _verdict("revise", 5.0, False),
            "validator",
            ask=asker(_verdict("reject", 5.0, False)),
            before=GREY,
        )


VOCABULARY = sorted(
    {w for a in artifact_taxonomy() for w in a["id"].split("_")} | {"no", "artifacts"}
)


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A transparent embedder: unit-norm word counts over a fixed vocabulary (the words of
    "No artifacts" and of the class names), like any embedder a fixed space."""
    words = [t.lower().replace(",", " ").split() for t in texts]
    v = np.array([[ws.count(w) for w in VOCABULARY] for ws in words], dtype=float)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_synartifact_reward_follows_its_formula():
    found = [[], ["human_distortion", "duplication"]]
    answers = ["No artifacts", "human distortion, duplication"]  # the ids as the classes' names
    chat = ScriptedChat(scripts={"ArtifactAnswer": [spotted(a) for a in found]})
    calls: list[int] = []

    def embed(texts):
        calls.append(len(texts))
        return bag_of_words(texts)

    fn = synartifact_reward(chat, embed=embed, alpha=0.5, beta=0.25)
    scores, info = fn([GREY, GREY], ["a", "a"], [{}, {}])
    assert info["answers"] == answers
    assert scores[0] == pytest.approx(1.25)  # sim 1 to "No artifacts", 0 to every class
    assert scores[0] > scores[1]  # the answer naming artifacts is penalised
    fn([GREY], ["a"], [{}])
    assert calls == [14, 2, 1]  # "No artifacts" + 13 classes once, then the answers of each call
    # with the tiny pipeline's CLIP text encoder: an answer equal to "No artifacts" has sim 1
    clip = clip_text_embedder("tiny-sd")
    classes = ["No artifacts", "human distortion"]
    sims = clip(classes) @ clip(classes).T
    assert np.diag(sims) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_export_selects_runs_by_tag(store, sd_tool):
    accept = {"Verdict": [{**DEFAULTS["Verdict"], "verdict": "accept", "score": 9.0}]}
    tagged = run_session(
        make_ctx(store, sd_tool, ScriptedChat(scripts=accept)),
        prompt="a fox",
        config={"tags": ["night", "study-1"]},
    ).run_id
    run_session(
        make_ctx(store, sd_tool, ScriptedChat(scripts=accept)),
        prompt="a cat",
        config={"tags": ["study-2"]},
    )
    runs, considered = select_runs(store, ExportFilters(tags=("study-1",)))
    assert considered == 2 and [r["run_id"] for r in runs] == [tagged]
    assert select_runs(store, ExportFilters(tags=("study-1", "study-2")))[0] == []
    assert "tags study-1" in ExportFilters(tags=("study-1",)).describe()


def test_the_configured_canary_schedule_reaches_every_vlm_judge(tmp_path):
    """`scorers.canaries` is the schedule of a VLM judge built without one (read per call: the
    registered vlm and synartifact rewards are built at import, test_ddpo runs vlm from the
    CLI), of the validator's watch, and of a built context's; a bad value is one line."""
    from artloop.config import ScorersConfig
    from artloop.graphs.context import build_context
    from artloop.rewards import configure_scorers

    good = {"score": 8.0, "reasons": ["a fox"]}  # noise and grey rated as high: broken
    images, prompts = [GREY, DARKER], ["a fox"] * 2
    try:
        configure_scorers(ScorersConfig(canaries="off"))
        _, info = vlm_reward(ScriptedChat(scripts={"Rating": [good]}))(images, prompts, [{}] * 2)
        assert info["canaries"] == {"checked": "off", "schedule": "off"}
        assert JudgeWatch().canaries.schedule == "off"
        configure_scorers(ScorersConfig(canaries=3))
        assert JudgeWatch().canaries.schedule == 3
        configure_scorers(None)  # unset: each judge's own schedule
        with pytest.raises(BrokenJudgeError, match="the noise canary"):
            vlm_reward(ScriptedChat(scripts={"Rating": [good]}))(images, prompts, [{}] * 2)
        assert JudgeWatch().canaries.schedule == "agreement"
    finally:
        configure_scorers(None)
    cfg = load_config(overrides={"home": str(tmp_path), "scorers.canaries": 2})
    assert build_context(cfg).judge_watch.canaries.schedule == 2
    with pytest.raises(ConfigError) as e:
        load_config(overrides={"scorers.canaries": 0})
    assert str(e.value) == (
        "invalid config: scorers.canaries: '0' is not once, agreement, off or a number of "
        "calls N >= 1"
    )
