"""Malformed model output, fuzzed (hypothesis): the parse/repair path never crashes, whatever the
model says; failures are counted; a judge that cannot tell its canaries (control images whose
answer is known: noise, a grey frame, a blurred copy) from real images is refused, and one that
honestly gives one answer to every real image is not (that was the old agreement check's
refusal; the canary tests of the schedule and the images are in test_judges.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from artloop.agents import schemas
from artloop.models.scripted import ScriptedChat
from artloop.models.structured import (
    CallPolicy,
    InvalidOutput,
    StructuredOutputError,
    invoke_structured,
    parse_output,
)
from artloop.rewards import BrokenJudgeError, synartifact_reward, vlm_reward
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import HumanMessage
from PIL import Image

SCHEMAS = [
    schemas.EnhancedPrompt,
    schemas.ImageFacts,
    schemas.Critique,
    schemas.EditPlan,
    schemas.Verdict,
    schemas.Rating,
    schemas.ArtifactAnswer,
]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, with numbers far outside every schema's ranges (and boxes of any shape).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)


def _answers(schema) -> st.SearchStrategy[str]:
    """Text a model might send: any text, any JSON, or an object with the schema's own field
    names holding wrong or out-of-range values (the hard case: it almost validates)."""
    fields = list(schema.model_fields)
    near = st.fixed_dictionaries({}, optional={f: json_values for f in fields}).map(json.dumps)
    return st.one_of(
        st.text(max_size=200),
        json_values.map(json.dumps),
        near,
        st.sampled_from(["", "   ", "```json\n```", "{", "null", "[]", "{}"]),
    )


def _holds(schema, out) -> None:
    """What a validated answer guarantees: bounded scores and boxes in the 0-1000 grid."""
    dumped = out.model_dump()
    for key in ("score", "prompt_alignment"):
        if key in dumped:
            assert 0 <= dumped[key] <= 10
    for box in _boxes(dumped):
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000


def _boxes(value):
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "box" and v is not None:
                yield v
            else:
                yield from _boxes(v)
    elif isinstance(value, list):
        for v in value:
            yield from _boxes(v)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_parse_never_crashes(schema):
    @FUZZ
    @given(raw=_answers(schema))
    def check(raw):
        try:
            out = parse_output(raw, schema)
        except InvalidOutput as e:
            assert str(e) and e.raw == raw  # a named problem, and the answer kept for repair
            return
        _holds(schema, out)

    check()


@FUZZ
@given(answers=st.lists(_answers(schemas.Verdict), min_size=1, max_size=4))
def test_repair_loop_ends_in_an_answer_or_one_clear_error(answers):
    chat = ScriptedChat(scripts={"Verdict": answers})
    messages = [
        HumanMessage(
            content="judge. "
            + json.dumps(schemas.Verdict.model_json_schema(), separators=(",", ":"))
        )
    ]
    policy = CallPolicy(attempts=3, backoff_s=0)
    try:
        result = invoke_structured(
            chat, messages, schemas.Verdict, agent="validator", policy=policy
        )
    except StructuredOutputError as e:
        assert "validator" in str(e) and "after 3 attempts" in str(e)
        assert len(chat.calls) == 3  # every attempt was made, and counted
        return
    _holds(schemas.Verdict, result.output)
    assert result.failures == len(chat.calls) - 1  # the invalid answers before it, counted


def _images(n: int) -> list[Image.Image]:
    return [Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)) for i in range(n)]


RATING = {"score": 7.0, "reasons": ["fine"]}
LOW = {"score": 1.0, "reasons": ["no fox"]}
EMBED = {"embed": lambda t: np.ones((len(t), 4))}


def _raters(real: list, canaries: list) -> ScriptedChat:
    """A rater answering the batch's images in turn, then its canaries (noise, then grey)."""
    return ScriptedChat(scripts={"Rating": [*real, *canaries]})


def _spotter(real: list[list[str]], canaries: list[list[str]]) -> ScriptedChat:
    """An artifact spotter likewise (class ids; [] = no artifacts): the batch's images, then
    noise, then the blurred copy."""
    answers = [{"notes": "", "artifacts": a} for a in [*real, *canaries]]
    return ScriptedChat(scripts={"ArtifactAnswer": answers})


@pytest.mark.parametrize(
    "make",
    [
        lambda: vlm_reward(_raters([RATING] * 4, [LOW, LOW])),
        lambda: synartifact_reward(_spotter([[]] * 4, [["omission"], ["blur"]]), **EMBED),
    ],
    ids=["vlm", "synartifact"],
)
def test_honest_constant_answers_over_real_images_are_accepted(make):
    """Moved from test_a_constant_judge_never_becomes_a_reward: four different images that all
    get one answer were refused; now they are scores, because the canaries were told apart
    (rated 1/10; named artifacts). SynArtifact DDPO succeeding looks exactly like this."""
    scores, info = make()(_images(4), ["a fox"] * 4, [{}] * 4)
    assert len(scores) == 4 and len(set(scores.tolist())) == 1
    check = info["canaries"]
    assert check["checked"] == "now" and check["passed"] and check["calls"] == 2
    assert len(check["canaries"]) == 2


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (
            lambda: vlm_reward(_raters([RATING], [])),
            "vlm judge rated the noise canary (pure noise) 7/10, as high as the real images "
            "(mean 7.0)",
        ),
        (
            lambda: synartifact_reward(_spotter([[]], []), **EMBED),
            "synartifact judge reported no artifacts for the noise canary (pure noise)",
        ),
    ],
    ids=["vlm", "synartifact"],
)
def test_a_judge_that_cannot_tell_noise_from_images_never_becomes_a_reward(make, why):
    """Moved from test_a_constant_judge_never_becomes_a_reward: the same constant judges, now
    refused by their canaries, in one line that names the canary; the same image four times
    does not excuse them any more (agreement is no longer the evidence)."""
    for images in (_images(4), _images(1) * 4):
        with pytest.raises(BrokenJudgeError) as e:
            make()(images, ["a fox"] * 4, [{}] * 4)
        message = str(e.value)
        assert message.startswith(why) and "\n" not in message, message
        assert "cannot tell control images from real ones" in message and e.value.runs == ()


def test_a_judge_that_varies_is_used_and_its_failures_counted():
    answers = [
        "not json",
        RATING,
        {"score": 3.0, "reasons": ["dark"]},
        {"score": 9.0, "reasons": ["good"]},
    ]
    chat = _raters(answers, [LOW, {"score": 2.0, "reasons": ["grey"]}])
    scores, info = vlm_reward(chat, CallPolicy(backoff_s=0))(_images(3), ["a fox"] * 3, [{}] * 3)
    assert scores.tolist() == pytest.approx([0.7, 0.3, 0.9])
    assert info["parse_failures"] == [1, 0, 0]
    assert info["canaries"]["canaries"] == {"noise": 1.0, "grey": 2.0}


def test_a_constant_validator_is_refused_across_sessions(store, sd_tool):
    """The loop's validator asked about one image at a time: once its last 8 answers, for
    different images, are one and the same, its canary pairs are asked (the image before, then
    noise, then a grey frame, as the edit); it accepts them as it accepted the real edits, so
    the session fails instead of taking the verdict, and the runs it judged before lose theirs.
    (What moved: the agreement alone was the refusal; now it only makes the watch look.)"""
    from dataclasses import replace

    from artloop.graphs.runner import run_session
    from conftest import make_ctx, verdict

    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    ctx = make_ctx(store, sd_tool, chat, max_iters=1)
    outcomes = []
    for seed in range(8):  # the sessions of a batch share the context, and so the watch
        config = ctx.diffusion_config.model_copy(update={"seed": seed})
        session = replace(ctx, diffusion_config=config)
        try:
            outcomes.append(run_session(session, prompt="a fox").status)
        except BrokenJudgeError as e:
            outcomes.append("refused")
            assert str(e).startswith(
                "validator judge gave the noise canary pair (the image before, then pure noise "
                "as the edit) the verdict 'accept', better than before: it cannot tell"
            )
    assert outcomes == ["accepted"] * 7 + ["refused"]
    assert chat.calls.count("Verdict") == 8 + 2  # the sessions', then the two canary pairs
    runs = [store.get_run(r["run_id"]) for r in store.list_runs()]
    # The seven it accepted lose their verdicts too: failed, kept, never exported.
    assert len(runs) == 8 and all(r["status"] == "failed" for r in runs)
    assert all("BrokenJudgeError" in r["error"] for r in runs)
    assert sum(bool(r["steps"]) for r in runs) == 7  # their trajectories are kept


def test_an_honest_constant_validator_is_kept_across_sessions(store, sd_tool):
    """A validator that says "revise" to every session of a batch was refused at the 8th (the
    test above, before the canaries); now the agreement makes the watch ask its canary pairs,
    it rejects both (an edit into noise or grey is worse), and every session keeps its verdict.
    The outcome is cached: later sessions cost no more canary calls."""
    from dataclasses import replace

    from artloop.graphs.runner import run_session
    from conftest import make_ctx, verdict

    worse = {**verdict("reject", 1.0), "better_than_before": False}
    chat = ScriptedChat(scripts={"Verdict": [verdict("revise", 5.0)] * 8 + [worse] * 2})
    ctx = make_ctx(store, sd_tool, chat, max_iters=1)
    for seed in range(9):
        config = ctx.diffusion_config.model_copy(update={"seed": seed})
        run_session(replace(ctx, diffusion_config=config), prompt="a fox")
    runs = [store.get_run(r["run_id"]) for r in store.list_runs()]
    assert len(runs) == 9 and all(r["status"] != "failed" for r in runs), runs
    assert chat.calls.count("Verdict") == 9 + 2  # the canaries once, at the 8th session
    check = ctx.judge_watch.last
    assert check is not None and check.broken is None and check.at_call == 8
    assert [v.verdict for v in check.answers.values()] == ["reject", "reject"]
