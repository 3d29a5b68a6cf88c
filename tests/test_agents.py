"""Each agent, a few sampled calls on the in-process tiny random-weight Qwen2-VL: every answer
schema-valid.

A random model has nothing sensible to say; what is tested is that constrained decoding plus
validation gives a typed, in-bounds answer every time, with images really passed in. The 20-call
statistics per agent (varied answers, at most 2 repaired in 20) moved to
tests/test_vllm_integration.py::test_agent_answers_are_schema_valid, against the vLLM server.
"""

from __future__ import annotations

import pytest
from agent_cases import (
    ANSWER_SCHEMAS,
    CASES,
    FEW_CALLS,
    PROMPTS,
    check_answers,
    image,
    sample_calls,
)
from artloop import agents
from artloop.agents.base import system_text
from artloop.agents.schemas import CriticAnswer, Critique, EditPlan, ImageFacts, Verdict
from artloop.models.inprocess import ChatQwen2VLLocal
from artloop.models.structured import CallPolicy
from artloop.prompts import aesthetics_checklist, examples, template_names
from artloop.tools.image_facts import measure
from fakes import DEFAULTS, ScriptedChat


@pytest.fixture(scope="module")
def sampling_chat(tiny_chat):
    """The same weights, sampling at temperature 1 so that the answers differ; an agent's calls
    made at once are gathered into one batched generate (the batch window)."""
    chat = ChatQwen2VLLocal(model="tiny-qwen2vl", temperature=1.0, batch_window_ms=500)
    chat._loaded = tiny_chat.setup()
    return chat


@pytest.mark.parametrize("agent", list(CASES))
def test_agent_answers_are_schema_valid(sampling_chat, agent):
    import torch

    torch.manual_seed(0)  # the same sampled answers each run
    schema, call = CASES[agent]
    results = sample_calls(call, sampling_chat, FEW_CALLS)
    check_answers(schema, results, "inprocess", calls=FEW_CALLS)


@pytest.mark.slow  # ~7 s: one batched generate of three ~900-token answers
def test_the_merged_critic_answers_for_three_in_one_call(sampling_chat):
    """The merged critic's answer (facts, critique, plan: about the three critics' answers in
    length) is schema-valid in-process, within three times the model's token limit."""
    import torch

    torch.manual_seed(0)

    def call(m, i):
        return agents.critic(m, image(i), PROMPTS[i % 5], "a fox", {"seed": i}, measure(image(i)))

    results = sample_calls(call, sampling_chat, FEW_CALLS)
    check_answers(CriticAnswer, results, "inprocess", calls=FEW_CALLS)
    assert max(r.completion_tokens for r in results) > sampling_chat.max_new_tokens


def test_the_image_reaches_the_model(tiny_chat):
    """Greedy decoding, same prompt: a different image gives a different answer."""
    stats = {"brightness": 0.5}
    a, b = (agents.data_cot(tiny_chat, image(i), "a fox", stats).output for i in (1, 2))
    a2 = agents.data_cot(tiny_chat, image(1), "a fox", stats).output
    assert a == a2 and a != b


def test_concurrent_calls_share_one_generate(tiny_chat):
    """Calls from concurrent sessions run as one padded generate, each row under its own
    grammar, and give the same answers as the same calls made one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    stats = {"brightness": 0.5}
    prompts = ["a fox", "a red bicycle leaning on a wall", "sunset", "a cat in a hat, oil"]

    def call(i: int):
        return agents.data_cot(tiny_chat, image(i), prompts[i], stats).output

    alone = [call(i) for i in range(len(prompts))]
    before = tiny_chat._batch.batches
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(call, range(len(prompts))))
    assert max(tiny_chat._batch.sizes_since(before)) > 1  # some calls really shared a generate
    assert together == alone


# --- the prompts: layout, field guide, statistics, templates ----------------------------------
class Recording(ScriptedChat):
    """The scripted answers, keeping each call's messages."""

    sent: list = []

    def _generate(self, messages, stop=None, run_manager=None, **kw):
        self.sent.append(messages)
        return super()._generate(messages, stop, run_manager, **kw)


def iteration_calls(chat, img) -> dict[str, list]:
    """One iteration's agent calls on `img` (the validator's AFTER another image): their
    messages, by agent."""
    stats = measure(img)
    facts, critique = ImageFacts(**DEFAULTS["ImageFacts"]), Critique(**DEFAULTS["Critique"])
    calls = {
        "enhance": lambda: agents.enhance(chat, "a fox"),
        "data_cot": lambda: agents.data_cot(chat, img, "a fox", stats),
        "concept_cot": lambda: agents.concept_cot(chat, img, "a fox", facts, stats),
        "thesis_cot": lambda: agents.thesis_cot(chat, img, "a fox", "a fox", {}, critique),
        "validate": lambda: agents.validate(
            chat, img, image(9), "a fox", EditPlan(**DEFAULTS["EditPlan"]), stats, measure(image(9))
        ),
    }
    sent = {}
    for name, call in calls.items():
        chat.sent = []
        call()
        sent[name] = chat.sent[0]
    return sent


def test_an_iterations_calls_share_the_prefix_up_to_the_image(tiny_chat):
    """The calls that see the image are token-identical (the in-process model's chat template and
    processor) from the start up to and including the image: one common system message, then
    the image. The validator sends BEFORE there and AFTER second; the enhancer (no image)
    starts with the same system message."""
    from artloop.models.inprocess import to_qwen_messages

    _, processor, _, _ = tiny_chat.setup()
    vision_end = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    ids, texts = {}, {}
    for name, messages in iteration_calls(Recording(), image(1)).items():
        chat, images = to_qwen_messages(messages)
        texts[name] = processor.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
        row = processor(text=[texts[name]], images=images or None, return_tensors="pt")
        ids[name] = row["input_ids"][0].tolist()
    assert ids["validate"].count(vision_end) == 2  # BEFORE and AFTER, two images
    ends = {k: v.index(vision_end) + 1 for k, v in ids.items() if k != "enhance"}
    prefix = ids["data_cot"][: ends["data_cot"]]
    assert len(prefix) > 500  # the system message's shared knowledge, then the image
    for name, end in ends.items():
        assert ids[name][:end] == prefix, f"{name} diverges before the end of the image"
    assert len(set(map(tuple, ids.values()))) == len(ids)  # the instructions do differ after it
    system = texts["data_cot"].split("<|im_start|>user")[0]
    assert texts["enhance"].startswith(system)


def test_the_prompt_guides_the_fields_where_the_grammar_holds_the_schema(tiny_chat):
    """In-process (and openai) decoding is constrained: the prompt lists the fields in order
    with their descriptions, not the JSON schema; other backends get the schema itself."""
    from artloop.agents.base import answer_guide

    recorded = Recording()
    agents.data_cot(recorded, image(1), "a fox", {"brightness": 0.5})
    scripted = recorded.sent[-1][1].content[-1]["text"]
    assert '"$defs"' in scripted or '"properties"' in scripted
    guide = answer_guide(Verdict)
    assert "$defs" not in guide and '"properties"' not in guide
    fields = [line.split('"')[1] for line in guide.splitlines()[1:] if line.startswith("- ")]
    assert fields == ["reasons", "better_than_before", "score", "verdict"]  # reasons first
    assert Verdict.model_fields["reasons"].description in guide


def test_the_guide_names_a_one_value_field_exactly():
    """VQA's question writer: each pair's answer is the constant "yes" (JSON schema `const`),
    which the guide must say as such, not as free text."""
    from artloop.agents.base import answer_guide
    from artloop.agents.questions import VQAQuestions

    assert '"answer": exactly "yes".' in answer_guide(VQAQuestions)


def test_every_field_is_described_and_reasons_come_before_verdicts():
    from artloop.agents import schemas

    def walk(node, defs, where):
        node = defs.get(node.get("$ref", "#/").rsplit("/", 1)[-1], node)
        for name, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{where}.{name} has no description"
            for part in [sub, *sub.get("anyOf", []), sub.get("items", {})]:
                walk(part, defs, f"{where}.{name}")

    for cls in ANSWER_SCHEMAS:
        s = cls.model_json_schema()
        walk(s, s.get("$defs", {}), cls.__name__)
    assert list(EditPlan.model_fields)[0] == "rationale"
    assert list(Critique.model_fields)[0] == "observations"
    assert list(Critique.model_fields).index("aesthetics") < list(Critique.model_fields).index(
        "summary"
    )
    aspects = [a["id"] for a in aesthetics_checklist()]
    assert list(schemas.Aesthetics.model_fields) == aspects  # one required field per aspect
    assert schemas.Aesthetics.model_json_schema()["required"] == aspects


def test_statistics_come_with_their_scale_and_what_normal_is():
    from artloop.tools.image_facts import METRICS, STAT_GUIDE

    assert set(STAT_GUIDE) == set(METRICS)
    system = system_text()
    assert "| sharpness |" in system and "150-5000" in system
    recorded = Recording()
    stats = {"brightness": 0.91, "sharpness": 42.0, "entropy": 7.1}
    agents.data_cot(recorded, image(1), "a fox", stats)
    text = recorded.sent[-1][1].content[-1]["text"]
    assert "- brightness 0.91 (high: bright, washed out)" in text
    assert "- sharpness 42 (low: soft or blurred)" in text
    assert "- entropy 7.1 (normal)" in text


def test_the_worked_examples_are_valid_answers():
    from artloop.agents import schemas

    by_agent = {
        "enhance": schemas.EnhancedPrompt,
        "data_cot": ImageFacts,
        "concept_cot": Critique,
        "thesis_cot": EditPlan,
        "validate": Verdict,
        "rate": schemas.Rating,
        "artifacts": schemas.ArtifactAnswer,
        "critic": schemas.CriticAnswer,  # the three critics' examples, in one
    }
    assert set(examples()) == set(by_agent)
    for agent, example in examples().items():
        by_agent[agent].model_validate(example["answer"])


def test_templates_are_overridable_per_agent(tmp_path):
    """agents.templates: a file in place of prompts/<agent>.jinja (it reaches the model), under
    StrictUndefined; an unknown agent, a missing file or a syntax error is one ConfigError."""
    from artloop.config import TEMPLATES, ConfigError, load_config
    from artloop.graphs.context import RefineContext

    assert sorted(TEMPLATES) == template_names()
    mine = tmp_path / "facts.jinja"
    mine.write_text("Describe it. Prompt: {{ prompt | upper }}")
    cfg = load_config(overrides={"agents.templates": {"data_cot": str(mine)}})
    ctx = RefineContext(
        chat=Recording(), diffusion=object(), store=object(), agents_config=cfg.agents
    )
    recorded = Recording()
    agents.data_cot(recorded, image(1), "a fox", {}, policy=ctx.policy)
    assert recorded.sent[-1][1].content[-1]["text"].startswith("Describe it. Prompt: A FOX")
    assert recorded.sent[-1][0].content == system_text()  # the others are the packaged ones
    agents.concept_cot(
        recorded, image(1), "a fox", ImageFacts(**DEFAULTS["ImageFacts"]), {}, policy=ctx.policy
    )
    assert recorded.sent[-1][1].content[-1]["text"].startswith("Your task: you critique")

    typo = tmp_path / "typo.jinja"
    typo.write_text("{{ promt }}")
    with pytest.raises(ValueError, match=rf"template {typo}: 'promt' is undefined"):
        agents.data_cot(
            recorded, image(1), "a fox", {}, policy=CallPolicy(templates={"data_cot": str(typo)})
        )
    (tmp_path / "bad.jinja").write_text("{{ prompt ")
    for templates, why in [
        ({"datacot": mine}, r"unknown agent .datacot. \(one of system, enhance"),
        ({"data_cot": tmp_path / "nope.jinja"}, "data_cot: cannot read .*nope.jinja"),
        ({"data_cot": tmp_path / "bad.jinja"}, "data_cot: .*bad.jinja line 1"),
    ]:
        with pytest.raises(ConfigError, match=f"agents.templates: {why}") as err:
            load_config(overrides={"agents.templates": {k: str(v) for k, v in templates.items()}})
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("schema", ANSWER_SCHEMAS, ids=lambda s: s.__name__)
def test_the_in_process_grammar_keeps_the_schemas_field_order(tiny_chat, schema):
    """Reasons come before verdicts because the grammar emits the fields in the schema's order
    (xgrammar follows the order it reads). It read a key-sorted copy once: every in-process
    answer came out in alphabetical order (`better_than_before` first), which no trained model
    had learned."""
    import copy
    import json

    import xgrammar as xgr
    from artloop.models.structured import grammar_schema, json_schema

    answer = schema.model_validate(DEFAULTS[schema.__name__]).model_dump(mode="json")
    grammar = tiny_chat._grammar(grammar_schema(copy.deepcopy(json_schema(schema))))
    assert xgr.GrammarMatcher(grammar).accept_string(json.dumps(answer))
    alphabetical = json.dumps(answer, sort_keys=True)
    if alphabetical != json.dumps(answer):
        assert not xgr.GrammarMatcher(grammar).accept_string(alphabetical)
