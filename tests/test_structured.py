"""Structured output: parsing, validation, repair with the error shown to the model, counting,
and a visible failure after the last attempt. Boxes are clipped and ordered on the way in."""

from __future__ import annotations

import pytest
from agent_cases import ANSWER_SCHEMAS
from artloop.agents import schemas
from artloop.agents.schemas import Critique, EditPlan, RegionalEdit, Verdict, normalise_box
from artloop.models.structured import (
    CallPolicy,
    ChatServerError,
    InvalidOutput,
    StructuredOutputError,
    grammar_schema,
    invoke_structured,
    parse_output,
    schema_instructions,
)
from fakes import DEFAULTS, ScriptedChat
from langchain_core.messages import HumanMessage
from pydantic import ValidationError

GOOD = DEFAULTS["Verdict"]


def ask_verdict(chat, attempts=3):
    msgs = [HumanMessage(content="judge\n" + schema_instructions(Verdict))]
    policy = CallPolicy(attempts=attempts, transport_retries=2, backoff_s=0.0)
    return invoke_structured(chat, msgs, Verdict, agent="validate", policy=policy)


def test_valid_first_time():
    result = ask_verdict(ScriptedChat(scripts={"Verdict": [GOOD]}))
    assert result.output == Verdict(**GOOD) and result.failures == 0
    assert result.backend == "ScriptedChat"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "{not json",
        '{"verdict": "maybe"}',
        "[]",
        '{"verdict":"accept","score":11,"better_than_before":true,"reasons":["x"]}',
        '{"verdict":"accept","score":5,"better_than_before":true,"reasons":[]}',
    ],
)
def test_invalid_then_repaired(bad):
    chat = ScriptedChat(scripts={"Verdict": [bad, GOOD]})
    result = ask_verdict(chat)
    assert result.output.score == GOOD["score"] and result.failures == 1
    assert len(chat.calls) == 2


def test_repair_shows_the_model_its_error():
    seen = []

    class Recording(ScriptedChat):
        def _generate(self, messages, **kw):
            seen.append(messages)
            return super()._generate(messages, **kw)

    ask_verdict(Recording(scripts={"Verdict": ['{"verdict":"accept"}', GOOD]}))
    retry = seen[1]
    assert retry[-2].content == '{"verdict":"accept"}'
    assert "score: Field required" in retry[-1].content


def test_gives_up_visibly_after_the_last_attempt():
    chat = ScriptedChat(scripts={"Verdict": ["nope"]})
    with pytest.raises(
        StructuredOutputError,
        match=r"validate: no valid Verdict from the "
        r"ScriptedChat backend after 2 attempts; last error: invalid Verdict",
    ):
        ask_verdict(chat, attempts=2)
    assert len(chat.calls) == 2


def test_transient_errors_are_retried():
    chat = ScriptedChat(
        scripts={"Verdict": [ConnectionError("refused"), TimeoutError("slow"), GOOD]}
    )
    result = ask_verdict(chat)
    assert result.output.score == GOOD["score"] and result.failures == 0 and len(chat.calls) == 3


def test_a_dead_server_fails_naming_it_and_the_cause():
    chat = ScriptedChat(scripts={"Verdict": [ConnectionError("connection refused")]})
    with pytest.raises(
        ChatServerError,
        match=r"chat server ScriptedChat failed 3 times; "
        r"last error: ConnectionError: connection refused",
    ):
        ask_verdict(chat)
    assert len(chat.calls) == 3


def test_other_errors_are_not_retried():
    chat = ScriptedChat(scripts={"Verdict": [KeyError("bug")]})
    with pytest.raises(KeyError):
        ask_verdict(chat)
    assert len(chat.calls) == 1


def test_markdown_fenced_json_is_accepted():
    fenced = (
        '```json\n{"verdict":"revise","score":3,"better_than_before":false,"reasons":["dark"]}\n```'
    )
    assert parse_output(fenced, Verdict).score == 3


def test_invalid_output_names_the_field():
    with pytest.raises(
        InvalidOutput, match=r"invalid Verdict: score: Input should be less than or equal to 10"
    ):
        parse_output(
            '{"verdict":"accept","score":12,"better_than_before":true,"reasons":["x"]}', Verdict
        )


def test_grammar_sees_numbers_as_their_grid():
    grammar = grammar_schema(Verdict.model_json_schema())
    score = grammar["properties"]["score"]
    assert (
        "type" not in score and score["enum"][:3] == [0.0, 0.1, 0.2] and len(score["enum"]) == 101
    )
    assert all(Verdict(**{**GOOD, "score": v}).score == v for v in score["enum"])
    plan = grammar_schema(EditPlan.model_json_schema())["$defs"]
    assert plan["RegionalEdit"]["properties"]["strength"]["enum"][0] == 0.1
    assert plan["ParamChanges"]["properties"]["guidance_scale"]["anyOf"][1] == {"type": "null"}


def test_every_string_list_and_number_is_bounded():
    def walk(schema, defs, path):
        if "$ref" in schema:
            return walk(defs[schema["$ref"].split("/")[-1]], defs, path)
        for option in schema.get("anyOf", []):
            walk(option, defs, path)
        if schema.get("type") == "string" and "enum" not in schema and "const" not in schema:
            assert "maxLength" in schema, path
        if schema.get("type") == "number":  # digits bounded too: a grid between two bounds
            assert {"multipleOf", "minimum", "maximum"} <= schema.keys(), path
        if schema.get("type") == "array":
            assert "maxItems" in schema, path
            walk(schema["items"], defs, path + "[]")
        for name, sub in schema.get("properties", {}).items():
            walk(sub, defs, f"{path}.{name}")

    for cls in ANSWER_SCHEMAS:
        s = cls.model_json_schema()
        walk(s, s.get("$defs", {}), cls.__name__)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([10, 20, 300, 400], [10, 20, 300, 400]),
        ([300, 400, 10, 20], [10, 20, 300, 400]),  # inverted corners are ordered
        ([-50, 20, 1500, 400.4], [0, 20, 1000, 400]),  # out of range is clipped
        ((1, 2, 3, 4), [1, 2, 3, 4]),
    ],
)
def test_boxes_are_clipped_and_ordered(raw, expected):
    assert normalise_box(raw) == expected
    assert RegionalEdit(box=raw, prompt="x", strength=0.5).box == expected


@pytest.mark.parametrize(
    "raw", [[1, 2, 3], [5, 5, 5, 100], [1200, 0, 1500, 10], ["a", 1, 2, 3], "box"]
)
def test_bad_boxes_are_rejected(raw):
    with pytest.raises(ValidationError, match="box"):
        RegionalEdit(box=raw, prompt="x", strength=0.5)


def test_taxonomy_and_checklist_are_enforced():
    crit = dict(DEFAULTS["Critique"])
    Critique(**crit)
    with pytest.raises(ValidationError):
        Critique(**{**crit, "artifacts": [{**crit["artifacts"][0], "kind": "ugly"}]})
    rated = crit["aesthetics"]
    with pytest.raises(ValidationError, match="vibes"):  # an aspect not on the checklist
        Critique(**{**crit, "aesthetics": {**rated, "vibes": {"note": "", "rating": 5}}})
    with pytest.raises(ValidationError, match="aesthetics.detail"):  # one left out
        Critique(**{**crit, "aesthetics": {k: v for k, v in rated.items() if k != "detail"}})
    with pytest.raises(ValidationError, match="artifacts"):
        schemas.ArtifactAnswer(notes="", artifacts=["ugly"])
    found = schemas.ArtifactAnswer(notes="", artifacts=["blur", "omission", "blur"])
    assert found.artifacts == ["blur", "omission"]  # a repeat says nothing more: dropped
