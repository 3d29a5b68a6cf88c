"""Supervised / differential LoRA training (ArtAug): the base model learns to draw the loop's
accepted images from the ORIGINAL prompts, so no loop is needed at inference.

    artloop train sft --data EXPORT_DIR --output-dir LORA_DIR [--model tiny-sd] [...]

Reads `artloop export --format sft` (a parquet with `image` and `text`). VAE latents and text
embeddings are computed once and cached: only the denoiser (UNet, or FLUX's transformer) runs in
the training loop. What differs between SD 1.5, SDXL and FLUX lives in trainers/families.py.
"""

from __future__ import annotations

# Deliberately lazy: torch is imported inside the functions that use it, so that importing this
# module (the CLI's --help, the config, a test) does not load them.
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from artloop.trainers.common import (
    DenoisingTrainConfig,
    as_image,
    as_text,
    drop_captions,
    load_base,
    parquet_rows,
    read_rows,
    train_lora,
)
from artloop.trainers.families import Cond, Family, device_of, take
from PIL import Image

if TYPE_CHECKING:  # torch is imported where it runs: the CLI starts without it
    import torch


@dataclass
class SFTConfig(DenoisingTrainConfig):
    """Train a LoRA on accepted images with their original prompts (ArtAug's SFT)."""


def load_rows(data: str) -> list[tuple[Image.Image, str]]:
    """(image, text) rows of an sft export (its parquet) or of a parquet file."""
    ds = parquet_rows(data, {"image", "text"}, "SFTConfig")
    return read_rows(
        ds, lambda row: (as_image(row["image"]), as_text(row["text"])), "SFTConfig", data
    )


def diffusion_loss(
    family: Family, denoiser: Any, latents: torch.Tensor, cond: Cond, generator: torch.Generator
) -> torch.Tensor:
    """The denoising loss on one batch: noise, a random timestep, predict the family's target
    (noise, velocity, or the flow n - x0)."""
    import torch.nn.functional as F

    noise, t = family.sample_noise(latents, generator)
    noisy, target = family.noised(latents, noise, t)
    pred = family.predict(denoiser, noisy, t, cond)
    return F.mse_loss(pred.float(), target.float())


def train_sft(cfg: SFTConfig, progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (steps, losses, timing, the LoRA file)."""
    rows = load_rows(cfg.data)  # bad data fails before the model loads
    family = load_base(cfg)
    started = time.perf_counter()
    latents = family.encode_images([img for img, _ in rows], cfg.resolution)
    captions, empty = family.encode_captions([text for _, text in rows])
    encode_s = time.perf_counter() - started

    def loss_at(denoiser, idx, g, step):
        d = device_of(denoiser)
        cond = drop_captions(take(captions, idx, d), empty, cfg.caption_dropout, g)
        return diffusion_loss(family, denoiser, latents[idx].to(d), cond, g)

    extra, prompts = {"encode_s": encode_s}, [text for _, text in rows]
    return train_lora(cfg, family, len(rows), loss_at, "sft", progress, extra, prompts=prompts)
