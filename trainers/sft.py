"""Supervised / differential LoRA training (ArtAug): the base model learns to draw the loop's
accepted images from the ORIGINAL prompts, so no loop is needed at inference.

    artloop train sft --data EXPORT_DIR --output-dir LORA_DIR [--model tiny-sd] [...]

Reads `artloop export --format sft` (a parquet with `image` and `text`). VAE latents and text
embeddings are computed once and cached: only the UNet runs in the training loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from artloop.trainers.common import (
    DenoisingTrainConfig,
    drop_captions,
    load_base,
    parquet_rows,
    train_lora,
)
from PIL import Image

if TYPE_CHECKING:  # torch is imported where it runs: the CLI starts without it
    import torch


@dataclass
class SFTConfig(DenoisingTrainConfig):
    """Train a LoRA on accepted images with their original prompts (ArtAug's SFT)."""


def load_rows(data: str) -> list[tuple[Image.Image, str]]:
    """(image, text) rows of an sft export (its parquet) or of a parquet file."""
    ds = parquet_rows(data, {"image", "text"}, "SFTConfig")
    return [(row["image"].convert("RGB"), row["text"]) for row in ds]


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to `size`, centre-crop, scale to [-1, 1]: (3, size, size)."""
    import torch

    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


def encode_images(pipe: Any, images: list[Image.Image], size: int) -> torch.Tensor:
    """VAE latents, once: (N, 4, size/8, size/8)."""
    import torch

    with torch.no_grad():
        pixels = torch.stack([to_pixels(img, size) for img in images])
        pixels = pixels.to(pipe.vae.device, pipe.vae.dtype)
        return (pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor).float()


def encode_texts(pipe: Any, texts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states, once: (N, 77, D)."""
    import torch

    with torch.no_grad():
        ids = pipe.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt")  # fmt: skip
        return pipe.text_encoder(ids.input_ids.to(pipe.text_encoder.device))[0].float()


def sample_noise(scheduler, latents: torch.Tensor, generator: torch.Generator):
    """Gaussian noise like `latents` and a random training timestep per example."""
    import torch

    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                      generator=generator).to(latents.device)  # fmt: skip
    return noise, t


def noised(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """(noisy latents, what the UNet should predict: the noise, or the velocity)."""
    v = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, t) if v else noise
    return scheduler.add_noise(latents, noise, t), target


def encode_captions(pipe: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The captions' embeddings (N, 77, D) and the empty prompt's (1, 77, D), caption dropout's
    stand-in, in one encoder pass."""
    embeddings = encode_texts(pipe, [*texts, ""])
    return embeddings[:-1], embeddings[-1:]


def diffusion_loss(unet, scheduler, latents: torch.Tensor, embeddings: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """The denoising loss on one batch: noise, a random timestep, predict noise (or velocity)."""
    import torch.nn.functional as F

    noise, t = sample_noise(scheduler, latents, generator)
    noisy, target = noised(scheduler, latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=embeddings).sample
    return F.mse_loss(pred.float(), target.float())


def train_sft(cfg: SFTConfig, progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (steps, losses, timing, the LoRA file)."""
    from diffusers import DDPMScheduler

    pipe = load_base(cfg)
    rows = load_rows(cfg.data)
    started = time.perf_counter()
    latents = encode_images(pipe, [img for img, _ in rows], cfg.resolution)
    embeddings, empty = encode_captions(pipe, [text for _, text in rows])
    encode_s = time.perf_counter() - started
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss_at(unet, idx, g, step):
        text = drop_captions(embeddings[idx], empty, cfg.caption_dropout, g)
        return diffusion_loss(unet, scheduler, latents[idx].to(unet.device),
                              text.to(unet.device), g)  # fmt: skip

    return train_lora(cfg, pipe, len(rows), loss_at, "sft", progress, {"encode_s": encode_s})
