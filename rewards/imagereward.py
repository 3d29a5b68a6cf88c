"""ImageReward (arXiv 2304.05977, THUDM/ImageReward): a human-preference reward for text-to-image,
BLIP's ViT-L and a BERT text encoder cross-attending to the image, an MLP on the [CLS] state;
score = (raw - mean) / std with ImageReward's published constants. Higher is better; unbounded
(about N(0, 1) over its training images), so no range is declared.

Weights load from safetensors only. The published checkpoint (`ImageReward.pt` in the hub repo
THUDM/ImageReward) is a pickle; artloop never loads it. Convert it once, on your side, into
the repo's directory (or any directory holding `med_config.json`):

    python -c "import torch, safetensors.torch as st; sd = torch.load('ImageReward.pt',
      map_location='cpu'); st.save_file({k: v.contiguous() for k, v in sd.items()},
      'ImageReward.safetensors')"

The loader then maps its keys (blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*) onto
transformers' BLIP classes (models/tiny/blip.py). A directory in artloop's own layout
(config.json + model.safetensors, as tiny-imagereward is saved) loads as it is. The tokenizer
is the directory's if it has one, else bert-base-uncased from the local HF cache with BLIP's
[DEC] and [ENC] tokens added, as ImageReward's `init_tokenizer` does."""

from __future__ import annotations

# Deliberately lazy: torch, transformers and safetensors are imported inside the functions that
# use them, so that importing this module (the registry, the CLI's --help) does not load them.
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from artloop.models.tiny import resolve_model
from artloop.models.tiny.blip import WEIGHTS, blip_config, imagereward_model
from artloop.rewards.registry import RewardFn, reward, scorer_device, scorer_model, scorers_config
from PIL import Image

DEFAULT_ID = "THUDM/ImageReward"
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's published constants
MAX_LENGTH = 35  # its tokenizer call: padding="max_length", truncation=True, max_length=35
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """ImageReward's `_transform(size)`: the shorter side resized to `size` (bicubic, the longer
    truncated as torchvision's Resize does), a centre crop, RGB, /255, CLIP's mean and std.
    Returns (3, size, size) float32."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = np.asarray(image, dtype=np.float32) / 255.0  # (S, S, 3)
    x = (x - np.array(PIXEL_MEAN, dtype=np.float32)) / np.array(PIXEL_STD, dtype=np.float32)
    return x.transpose(2, 0, 1)


_VIT = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (
        r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.",
        r"vision_model.encoder.layers.\1.self_attn.qkv.",
    ),
    (
        r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.",
        r"vision_model.encoder.layers.\1.self_attn.projection.",
    ),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^text_encoder\.", "text_encoder."),
]


def convert_keys(state: dict[str, Any]) -> dict[str, Any]:
    """ImageReward's state-dict keys (blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*)
    -> this module's; the rest (projections, ITM head, position_ids buffers) dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("mlp.layers."):
            out[key] = value
            continue
        if not key.startswith("blip.") or key.endswith("position_ids"):
            continue
        inner = key[len("blip.") :]
        for pattern, repl in _VIT:
            new, n = re.subn(pattern, repl, inner)
            if n:
                out[new] = value
                break
    return out


def _safetensors_files(path: Path) -> list[Path]:
    found = sorted(path.glob("*.safetensors"))
    if not found:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLES)
        if pickles:
            raise ValueError(
                f"ImageReward at {path}: only {pickles[0]} (a pickle) found; safetensors is "
                "required (convert it once: see artloop.rewards.imagereward's docstring)"
            )
        raise ValueError(f"ImageReward at {path}: no .safetensors weights found")
    return found


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    if (path / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(resolve_model("google-bert/bert-base-uncased"))
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


@functools.cache
def load_imagereward(path: str, device: str, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer) from a resolved directory, once per (path, device, dtype)."""
    import torch
    from safetensors.torch import load_file

    root = Path(path)
    files = _safetensors_files(root)
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    if any(k.startswith("blip.") for k in state):  # the published checkpoint, converted
        state = convert_keys(state)
    if (root / "config.json").exists():
        from transformers import BlipConfig

        config = BlipConfig.from_pretrained(str(root))
    else:
        med = root / "med_config.json"
        text = json.loads(med.read_text()) if med.exists() else {}
        keep = {k: text[k] for k in ("vocab_size", "hidden_size") if k in text}
        if "encoder_width" in text:
            keep["encoder_hidden_size"] = text["encoder_width"]
        config = blip_config(text=keep)
    model = imagereward_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = missing[:3] if missing else unexpected[:3]
        raise ValueError(
            f"ImageReward at {path}: weights do not fit the architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {what})"
        )
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    model.mlp.float()  # the head runs in float32 on the [CLS] state, as ImageReward's does
    return model, _tokenizer(root)


def imagereward_scores(
    path: str, images: list[Image.Image], prompts: list[str], device: str, dtype: str, batch: int
) -> np.ndarray:
    """(raw - MEAN) / STD for each (image, prompt)."""
    import torch

    model, tok = load_imagereward(path, device, dtype)
    size = model.config.vision_config.image_size
    out = []
    for i in range(0, len(images), batch):
        ims, ps = images[i : i + batch], prompts[i : i + batch]
        pixels = torch.from_numpy(np.stack([preprocess(im, size) for im in ims]))
        text = tok(
            ps, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        with torch.inference_mode():
            raw = model(
                pixels.to(device=device, dtype=getattr(torch, dtype)),
                text.input_ids.to(device),
                text.attention_mask.to(device),
            )
        out.append(((raw.float() - MEAN) / STD).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@functools.cache
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    for f in _safetensors_files(Path(path)):
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def imagereward_identity() -> dict[str, Any]:
    model_id = scorer_model("imagereward", DEFAULT_ID)
    path = resolve_model(model_id)
    local = Path(model_id).expanduser().exists() or model_id.startswith("tiny-")
    revision = "local" if local else (Path(path).name if "snapshots" in path else "local")
    return {"id": model_id, "revision": revision, "sha256": _sha256(path)}


def imagereward_reward() -> RewardFn:
    """ImageReward of each image against its prompt; info["model"] names the weights."""

    def fn(images, prompts, metadata):
        model_id = scorer_model("imagereward", DEFAULT_ID)
        device, dtype = scorer_device()
        path = resolve_model(model_id)
        scores = imagereward_scores(
            path, list(images), list(prompts), device, dtype, scorers_config().batch_size
        )
        return scores, {"model": model_id, "mean": MEAN, "std": STD}

    return fn


reward("imagereward", model=imagereward_identity)(imagereward_reward())

__all__ = ["WEIGHTS", "convert_keys", "load_imagereward", "preprocess"]
