"""Each agent, a few sampled calls on the in-process tiny random-weight Qwen2-VL: every answer
schema-valid.

A random model has nothing sensible to say; what is tested is that constrained decoding plus
validation gives a typed, in-bounds answer every time, with images really passed in. The 20-call
statistics per agent (varied answers, at most 2 repaired in 20) moved to
tests/test_vllm_integration.py::test_agent_answers_are_schema_valid, against the vLLM server.
"""

from __future__ import annotations

import pytest
from agent_cases import CASES, FEW_CALLS, check_answers, image
from artloop import agents
from artloop.models.inprocess import ChatQwen2VLLocal


@pytest.fixture(scope="module")
def sampling_chat(tiny_chat):
    """The same weights, sampling at temperature 1 so that the answers differ."""
    chat = ChatQwen2VLLocal(model="tiny-qwen2vl", temperature=1.0)
    chat._loaded = tiny_chat.setup()
    return chat


@pytest.mark.parametrize("agent", list(CASES))
def test_agent_answers_are_schema_valid(sampling_chat, agent):
    import torch

    torch.manual_seed(0)  # the same sampled answers each run
    schema, call = CASES[agent]
    results = [call(sampling_chat, i) for i in range(FEW_CALLS)]
    check_answers(schema, results, "inprocess", calls=FEW_CALLS)


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
