"""HPSv2 (Human Preference Score v2 / v2.1): an open_clip ViT-H/14 fine-tuned on human
preferences; the score is the cosine of the image and prompt embeddings (no logit scale), about
0.2-0.3 for real images. Range (0, 1).

open_clip itself is not used: it needs torchvision, and no torchvision wheel for torch 2.13.0 CPU
is installable here (PyPI's 0.28.0 is built against CUDA torch and fails to import). The
checkpoint's open_clip state dict is mapped on load onto transformers' CLIPModel, whose
architecture is the same (laion/CLIP-ViT-H-14-laion2B-s32B-b79K is the published port of that
base model; its config and processor are used). The mapping is checked against open_clip's own
forward pass (open_clip 3.3.0, in the vLLM environment that has torchvision): a tiny open_clip
ViT CLIP gives the same features through it, to 1e-7 (tests/test_hps_open_clip.py).

The published checkpoint (xswu/HPSv2, HPS_v2.1_compressed.pt) is a pickle: convert it once, on
your side, to safetensors (`safetensors.torch.save_file(torch.load(p,
map_location="cpu")["state_dict"], out)`) in a directory, and name that directory in
`scorers.models.hpsv2`. artloop loads no pickle. A
directory with its own config.json and processor files uses those instead of the base model's.
"""

from __future__ import annotations

# Deliberately lazy: torch and transformers are imported inside the loader and the scorer, so that
# importing this module (registering the scorer) loads neither.
import functools
from pathlib import Path
from typing import Any

import numpy as np
from artloop.rewards.clip import (
    LOAD_LOCK,
    _cosines,
    _identity,
    _resolve,
    _torch_dtype,
    require_safetensors,
)
from artloop.rewards.registry import reward, scorer_device
from PIL import Image

HPS_ID = "xswu/HPSv2"  # a pickle there: convert it (module docstring)
HPS_BASE_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# open_clip's names -> transformers' CLIPModel names (each resblock's fused attention is split).
_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOWERS = {"visual.transformer.resblocks.": "vision_model", "transformer.resblocks.": "text_model"}


def open_clip_to_transformers(state: dict) -> dict:
    """An open_clip CLIP state dict (ViT towers) as transformers' CLIPModel's."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "model."):
            key = key.removeprefix(prefix)
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.T.contiguous()
            continue
        if key == "attn_mask":
            continue
        for prefix, tower in _TOWERS.items():
            if key.startswith(prefix):
                index, _, rest = key[len(prefix) :].partition(".")
                base = f"{tower}.encoder.layers.{index}."
                if rest.startswith("attn.in_proj_"):
                    kind = rest.rsplit("_", 1)[1]  # weight | bias
                    for name, part in zip(("q", "k", "v"), value.chunk(3), strict=True):
                        out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
                else:
                    module, _, param = rest.rpartition(".")
                    if module not in _BLOCK:
                        raise ValueError(f"HPSv2 checkpoint: unexpected key {key!r}")
                    out[f"{base}{_BLOCK[module]}.{param}"] = value
                break
        else:
            raise ValueError(
                f"HPSv2 checkpoint: unexpected key {key!r} (not an open_clip ViT CLIP)"
            )
    return out


def _paths() -> tuple[str, str, str]:
    """(model id, weights directory, config/processor directory)."""
    model_id, path = _resolve("hpsv2", HPS_ID)
    if (Path(path) / "config.json").exists():
        return model_id, path, path
    return model_id, path, _resolve("hpsv2_base", HPS_BASE_ID)[1]


def _hps_identity() -> dict[str, Any]:
    model_id, path, _ = _paths()
    return _identity(model_id, path)


@functools.cache
def _load(path: str, base: str, device: str, dtype: str):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoProcessor, CLIPConfig, CLIPModel

    require_safetensors(path)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no HPSv2 weights (*.safetensors) in this directory")
    state: dict = {}
    for file in files:
        state.update(load_file(str(file)))
    mapped = open_clip_to_transformers(state)
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig.from_pretrained(base))
    missing = [k for k in model.state_dict() if k not in mapped and not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"{files[0]}: not an HPSv2 checkpoint for {base} (no {missing[0]})")
    model.load_state_dict(mapped, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):  # position_ids: not in the checkpoint
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            n = buf.shape[-1]
            model.get_submodule(owner).register_buffer(
                leaf, torch.arange(n).expand(buf.shape), persistent=False
            )
    model = model.to(device, _torch_dtype(dtype)).eval()
    return model, AutoProcessor.from_pretrained(base)


@reward("hpsv2", range=(0.0, 1.0), model=_hps_identity)
def hpsv2(
    images: list[Image.Image], prompts: list[str], metadata: list[dict]
) -> tuple[np.ndarray, dict[str, Any]]:
    """HPSv2: cosine(image, prompt) of the preference-tuned CLIP, per image."""
    model_id, path, base = _paths()
    device, dtype = scorer_device()
    with LOAD_LOCK:
        model, processor = _load(path, base, device, dtype)
    scores = _cosines(model, processor, images, prompts, device, dtype)
    return scores.astype(np.float32), {"model": model_id}
