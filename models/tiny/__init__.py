"""Tiny random-weight models of the real architectures, built offline on first use and cached.

They are the embedded default when no model is configured: the real loading code
(`from_pretrained` on a directory) runs against them, so a real model id is a config change away.
The cache key is a hash of the builder's config, so changing a config builds a new model.
"""

from __future__ import annotations

# Deliberately lazy: the builders (torch, transformers, diffusers) and huggingface_hub are imported
# inside the functions that use them, so that importing this module (the CLI's --help, the config, a
# test) does not load them.
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from artloop.models.tiny.cache import cache_root

__all__ = [
    "TINY_NAMES",
    "TinyModel",
    "cache_root",
    "is_tiny",
    "paired_inpaint_model",
    "resolve_model",
    "tiny_models",
]


@dataclass(frozen=True)
class TinyModel:
    name: str
    kind: str  # "vlm" | "diffusion" | "inpaint" | "scorer"
    # "qwen2vl" | "qwen2.5vl" | "qwen3vl" | "sd" | "sdxl" | "flux" | "clip" | "aesthetic" | "hpsv2"
    # | "imagereward" | "blip2"
    family: str
    description: str
    build: Callable[[], Path]
    # Trained weights shipped in the repository (models/tiny/weights/), not built on first use.
    shipped: bool = False
    # The inpainting model that this diffusion model's regional edits run (a 9-channel UNet).
    inpaint: str | None = None

    def built(self) -> bool:
        if self.shipped:
            try:
                self.build()
            except ValueError:
                return False
            return True
        return any(cache_root().glob(f"{self.name}-*/.complete"))


def _registry() -> dict[str, TinyModel]:
    # Imported lazily: the builders import torch / transformers / diffusers.
    from artloop.models.tiny import blip, blip2, clip, diffusion, fit, shapes_sd, vlm

    return {
        "tiny-qwen2vl": TinyModel(
            "tiny-qwen2vl",
            "vlm",
            "qwen2vl",
            "Qwen2VLForConditionalGeneration, 2 layers, hidden 128, byte-level BPE tokenizer",
            vlm.build_tiny_qwen2vl,
        ),
        "tiny-qwen2.5vl": TinyModel(
            "tiny-qwen2.5vl",
            "vlm",
            "qwen2.5vl",
            "Qwen2_5_VLForConditionalGeneration, 2 layers, hidden 128, window attention",
            vlm.build_tiny_qwen25vl,
        ),
        "tiny-qwen3vl": TinyModel(
            "tiny-qwen3vl",
            "vlm",
            "qwen3vl",
            "Qwen3VLForConditionalGeneration, 2 layers, hidden 128, 16 px patches, DeepStack",
            vlm.build_tiny_qwen3vl,
        ),
        "tiny-shapes-qwen2vl": TinyModel(
            "tiny-shapes-qwen2vl",
            "vlm",
            "qwen2vl",
            "Qwen2-VL trained from scratch to be the five agents in the shapes world (shipped)",
            vlm.shipped_shapes_vlm,
            shipped=True,
        ),
        "tiny-sd": TinyModel(
            "tiny-sd",
            "diffusion",
            "sd",
            "StableDiffusionPipeline: UNet (32, 64), CLIP text 32, 4-block VAE, DDIM",
            diffusion.build_tiny_sd,
        ),
        "tiny-sd-fit": TinyModel(
            "tiny-sd-fit",
            "diffusion",
            "sd",
            "tiny-sd with its UNet fitted to smooth colour fields (built in ~1-2 min)",
            fit.build_tiny_sd_fit,
        ),
        "tiny-shapes-sd": TinyModel(
            "tiny-shapes-sd",
            "diffusion",
            "sd",
            "SD 1.5 architecture trained from scratch on the shapes world, 64 px (shipped)",
            shapes_sd.shipped,
            shipped=True,
            inpaint="tiny-shapes-sd-inpaint",
        ),
        "tiny-shapes-sd-inpaint": TinyModel(
            "tiny-shapes-sd-inpaint",
            "inpaint",
            "sd",
            "tiny-shapes-sd's inpainting UNet (9 channels, SD's inpainting recipe), 64 px (shipped)",
            shapes_sd.shipped_inpaint,
            shipped=True,
        ),
        "tiny-sdxl": TinyModel(
            "tiny-sdxl",
            "diffusion",
            "sdxl",
            "StableDiffusionXLPipeline: UNet (32, 64) text_time, 2 CLIP texts 32, 4-block VAE, Euler",
            diffusion.build_tiny_sdxl,
        ),
        "tiny-flux": TinyModel(
            "tiny-flux",
            "diffusion",
            "flux",
            "FluxPipeline: 1+1 transformer blocks, tiny T5 + CLIP, flow-match Euler",
            diffusion.build_tiny_flux,
        ),
        "tiny-clip": TinyModel(
            "tiny-clip",
            "scorer",
            "clip",
            "CLIPModel (clip, pickscore): 2+2 layers, width 32, fitted to colour captions",
            clip.build_tiny_clip,
        ),
        "tiny-aesthetic": TinyModel(
            "tiny-aesthetic",
            "scorer",
            "aesthetic",
            "LAION aesthetic v2: tiny-clip's image tower + head 32-1024-128-64-16-1, set by hand",
            clip.build_tiny_aesthetic,
        ),
        "tiny-hps": TinyModel(
            "tiny-hps",
            "scorer",
            "hpsv2",
            "HPSv2: tiny-clip's weights in open_clip's layout (safetensors) + its config",
            clip.build_tiny_hps,
        ),
        "tiny-imagereward": TinyModel(
            "tiny-imagereward",
            "scorer",
            "imagereward",
            "ImageReward: BLIP ViT 2 layers width 32 + BERT 2 layers with cross-attention + MLP head",
            blip.build_tiny_imagereward,
        ),
        "tiny-blip2": TinyModel(
            "tiny-blip2",
            "scorer",
            "blip2",
            "BLIP-2 FlanT5 (vqa's answerer): ViT, Q-Former, T5 2 layers width 32, fitted to one "
            "question",
            blip2.build_tiny_blip2,
        ),
    }


TINY_NAMES = (
    "tiny-qwen2vl",
    "tiny-qwen2.5vl",
    "tiny-qwen3vl",
    "tiny-shapes-qwen2vl",
    "tiny-sd",
    "tiny-sd-fit",
    "tiny-shapes-sd",
    "tiny-shapes-sd-inpaint",
    "tiny-sdxl",
    "tiny-flux",
    "tiny-clip",
    "tiny-aesthetic",
    "tiny-hps",
    "tiny-imagereward",
    "tiny-blip2",
)


def tiny_models() -> dict[str, TinyModel]:
    return _registry()


def is_tiny(name: str) -> bool:
    return name in TINY_NAMES


def paired_inpaint_model(name: str) -> str | None:
    """The inpainting model a tiny diffusion model's regional edits run, if it has one."""
    return tiny_models()[name].inpaint if is_tiny(name) else None


def resolve_model(name: str) -> str:
    """Map a model name to something `from_pretrained` loads offline.

    "tiny-*" -> the cached tiny model (built on first use); an existing directory -> itself;
    anything else is a hub id, which must already be in the local Hugging Face cache when
    HF_HUB_OFFLINE is set. Raises ValueError naming the model when none of these holds.
    """
    if is_tiny(name):
        return str(tiny_models()[name].build())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {name!r} is a file; expected a model directory")
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _resolve_hub_id(name)
    raise ValueError(
        f"unknown model {name!r}: not one of {', '.join(TINY_NAMES)}, not a local directory, "
        f"and not a hub id (owner/name)"
    )


def _resolve_hub_id(name: str) -> str:
    """A hub id: its cached snapshot if there is one; else, online, the id itself once the hub
    confirms the repository exists (one quick request, so that a typo fails fast)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ValueError(f"unknown model {name!r}: not in the Hugging Face cache (offline mode)")
    try:
        HfApi().model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise ValueError(
            f"unknown model {name!r}: no such repository on the Hugging Face hub"
        ) from None
    except Exception as e:
        raise ValueError(
            f"model {name!r} is not in the Hugging Face cache and the hub is unreachable "
            f"({type(e).__name__})"
        ) from None
    return name  # from_pretrained downloads it
