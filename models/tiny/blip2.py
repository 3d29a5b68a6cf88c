"""BLIP-2 with a FlanT5 language model (arXiv 2301.12597), the VQA answerer AGFSync ran
(`Salesforce/blip2-flan-t5-xxl` in its released dpo_dataset/blip2_vqa.py), and its tiny twin
`tiny-blip2`: the same classes (Blip2ForConditionalGeneration: a BLIP ViT, the Q-Former's query
tokens, a T5 encoder-decoder; Blip2Processor), built offline and fitted for a few seconds to one
question, "Is the picture red?", so that a test can see the score follow the picture."""

from __future__ import annotations

# Deliberately lazy: torch and transformers are imported inside the functions that use them, so
# that importing this module (the tiny registry, the CLI's --help) does not load them.
from pathlib import Path
from typing import Any

from artloop.models.tiny.cache import build_cached

# AGFSync's question format (dpo_dataset/blip2_vqa.py), the one the answerer is asked in.
VQA_PROMPT = "Question: {question} Choices:['yes','no'] Answer:"
FIT_QUESTION = "Is the picture red?"
COLOURS = {"red": (200, 30, 30), "green": (30, 170, 40), "blue": (30, 50, 200)}

CONFIG = {
    "seed": 0,
    "version": 1,
    "image_size": 32,
    "patch_size": 8,
    "width": 32,  # the ViT's, the Q-Former's and T5's d_model alike
    "layers": 2,
    "heads": 2,
    "intermediate": 64,
    "query_tokens": 4,
    "vocab_size": 200,
    "fit_steps": 300,
    "fit_batch": 16,
}


def build_tiny_blip2() -> Path:
    return build_cached("tiny-blip2", CONFIG, _build)


def colour_picture(colour: str, rng: Any, size: int = 32) -> Any:
    """A flat `colour` picture with pixel noise (sd 20): what the twin was fitted on."""
    import numpy as np
    from PIL import Image

    pixels = np.array(COLOURS[colour])[None, None, :] + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"))


def _build(config: dict, out: Path) -> None:
    import torch
    from artloop.models.tiny.diffusion import t5_tokenizer
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessorPil,
    )

    words = [VQA_PROMPT.format(question=FIT_QUESTION) + " yes no", *COLOURS]
    tokenizer = t5_tokenizer(config["vocab_size"], 64, words * 8)
    size = {"height": config["image_size"], "width": config["image_size"]}
    processor = Blip2Processor(
        BlipImageProcessorPil(size=size), tokenizer, num_query_tokens=config["query_tokens"]
    )
    tok = processor.tokenizer  # now with BLIP-2's <image> token
    width, layers, heads, inter = (config[k] for k in ("width", "layers", "heads", "intermediate"))
    cfg = Blip2Config(
        vision_config={
            "hidden_size": width,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "image_size": config["image_size"],
            "patch_size": config["patch_size"],
        },
        qformer_config={
            "hidden_size": width,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": inter,
            "encoder_hidden_size": width,
        },
        text_config={  # FlanT5's shape: gated GELU, untied head
            "model_type": "t5",
            "d_model": width,
            "d_ff": inter,
            "d_kv": width // heads,
            "num_layers": layers,
            "num_decoder_layers": layers,
            "num_heads": heads,
            "vocab_size": len(tok),
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False,
            "decoder_start_token_id": tok.pad_token_id,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        num_query_tokens=config["query_tokens"],
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(config["seed"])
    model = Blip2ForConditionalGeneration(cfg)
    _fit(model, processor, config)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def _fit(model: Any, processor: Any, config: dict) -> None:
    """Teach the twin one question: "yes" for red pictures, "no" for green and blue ones."""
    import numpy as np
    import torch

    tok = processor.tokenizer
    yes, no = (tok(w, add_special_tokens=False).input_ids[0] for w in ("yes", "no"))
    rng = np.random.default_rng(config["seed"])
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prompt = VQA_PROMPT.format(question=FIT_QUESTION)
    n = config["fit_batch"]
    model.train()
    for _ in range(config["fit_steps"]):
        colours = rng.choice(["red", "red", "green", "blue"], n)  # half of them red
        batch = processor(
            images=[colour_picture(c, rng, config["image_size"]) for c in colours],
            text=[prompt] * n,
            return_tensors="pt",
            padding=True,
        )
        labels = torch.tensor([[yes if c == "red" else no, tok.eos_token_id] for c in colours])
        loss = model(**batch, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
