"""Diffusion-DPO (Wallace et al. 2023; AGFSync's trainer): a LoRA policy learns to prefer the
chosen image of each pair over the rejected one, relative to the frozen base as reference.

    artloop train dpo --data EXPORT_DIR --output-dir LORA_DIR [--beta 5000] [...]

Reads `artloop export --format dpo` (Pick-a-Pic: caption, jpg_0, jpg_1, label_0). For a pair
(w, l) with the same noise and timestep, with e = ||target - prediction||^2 per example:
    loss = -log sigmoid(-beta/2 * ((e_w - e_l)_policy - (e_w - e_l)_reference))
The reference is the same UNet with the LoRA switched off, so no second copy is held.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from artloop.trainers.common import (
    DenoisingTrainConfig,
    TrainerConfigError,
    drop_captions,
    help_field,
    load_base,
    parquet_rows,
    train_lora,
)
from artloop.trainers.sft import encode_captions, encode_images, noised, sample_noise
from PIL import Image


@dataclass
class DPOConfig(DenoisingTrainConfig):
    """Train a LoRA with Diffusion-DPO on preference pairs (AGFSync)."""

    beta: float = help_field(5000.0, help="KL strength: how far the policy may move from the "
                             "reference (Diffusion-DPO used 5000 for SD1.5)")  # fmt: skip
    learning_rate: float = help_field(1e-5, help="AdamW learning rate")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise TrainerConfigError(f"DPOConfig.beta: invalid value {self.beta!r}")


def load_pairs(data: str) -> list[tuple[Image.Image, Image.Image, str]]:
    """(chosen, rejected, caption) from a Pick-a-Pic-style parquet; ties are skipped."""
    ds = parquet_rows(data, {"caption", "jpg_0", "jpg_1", "label_0"}, "DPOConfig")
    pairs = []
    for row in ds:
        if row["label_0"] == 0.5:
            continue
        a, b = (Image.open(io.BytesIO(row[k])).convert("RGB") for k in ("jpg_0", "jpg_1"))
        pairs.append((a, b, row["caption"]) if row["label_0"] > 0.5 else (b, a, row["caption"]))
    if not pairs:
        raise TrainerConfigError(f"DPOConfig.data: no preference pairs in {data}")
    return pairs


def dpo_loss(unet, scheduler, chosen, rejected, embeddings, generator, beta: float):
    """The Diffusion-DPO loss on a batch of pairs (B chosen, B rejected latents)."""
    import torch
    import torch.nn.functional as F

    noise, t = sample_noise(scheduler, chosen, generator)  # shared by both images of a pair
    latents, noise, t = torch.cat([chosen, rejected]), torch.cat([noise, noise]), torch.cat([t, t])
    noisy, target = noised(scheduler, latents, noise, t)  # (2B, 4, h, w)
    context = torch.cat([embeddings, embeddings])

    def errors() -> torch.Tensor:  # per-example squared error: (2B,)
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))

    policy = errors()
    model = getattr(unet, "module", unet)  # accelerate may wrap it
    with torch.no_grad():
        model.disable_adapters()  # the reference: the same UNet without the LoRA
        try:
            reference = errors()
        finally:
            model.enable_adapters()
    (pw, pl), (rw, rl) = policy.chunk(2), reference.chunk(2)
    return -F.logsigmoid(-0.5 * beta * ((pw - pl) - (rw - rl))).mean()


def train_dpo(cfg: DPOConfig, progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (steps, losses, timing, the LoRA file)."""
    from diffusers import DDPMScheduler

    pipe = load_base(cfg)
    pairs = load_pairs(cfg.data)
    chosen = encode_images(pipe, [w for w, _, _ in pairs], cfg.resolution)
    rejected = encode_images(pipe, [lo for _, lo, _ in pairs], cfg.resolution)
    embeddings, empty = encode_captions(pipe, [c for _, _, c in pairs])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss_at(unet, idx, g, step):
        d = unet.device
        text = drop_captions(embeddings[idx], empty, cfg.caption_dropout, g)
        return dpo_loss(unet, scheduler, chosen[idx].to(d), rejected[idx].to(d),
                        text.to(d), g, cfg.beta)  # fmt: skip

    return train_lora(cfg, pipe, len(pairs), loss_at, "dpo", progress)
