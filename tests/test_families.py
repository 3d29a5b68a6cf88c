"""Model families (models/families.py): the tiny Qwen2.5-VL and Qwen3-VL beside the tiny Qwen2-VL,
`chat.family` and its bad values, and boxes converted between artloop's 0-1000 grid and each
family's convention (Qwen2.5-VL: absolute pixels of the resized input) on the way in and out.

The in-process agent statistics for the new families are `slow` (a few calls per agent each);
against the vLLM CPU server (`integration`) each family serves and answers schema-valid."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from agent_cases import CASES, FEW_CALLS, check_answers, image, sample_calls
from artloop import agents
from artloop.agents.base import messages_for
from artloop.agents.schemas import Critique, EditPlan, GroundedObject, ImageFacts
from artloop.config import ChatConfig, ConfigError, load_config
from artloop.models.families import FAMILIES, GRID, resolve_family
from artloop.models.scripted import ScriptedChat
from artloop.models.structured import (
    CallPolicy,
    InvalidOutput,
    StructuredOutputError,
    box_schema,
    parse_output,
)
from fakes import DEFAULTS
from PIL import Image
from pydantic import BaseModel, Field

NEW_FAMILIES = {"tiny-qwen2.5vl": "qwen2.5-vl", "tiny-qwen3vl": "qwen3-vl"}
# Calls per agent against vLLM for the new families, all agents' calls in flight at once (one
# server batch): 4 in the suite; ARTLOOP_FAMILY_CALLS=20 gives the Qwen2-VL test's statistics
# (20 a agent took 2.5 min for Qwen2.5-VL and 5.8 min for Qwen3-VL agent by agent, on 2 cores).
FAMILY_CALLS = int(os.environ.get("ARTLOOP_FAMILY_CALLS", "4"))
TINY = {"tiny-qwen2vl": "qwen2-vl", **NEW_FAMILIES}
GRID_BOX = [250, 250, 750, 750]


def policy(model: str) -> CallPolicy:
    return CallPolicy(family=resolve_family("auto", model), backoff_s=0)


# --- the box conventions ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "sent", "family_box"),
    [
        # 128 x 96 sent: the tiny Qwen2.5-VL resizes it to 140 x 84 (multiples of 28).
        ("tiny-qwen2.5vl", (128, 96), [35, 21, 105, 63]),
        # 1024 x 768 for the published Qwen2.5-VL (min/max pixels 3136 / 12845056): 1036 x 756.
        ("Qwen/Qwen2.5-VL-7B-Instruct", (1024, 768), [259, 189, 777, 567]),
        ("tiny-qwen2vl", (128, 96), GRID_BOX),
        ("tiny-qwen3vl", (128, 96), GRID_BOX),
        ("Qwen/Qwen3-VL-8B-Instruct", (1024, 768), GRID_BOX),
    ],
)
def test_a_box_round_trips_through_each_family(model, sent, family_box):
    """A known box in the family's convention comes in as the same box on the 0-1000 grid,
    and goes out (into a prompt) as the family's box again."""
    frame = policy(model).box_frame(*sent)
    raw = json.dumps({**DEFAULTS["ImageFacts"], "objects": [{"label": "fox", "box": family_box}]})
    facts = parse_output(raw, ImageFacts, frame)
    assert facts.objects[0].box == GRID_BOX
    out = facts.model_dump(mode="json", context={"box_frame": frame})
    assert out["objects"][0]["box"] == family_box
    assert facts.model_dump()["objects"][0]["box"] == GRID_BOX  # stored: the grid


def test_the_pixel_frame_is_the_processors_resize(tmp_path):
    """The frame's size is what the family's image processor makes of the image as sent (the
    tiny models' own settings: its image_grid_thw x patch size)."""
    from artloop.models.tiny import resolve_model
    from artloop.models.tiny.vlm import load_processor

    for model in TINY:
        processor = load_processor(resolve_model(model))
        family = policy(model).family
        for size in [(128, 96), (300, 40), (768, 768), (50, 50)]:
            grid = processor.image_processor(images=[Image.new("RGB", size)])["image_grid_thw"]
            _, h, w = (int(v) for v in grid[0])
            assert family.input_size(*size) == (w * family.patch_size, h * family.patch_size)


def test_a_pixel_box_outside_the_image_is_an_invalid_answer():
    """A Qwen2.5-VL answer in 0-1000 where pixels were due, past the 140 x 84 input: refused with
    a message the repair retry shows the model, never clipped into a wrong place."""
    frame = policy("tiny-qwen2.5vl").box_frame(128, 96)
    raw = json.dumps({**DEFAULTS["ImageFacts"], "objects": [{"label": "fox", "box": GRID_BOX}]})
    with pytest.raises(InvalidOutput, match=r"outside the 140x84 image"):
        parse_output(raw, ImageFacts, frame)
    # The same answer is fine from a grid family.
    assert parse_output(raw, ImageFacts, GRID).objects[0].box == GRID_BOX


def test_the_grammar_bounds_pixel_boxes_per_axis():
    frame = policy("tiny-qwen2.5vl").box_frame(128, 96)
    schema = box_schema(ImageFacts.model_json_schema(), frame)
    box = schema["$defs"]["GroundedObject"]["properties"]["box"]
    assert [c["maximum"] for c in box["prefixItems"]] == [140, 84, 140, 84]
    assert box["items"] is False and "0-1000" not in box["description"]
    assert box_schema(ImageFacts.model_json_schema(), GRID) == ImageFacts.model_json_schema()


class Recording(ScriptedChat):
    """A scripted chat that keeps the messages it was sent."""

    sent: list = []

    def _generate(self, messages, *args, **kwargs):
        self.sent.append(messages)
        return super()._generate(messages, *args, **kwargs)


def prompt_text(messages) -> str:
    return "\n".join(
        m.content if isinstance(m.content, str) else m.content[-1]["text"] for m in messages
    )


@pytest.mark.parametrize(
    ("model", "box"), [("tiny-qwen2.5vl", [14, 17, 84, 76]), ("tiny-qwen3vl", [100, 200, 600, 900])]
)
def test_boxes_go_out_in_the_familys_convention(model, box):
    """The facts' boxes given to the critic, the critique's to the planner and the plan's to the
    validator are written in pixels for Qwen2.5-VL (the 128 x 96 image: 140 x 84), on the grid
    for the others; the system message and the answer say which."""
    facts = ImageFacts(**DEFAULTS["ImageFacts"])  # box [100, 200, 600, 900]
    critique, plan = Critique(**DEFAULTS["Critique"]), EditPlan(**DEFAULTS["EditPlan"])
    chat, p = Recording(), policy(model)
    chat.sent.clear()
    calls = (
        lambda: agents.concept_cot(chat, image(0), "a fox", facts, {}, policy=p),
        lambda: agents.thesis_cot(chat, image(0), "a fox", "a fox", {}, critique, policy=p),
        lambda: agents.validate(chat, image(0), image(1), "a fox", plan, {}, {}, policy=p),
    )
    for call in calls:
        try:
            call()
        except StructuredOutputError:  # the script answers on the grid: refused in pixels
            assert model == "tiny-qwen2.5vl"
    assert len(chat.sent) >= 3
    for messages in chat.sent:
        assert json.dumps(box, separators=(",", ":")) in prompt_text(messages).replace(", ", ",")
    system = chat.sent[0][0].content
    assert ("absolute pixels" in system) == (model == "tiny-qwen2.5vl")
    assert ("140 x 84" in prompt_text(chat.sent[0])) == (model == "tiny-qwen2.5vl")


def test_worked_examples_are_written_in_the_familys_boxes():
    frame = policy("tiny-qwen2.5vl").box_frame(128, 96)
    grid_text = messages_for(
        "data_cot", "", [], CallPolicy(), GRID, prompt="a", stats={}, scores={}
    )
    pixel_text = messages_for(
        "data_cot", "", [], CallPolicy(), frame, prompt="a", stats={}, scores={}
    )
    assert "[310, 420, 720, 780]" in prompt_text(grid_text)
    assert "[43, 35, 101, 66]" in prompt_text(pixel_text)


# --- chat.family ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("tiny-qwen2vl", "qwen2-vl"),
        ("tiny-qwen2.5vl", "qwen2.5-vl"),
        ("tiny-qwen3vl", "qwen3-vl"),
        ("Qwen/Qwen2-VL-7B-Instruct", "qwen2-vl"),
        ("Qwen/Qwen2.5-VL-72B-Instruct-AWQ", "qwen2.5-vl"),
        ("Qwen/Qwen3-VL-8B-Instruct", "qwen3-vl"),
        ("my-served-name", "qwen2-vl"),  # says nothing: artloop's own grid
    ],
)
def test_auto_detects_the_family(model, family):
    assert resolve_family("auto", model).name == family


def test_auto_reads_a_local_directorys_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert resolve_family("auto", str(tmp_path)).name == "qwen2.5-vl"


def test_an_unknown_family_is_one_line():
    with pytest.raises(ConfigError, match="chat.family") as e:
        load_config(overrides={"chat.family": "qwen4-vl"})
    assert "\n" not in str(e.value) and "qwen2.5-vl" in str(e.value)
    with pytest.raises(ConfigError, match="unknown model family 'llava'"):
        resolve_family("llava", "tiny-qwen2vl")


def test_a_family_the_model_contradicts_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    for model in (str(tmp_path), "tiny-qwen2.5vl", "Qwen/Qwen2.5-VL-7B-Instruct"):
        with pytest.raises(ConfigError) as e:
            resolve_family("qwen2-vl", model)
        msg = str(e.value)
        assert "\n" not in msg and "'qwen2-vl' contradicts" in msg and "qwen2.5-vl" in msg
    assert resolve_family("qwen2.5-vl", str(tmp_path)).name == "qwen2.5-vl"


def test_the_context_refuses_a_contradicting_family(home):
    from artloop.graphs.context import build_context

    cfg = load_config(
        overrides={"home": str(home), "chat.model": "tiny-qwen3vl", "chat.family": "qwen2.5-vl"}
    )
    with pytest.raises(ConfigError, match="contradicts the model 'tiny-qwen3vl', a qwen3-vl"):
        build_context(cfg)


def test_the_families_limits():
    assert FAMILIES["qwen2.5-vl"].max_image_tokens == 16384
    assert FAMILIES["qwen3-vl"].max_image_tokens == 16384
    assert resolve_family("auto", "tiny-qwen3vl").max_image_tokens == 64
    assert not FAMILIES["qwen3-vl"].default_system and FAMILIES["qwen2.5-vl"].default_system
    assert ChatConfig().family == "auto"


# --- the tiny families in-process -------------------------------------------------------------
@pytest.fixture(scope="module", params=list(NEW_FAMILIES))
def family_chat(request):
    from artloop.models.inprocess import ChatQwen2VLLocal

    # An agent's calls made at once are gathered into one batched generate (the window). The
    # product's answer budget (chat.max_new_tokens, 1024), not the class's 512: a random model
    # fills every string to its bound, and a Critique of one-character tokens ran past 512.
    chat = ChatQwen2VLLocal(
        model=request.param, temperature=1.0, batch_window_ms=500, max_new_tokens=1024
    )
    chat.setup()
    yield chat
    chat.close()


def test_each_tiny_family_loads_its_own_class(family_chat):
    model = family_chat.setup()[0]
    expected = FAMILIES[NEW_FAMILIES[family_chat.model]].model_class
    assert type(model).__name__ == expected


@pytest.mark.slow
def test_each_tiny_family_answers_with_boxes_in_its_convention(family_chat):
    """Sampled data_cot and thesis_cot answers carry boxes, written under the grammar's bounds
    in the family's convention (for Qwen2.5-VL x <= 140, y <= 84: without them nearly every box
    fell outside the image and was refused) and converted to the grid: all valid."""
    import torch

    torch.manual_seed(0)
    p = policy(family_chat.model)
    boxes = []
    for agent in ("data_cot", "thesis_cot"):
        schema, call = CASES[agent]
        # 8 at once cost about one generate; with 3, a random model's lists were sometimes all
        # empty, and nothing was checked.
        results = sample_calls(call, family_chat, 8, policy=p)
        check_answers(schema, results, "inprocess", calls=8)
        for r in results:
            found = r.output.objects if agent == "data_cot" else r.output.regional_edits
            boxes += [x.box for x in found]
    if not boxes:  # sampled lists may all be empty; the grammar's bounds are unit-tested above
        pytest.skip("the random model gave no box in 16 sampled answers: nothing to check")
    assert all(0 <= v <= 1000 for box in boxes for v in box)


class _OneBox(BaseModel):
    """A test schema whose grammar makes the model write exactly one box."""

    objects: list[GroundedObject] = Field(min_length=1, max_length=1)


@pytest.mark.slow
def test_a_greedy_answer_boxes_in_the_familys_convention(family_chat):
    """Deterministic, end to end: the real model's greedy answer about a real image (under a
    grammar that demands one box) is written in the family's convention, and artloop reads it
    as that box on the 0-1000 grid (Qwen2.5-VL: pixels of the 140 x 84 resized input)."""
    from artloop.models.structured import bind_schema

    p = policy(family_chat.model)
    picture = image(0)  # 128 x 96
    frame = p.box_frame(*picture.size)
    messages = messages_for(
        "data_cot", "", [picture], p, frame, prompt="a fox", stats={}, scores={}
    )
    bound = bind_schema(family_chat, _OneBox, frame)
    raw, again = (bound.invoke(messages, temperature=0.0).content for _ in range(2))
    assert raw == again  # greedy: the same answer twice
    (written,) = [o["box"] for o in json.loads(raw)["objects"]]
    if frame.pixels:
        assert (frame.width, frame.height) == (140, 84)
        assert all(0 <= v <= s for v, s in zip(written, (140, 84) * 2, strict=True))
        expected = [round(v * 1000 / s) for v, s in zip(written, (140, 84) * 2, strict=True)]
    else:
        expected = written
    try:
        (read,) = [o.box for o in parse_output(raw, _OneBox, frame).objects]
    except InvalidOutput as e:  # the grammar bounds each coordinate, not x1 < x2: repaired
        assert f"box {expected} has no area" in str(e)
    else:
        assert read == expected


@pytest.mark.slow
@pytest.mark.parametrize("agent", list(CASES))
def test_agent_answers_are_schema_valid(family_chat, agent):
    import torch

    torch.manual_seed(0)
    schema, call = CASES[agent]
    p = policy(family_chat.model)
    results = sample_calls(call, family_chat, FEW_CALLS, policy=p)
    check_answers(schema, results, "inprocess", calls=FEW_CALLS)


# --- the tiny families on the vLLM CPU server -------------------------------------------------
@pytest.fixture(scope="module", params=list(NEW_FAMILIES))
def family_server(request, vllm_exe, tmp_path_factory):
    """A vLLM CPU server for one of the new tiny families (one at a time: 2 cores)."""
    from conftest import start_tiny_server

    server = start_tiny_server(vllm_exe, tmp_path_factory, request.param)
    yield server
    server.stop()


@pytest.mark.integration
def test_each_family_serves_schema_valid_answers(family_server):
    """FAMILY_CALLS sampled calls per agent, every agent's at once (the server batches them), in
    the family's box convention (pixel boxes bounded by the grammar per axis, converted to the
    grid): all schema-valid, varied, at most 1 repaired in 10."""
    from artloop.models.chat import build_chat_model

    model = family_server.cfg.model
    cfg = ChatConfig(
        backend="openai", base_url=family_server.base_url, model=model, temperature=1.0
    )
    chat, p = build_chat_model(cfg), policy(model)
    jobs = [(agent, i) for agent in CASES for i in range(FAMILY_CALLS)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: CASES[job[0]][1](chat, job[1], policy=p), jobs))
    for agent, (schema, _) in CASES.items():
        results = [a for (name, _), a in zip(jobs, answers, strict=True) if name == agent]
        check_answers(schema, results, "openai", calls=FAMILY_CALLS)
