"""BLIP-2 as the VQA score's answerer, as AGFSync ran it: `Salesforce/blip2-flan-t5-xxl` asked
"Question: {q} Choices:['yes','no'] Answer:" per image (its released dpo_dataset/blip2_vqa.py).
Where AGFSync read the generated answer, artloop reads the first decoder step's distribution:
P(yes) / (P(yes) + P(no)), so a score is a probability, as the chat answerers' are.

Chosen by naming a BLIP-2 model as the vqa scorer's weights (`scorers.models.vqa`): a hub id
with "blip2" in it, a local directory whose config.json says `model_type = "blip-2"`, or
`tiny-blip2`. The questions are still written by the `chat` section's model. Only the FlanT5
variants are supported (an encoder-decoder's first answer token needs no padding care); the OPT
ones are a one-line error."""

from __future__ import annotations

# Deliberately lazy: torch and transformers are imported inside the loader and the scorer, so that
# importing this module (registering the vqa scorer) loads neither.
import functools
import json
from pathlib import Path
from typing import Any

from artloop.models.tiny import is_tiny, resolve_model, tiny_models
from artloop.models.tiny.blip2 import VQA_PROMPT
from artloop.rewards.clip import LOAD_LOCK, _identity, _torch_dtype, require_safetensors
from artloop.rewards.registry import scorer_device, scorers_config

BLIP2_ID = "Salesforce/blip2-flan-t5-xxl"  # AGFSync's; blip2-flan-t5-xl is the smaller one
YES_WORDS, NO_WORDS = ("yes", "Yes"), ("no", "No")


def is_blip2(name: str) -> bool:
    """Whether `name` names a BLIP-2 model (see the module docstring)."""
    if is_tiny(name):
        return tiny_models()[name].family == "blip2"
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type") == "blip-2"
    return "blip2" in name.lower().replace("-", "").replace("_", "")


def _answer_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The first token of each spelling of yes and of no, less any first token they share (a
    bare word-start piece says neither)."""

    def first(words: tuple[str, ...]) -> set[int]:
        return {tokenizer(w, add_special_tokens=False).input_ids[0] for w in words}

    yes, no = first(YES_WORDS), first(NO_WORDS)
    if not yes - no or not no - yes:
        raise ValueError("BLIP-2 tokenizer: 'yes' and 'no' start with the same token")
    return sorted(yes - no), sorted(no - yes)


@functools.cache
def _load(path: str, device: str, dtype: str) -> tuple[Any, Any, list[int], list[int]]:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    require_safetensors(path)
    model = Blip2ForConditionalGeneration.from_pretrained(
        path, use_safetensors=True, dtype=_torch_dtype(dtype)
    )
    if model.config.use_decoder_only_language_model:
        raise ValueError(
            f"{path}: a BLIP-2 with a decoder-only language model (OPT); the vqa scorer takes "
            f"the FlanT5 variants (e.g. {BLIP2_ID})"
        )
    processor = Blip2Processor.from_pretrained(path)
    return model.to(device).eval(), processor, *_answer_ids(processor.tokenizer)


def blip2_identity(name: str) -> dict[str, Any]:
    return _identity(name, resolve_model(name))


def blip2_p_yes(name: str, images: list, questions: list[str]) -> list[float]:
    """P(yes) for each (image, question) pair, `scorers.batch_size` pairs per forward pass."""
    import torch

    device, dtype = scorer_device()
    with LOAD_LOCK:
        model, processor, yes, no = _load(resolve_model(name), device, dtype)
    start = model.config.text_config.decoder_start_token_id
    size = scorers_config().batch_size
    out: list[float] = []
    for i in range(0, len(images), size):
        batch = processor(
            images=images[i : i + size],
            text=[VQA_PROMPT.format(question=q) for q in questions[i : i + size]],
            return_tensors="pt",
            padding=True,
        ).to(device)
        batch["pixel_values"] = batch["pixel_values"].to(_torch_dtype(dtype))
        first = torch.full((len(batch["input_ids"]), 1), start, dtype=torch.long, device=device)
        with torch.no_grad():
            probs = model(**batch, decoder_input_ids=first).logits[:, 0].float().softmax(-1)
        p_yes, p_no = probs[:, yes].sum(-1), probs[:, no].sum(-1)
        out += (p_yes / (p_yes + p_no)).tolist()
    return out
