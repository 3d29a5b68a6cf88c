"""Each agent, 20 calls on the tiny random-weight Qwen2-VL: every answer schema-valid.

A random model has nothing sensible to say; what is tested is that constrained decoding plus
validation gives a typed, in-bounds answer every time, with images really passed in.
"""

from __future__ import annotations

import numpy as np
import pytest
from artloop import agents
from artloop.agents.schemas import Critique, EditPlan, EnhancedPrompt, ImageFacts, Verdict
from artloop.models.inprocess import ChatQwen2VLLocal
from artloop.tools.image_facts import measure
from fakes import DEFAULTS
from PIL import Image

CALLS = 20
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "portrait of an old sailor",
           "a bowl of ramen, studio light", "a city street in the rain"]  # fmt: skip


@pytest.fixture(scope="module")
def sampling_chat(tiny_chat):
    """The same weights, sampling at temperature 1 so that the 20 answers differ."""
    chat = ChatQwen2VLLocal(model="tiny-qwen2vl", temperature=1.0)
    chat._loaded = tiny_chat.setup()
    return chat


def image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8))


CASES = {
    "enhance": (EnhancedPrompt, lambda m, i: agents.enhance(m, PROMPTS[i % 5],
                previous_prompt="a fox" if i % 2 else None, feedback=["too dark"] if i % 2 else None)),
    "data_cot": (ImageFacts, lambda m, i: agents.data_cot(m, image(i), PROMPTS[i % 5], measure(image(i)))),
    "concept_cot": (Critique, lambda m, i: agents.concept_cot(m, image(i), PROMPTS[i % 5],
                    ImageFacts(**DEFAULTS["ImageFacts"]), measure(image(i)))),
    "thesis_cot": (EditPlan, lambda m, i: agents.thesis_cot(m, image(i), PROMPTS[i % 5], "a fox",
                   {"seed": i, "guidance_scale": 5.0}, Critique(**DEFAULTS["Critique"]))),
    "validate": (Verdict, lambda m, i: agents.validate(m, image(i), image(i + 1), PROMPTS[i % 5],
                 EditPlan(**DEFAULTS["EditPlan"]), measure(image(i)), measure(image(i + 1)))),
}  # fmt: skip


@pytest.mark.parametrize("agent", list(CASES))
def test_agent_answers_are_schema_valid(sampling_chat, agent):
    schema, call = CASES[agent]
    outputs, failures = [], 0
    for i in range(CALLS):
        result = call(sampling_chat, i)
        assert isinstance(result.output, schema) and result.backend == "inprocess"
        schema.model_validate(result.output.model_dump())  # round-trips through validation
        outputs.append(result.output.model_dump_json())
        failures += result.failures
    assert len(set(outputs)) > CALLS // 2, "sampled answers should differ"
    assert failures <= 2, f"{failures} invalid answers in {CALLS} calls despite the grammar"


def test_the_image_reaches_the_model(tiny_chat):
    """Greedy decoding, same prompt: a different image gives a different answer."""
    stats = {"brightness": 0.5}
    a, b = (agents.data_cot(tiny_chat, image(i), "a fox", stats).output for i in (1, 2))
    a2 = agents.data_cot(tiny_chat, image(1), "a fox", stats).output
    assert a == a2 and a != b
