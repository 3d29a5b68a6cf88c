"""Prompt prefixes reused across in-process calls (models/prefill.py's PrefixCache): the same
greedy answer and logits as a full prefill, on every family's tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from artloop.models.images import image_part
from artloop.models.inprocess import ChatQwen2VLLocal
from artloop.models.prefill import PrefixCache, prefill_rows
from langchain_core.messages import HumanMessage, SystemMessage
from PIL import Image

SYSTEM = "You are an art director's assistant. Every answer is one JSON object."


def _image(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size[::-1], 3)) * 255).astype(np.uint8))


def _rows(processor):
    """An iteration's calls in the shared layout (system, then the image, then the role's
    text), a validator's BEFORE | AFTER, the same placeholders over another image, text only."""

    def text(n_images: int, words: str) -> str:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": words}]
        chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
        return processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    a, b = _image(1), _image(2)
    return [
        ("facts", text(1, "Describe the image."), [a]),
        ("critique", text(1, "Judge the image against the prompt, aspect by aspect."), [a]),
        ("validate", text(2, "BEFORE, then AFTER: which is better?"), [a, b]),
        ("other image", text(1, "Describe the image."), [b]),
        ("text only", text(0, "Rewrite the prompt: a red fox."), []),
    ]


@pytest.mark.parametrize("name", ["tiny-qwen2vl", "tiny-qwen2.5vl", "tiny-qwen3vl"])
def test_reused_prefix_decodes_like_a_full_prefill(name, tiny_chat):
    """Each row prefilled in full vs on the cache of the rows before it: the same greedy
    tokens and the same scores (float32 noise), and the prefix reused where it is shared: the
    image too for the second call, BEFORE but not AFTER for the validator's, only the system
    message where the same placeholders show another image."""
    chat = tiny_chat if name == "tiny-qwen2vl" else ChatQwen2VLLocal(model=name)
    model, processor, _, _ = chat.setup()
    vision_start = model.config.vision_start_token_id
    cache = PrefixCache()
    gen = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
    gen |= {"output_scores": True, "return_dict_in_generate": True}
    reused = {}
    for label, text, images in _rows(processor):
        with torch.inference_mode():
            full, none = prefill_rows(model, processor, [(text, images)], "cpu")
            want = model.generate(**full, **gen)
            part, [reused[label]] = prefill_rows(model, processor, [(text, images)], "cpu", cache)
            width = full["input_ids"].shape[1]
            assert part["past_key_values"].get_seq_length() == width - 1
            got = model.generate(**part, **gen)
        assert none == [0]
        assert got.sequences[0, width:].tolist() == want.sequences[0, width:].tolist(), label
        for g, w in zip(got.scores, want.scores, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        ids = full["input_ids"][0].tolist()
        starts = [i for i, t in enumerate(ids) if t == vision_start]
        if label == "critique":  # system + the image + the text both start with
            assert reused[label] > starts[0] + (ids.count(model.config.image_token_id))
        if label == "validate":  # BEFORE shared, AFTER not
            assert starts[0] < reused[label] <= starts[1]
        if label == "other image":  # same tokens, another image: only up to it
            assert reused[label] == starts[0]
    assert reused["facts"] == 0
    assert reused["text only"] > 0  # the system message


def test_chat_model_reports_reuse_and_answers_the_same(tiny_chat):
    """Two calls sharing the system message and the image: the second reports its reused
    prompt tokens (cached_tokens, in usage too) and gives the same answer, logprobs and counts
    as a model without the cache (which reports 0)."""
    image = _image(3)
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "maxLength": 12}},
        "required": ["a"],
        "additionalProperties": False,
    }

    def ask(chat, words: str):
        msgs = [
            SystemMessage(SYSTEM),
            HumanMessage([image_part(image), {"type": "text", "text": words}]),
        ]
        return chat.bind(json_schema=schema).invoke(msgs)

    cold = ChatQwen2VLLocal(model="tiny-qwen2vl", prefix_cache_entries=0, max_new_tokens=32)
    warm = ChatQwen2VLLocal(model="tiny-qwen2vl", max_new_tokens=32)
    cold._loaded = warm._loaded = tiny_chat.setup()  # one copy of the weights
    try:
        for i, words in enumerate(["Describe the image.", "List what is wrong with it."]):
            a, b = ask(cold, words), ask(warm, words)
            assert a.content == b.content
            assert a.response_metadata["cached_tokens"] == 0
            cached = b.response_metadata["cached_tokens"]
            assert (cached > 0) == (i == 1)
            assert b.usage_metadata["input_token_details"]["cache_read"] == cached
            assert b.response_metadata["token_usage"]["prompt_tokens_details"] == {
                "cached_tokens": cached
            }
            assert a.usage_metadata["input_tokens"] == b.usage_metadata["input_tokens"] > cached
            lp_a = [t["logprob"] for t in a.response_metadata["logprobs"]["content"]]
            lp_b = [t["logprob"] for t in b.response_metadata["logprobs"]["content"]]
            assert len(lp_a) == a.usage_metadata["output_tokens"]
            np.testing.assert_allclose(lp_b, lp_a, atol=1e-4)
    finally:
        cold.close()
        warm.close()


def test_prefix_cache_bounds():
    """At most max_entries rows and max_tokens tokens, least recently used dropped first; a
    row extending a kept one replaces it; a longer row than the budget is not kept."""
    cache = PrefixCache(max_entries=2, max_tokens=10)
    ids = lambda *t: torch.tensor(t)  # noqa: E731
    cache.put(ids(1, 2), (), "a")
    cache.put(ids(1, 2, 3), (), "b")  # extends a: a goes
    assert [e.cache for e in cache.entries] == ["b"]
    cache.put(ids(1, 2), (), "a")  # b extends it: b stays, a is not kept
    assert [e.cache for e in cache.entries] == ["b"]
    cache.put(ids(4, 5), (), "c")
    assert cache.match(ids(1, 2, 3, 9), [], ())[1] == 3  # b used last
    cache.put(ids(6), (), "d")  # three entries: c, the least recently used, goes
    assert [e.cache for e in cache.entries] == ["b", "d"]
    cache.put(ids(7, 7, 7, 7, 7, 7, 7), (), "e")  # 3 + 1 + 7 > 10 tokens: b goes
    assert [e.cache for e in cache.entries] == ["d", "e"]
    cache.put(ids(*range(11)), (), "f")
    assert [e.cache for e in cache.entries] == ["d", "e"]
    # An image span ([1, 4)) shared in part, or showing another image, is not reused.
    cache = PrefixCache()
    cache.put(ids(1, 9, 12, 10, 5), ("x",), "g")
    assert cache.match(ids(1, 9, 12, 10, 5, 6), [(1, 4)], ("x",))[1] == 5
    assert cache.match(ids(1, 9, 12, 10, 5, 6), [(1, 4)], ("y",))[1] == 1
    assert cache.match(ids(1, 9, 12, 12, 10), [(1, 5)], ("x",))[1] == 1


def test_choice_logprobs_reuse_the_prefix(tiny_chat):
    """Questions about one image (a VQA score's): with the image's prefix reused, the same
    choice log-probabilities as one plain forward pass over each whole prompt."""
    model, processor, _, _ = tiny_chat.setup()
    image = _image(4)
    warm = ChatQwen2VLLocal(model="tiny-qwen2vl")
    warm._loaded = tiny_chat._loaded
    try:
        for words in ["Is there a fox? Answer yes or no.", "Is it snowing? Answer yes or no."]:
            content = [image_part(image), {"type": "text", "text": words}]
            got = warm.choice_logprobs(
                [SystemMessage(SYSTEM), HumanMessage(content)], ["yes", "no"]
            )
            chat = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]},
            ]
            text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            inputs = processor(text=[text], images=[image], return_tensors="pt")
            with torch.inference_mode():
                logp = torch.log_softmax(model(**inputs).logits[0, -1].float(), dim=-1)
            tok = processor.tokenizer
            want = [float(logp[tok.encode(c, add_special_tokens=False)[0]]) for c in ("yes", "no")]
            np.testing.assert_allclose([got["yes"], got["no"]], want, atol=1e-4)
        assert len(warm._prefixes.entries) == 2
        shared = _common(*(e.ids for e in warm._prefixes.entries))
        assert shared > 10  # the second question reused the system message and the image
    finally:
        warm.close()


def _common(a, b) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def test_config_turns_reuse_off(tiny_chat):
    """chat.prefix_cache_tokens = 0: nothing kept, nothing reused."""
    from artloop.config import ChatConfig
    from artloop.models.chat import build_chat_model

    chat = build_chat_model(ChatConfig(prefix_cache_tokens=0, max_new_tokens=16))
    chat._loaded = tiny_chat._loaded
    try:
        for words in ["Describe the image.", "Describe the image again."]:
            msgs = [SystemMessage(SYSTEM), HumanMessage([image_part(_image(5)), words])]
            assert chat.invoke(msgs).response_metadata["cached_tokens"] == 0
        assert chat._prefixes.entries == []
    finally:
        chat.close()
