"""Row-by-row prefill + batched decode (models/prefill.py) against plain `generate`."""

from __future__ import annotations

import numpy as np
import torch
from artloop.models.prefill import GrowingLayer, prefill_rows
from PIL import Image
from transformers.cache_utils import DynamicLayer


def test_growing_layer_matches_dynamic_layer():
    """Same keys and values as DynamicLayer through a prefill, decode steps past several
    reallocations, a crop and more steps."""
    torch.manual_seed(0)
    grow, plain = GrowingLayer(), DynamicLayer()

    def step(t: int) -> None:
        k, v = torch.randn(3, 2, t, 8), torch.randn(3, 2, t, 8)  # (B, kvh, T, hd)
        got, want = grow.update(k, v), plain.update(k, v)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert grow.get_seq_length() == plain.get_seq_length()

    step(40)
    for _ in range(150):  # room 40+64, then grows by a quarter: several reallocations
        step(1)
    grow.crop(-7)
    plain.crop(-7)
    for _ in range(20):
        step(1)
    assert grow.get_seq_length() == 40 + 150 - 7 + 20


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size[::-1], 3)) * 255).astype(np.uint8))


def test_row_prefill_decodes_like_plain_generate(tiny_chat):
    """Rows of different lengths, images of different sizes and a text-only row: the batch
    continues from the per-row caches exactly as each row's own plain `generate` does
    (M-RoPE offsets included: a wrong one changes the greedy tokens)."""
    model, processor, _, _ = tiny_chat.setup()

    def text(prompt: str, with_image: bool) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        chat = [
            {"role": "system", "content": "You judge images."},
            {"role": "user", "content": content},
        ]
        return processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    rows = [
        (text("describe it", True), [_image(1, (128, 96))]),
        (text("no image here, only a much longer question " * 4, False), []),
        (text("what is wrong with it?", True), [_image(2, (64, 200))]),
    ]
    gen = {"max_new_tokens": 16, "do_sample": False, "min_new_tokens": 16}
    with torch.inference_mode():
        alone = [
            model.generate(**processor(text=[t], images=im or None, return_tensors="pt"), **gen)
            for t, im in rows
        ]
        inputs, _ = prefill_rows(model, processor, rows, "cpu")
        width = inputs["input_ids"].shape[1]
        assert inputs["past_key_values"].get_seq_length() == width - 1
        batched = model.generate(**inputs, **gen)
    for row, plain in zip(batched, alone, strict=True):
        assert row[width:].tolist() == plain[0, -16:].tolist()
