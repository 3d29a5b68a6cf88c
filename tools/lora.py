"""Trained LoRAs on the diffusion tool's model (`diffusion.lora`): each found (its safetensors
file), identified (sha256) and fused into the pipeline's weights at its strength.

The trainers (trainers/common.py) load LoRAs as switchable adapters, to compare several on one
pipeline; the loop draws with one or more, fused one after another (base + each LoRA's delta at
its scale: the same weights peft's `set_adapters` with those weights computes on every call),
so that every pipeline derived from the text-to-image one (img2img, the derived inpainting)
draws with them at the base model's speed, with no adapter layers left; and a LoRA trained on a
base with earlier LoRAs fused in (ArtAug's rounds, differential training) is drawn on the same
weights it was trained on.
"""

from __future__ import annotations

# Deliberately lazy: diffusers and safetensors are imported inside the functions that use them.
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers saves and loads


class LoraError(ValueError):
    """A LoRA cannot be used; the message names the file and why."""


def lora_path(lora: str | Path) -> Path:
    """A LoRA's safetensors file, given as the file or as the directory `artloop train` (or
    diffusers) saved it in: LoraError when there is none (pickles are never loaded)."""
    path = Path(lora).expanduser()
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise LoraError(f"no LoRA at {path}")
    if path.suffix != ".safetensors":
        raise LoraError(f"{path} is not a .safetensors file (pickled weights are not loaded)")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trained_weight(path: Path) -> float:
    """The adapter weight that gives the LoRA its trained strength: 1 when the file carries its
    adapter config (diffusers restores alpha from it), else alpha / rank from the
    train_summary.json beside it (an older artloop LoRA), else 1 (diffusers' alpha = rank)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        if LORA_ADAPTER_METADATA_KEY in (f.metadata() or {}):
            return 1.0
    try:
        cfg = json.loads((path.parent / "train_summary.json").read_text())["config"]
        return float(cfg["lora_alpha"]) / int(cfg["rank"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 1.0


def fuse_lora(pipe: Any, path: Path, scale: float) -> None:
    """Fuse the LoRA at `path` into `pipe`'s weights at `scale` x its trained strength; the
    adapter layers are then removed (the fused weights stay). LoraError when it does not fit."""
    peft_log = logging.getLogger("diffusers.loaders.peft")  # logs the whole error, then raises
    level = peft_log.level
    peft_log.setLevel(logging.CRITICAL)
    try:
        pipe.load_lora_weights(str(path), adapter_name="artloop", use_safetensors=True)
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as e:
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), repr(e))
        raise LoraError(f"{path} does not fit this model ({reason[:300]})") from None
    finally:
        peft_log.setLevel(level)
    if "artloop" not in {a for names in pipe.get_list_adapters().values() for a in names}:
        raise LoraError(f"{path} holds no weights for this model (a LoRA for another family?)")
    pipe.fuse_lora(adapter_names=["artloop"], lora_scale=scale * trained_weight(path))
    pipe.unload_lora_weights()
