"""Diffusion-DPO (Wallace et al. 2023; AGFSync's trainer): a LoRA policy learns to prefer the
chosen image of each pair over the rejected one, relative to the frozen base as reference.

    artloop train dpo --data EXPORT_DIR --output-dir LORA_DIR [--beta 5000] [...]

Reads `artloop export --format dpo` (Pick-a-Pic: caption, jpg_0, jpg_1, label_0). For a pair
(w, l) with the same noise and timestep, with e = ||target - prediction||^2 per example:
    loss = -log sigmoid(-beta/2 * ((e_w - e_l)_policy - (e_w - e_l)_reference))
The reference is the same denoiser with the LoRA switched off, so no second copy is held.
"""

from __future__ import annotations

# Deliberately lazy: torch is imported inside the functions that use it, so that importing this
# module (the CLI's --help, the config, a test) does not load them.
from dataclasses import dataclass
from typing import Any

from artloop.trainers.common import (
    DenoisingTrainConfig,
    TrainerConfigError,
    as_image,
    as_text,
    drop_captions,
    help_field,
    load_base,
    parquet_rows,
    read_rows,
    train_lora,
)
from artloop.trainers.families import Cond, Family, concat, device_of, take
from PIL import Image


@dataclass
class DPOConfig(DenoisingTrainConfig):
    """Train a LoRA with Diffusion-DPO on preference pairs (AGFSync)."""

    beta: float = help_field(
        5000.0,
        help="KL strength: how far the policy may move from the "
        "reference (Diffusion-DPO used 5000 for SD1.5)",
    )
    learning_rate: float = help_field(1e-5, help="AdamW learning rate")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise TrainerConfigError(f"DPOConfig.beta: invalid value {self.beta!r}")


def load_pairs(data: str) -> list[tuple[Image.Image, Image.Image, str]]:
    """(chosen, rejected, caption) from a Pick-a-Pic-style parquet; ties are skipped."""
    ds = parquet_rows(data, {"caption", "jpg_0", "jpg_1", "label_0"}, "DPOConfig")

    def pair(row: dict) -> tuple[Image.Image, Image.Image, str] | None:
        label, caption = float(row["label_0"]), as_text(row["caption"])
        if label == 0.5:
            return None
        a, b = as_image(row["jpg_0"]), as_image(row["jpg_1"])
        return (a, b, caption) if label > 0.5 else (b, a, caption)

    pairs = read_rows(ds, pair, "DPOConfig", data)
    if not pairs:
        raise TrainerConfigError(f"DPOConfig.data: no preference pairs in {data}")
    return pairs


def dpo_loss(
    family: Family,
    denoiser,
    chosen,
    rejected,
    cond: Cond,
    generator,
    beta: float,
    stats: dict[str, float] | None = None,
):
    """The Diffusion-DPO loss on a batch of pairs (B chosen, B rejected latents). `stats`, if
    given, gets the batch's `implicit_acc`: the share of pairs whose chosen image the policy
    already prefers more than the reference does (diffusers' DPO example logs it)."""
    import torch
    import torch.nn.functional as F

    noise, t = family.sample_noise(chosen, generator)  # shared by both images of a pair
    latents, noise, t = torch.cat([chosen, rejected]), torch.cat([noise, noise]), torch.cat([t, t])
    noisy, target = family.noised(latents, noise, t)  # (2B, C, h, w)
    both = concat(cond, cond)

    def errors() -> torch.Tensor:  # per-example squared error: (2B,)
        pred = family.predict(denoiser, noisy, t, both)
        return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))

    policy = errors()
    model = getattr(denoiser, "module", denoiser)  # accelerate may wrap it
    with torch.no_grad():
        model.disable_adapters()  # the reference: the same denoiser without the LoRA
        try:
            reference = errors()
        finally:
            model.enable_adapters()
    (pw, pl), (rw, rl) = policy.chunk(2), reference.chunk(2)
    inside = -0.5 * beta * ((pw - pl) - (rw - rl))
    if stats is not None:
        stats["implicit_acc"] = (inside > 0).float().mean().item()
    return -F.logsigmoid(inside).mean()


def train_dpo(cfg: DPOConfig, progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (steps, losses, timing, the LoRA file)."""
    pairs = load_pairs(cfg.data)  # bad data fails before the model loads
    family = load_base(cfg)
    chosen = family.encode_images([w for w, _, _ in pairs], cfg.resolution)
    rejected = family.encode_images([lo for _, lo, _ in pairs], cfg.resolution)
    captions, empty = family.encode_captions([c for _, _, c in pairs])
    stats: dict[str, float] = {}  # the last batch's implicit accuracy, for the tracker

    def loss_at(denoiser, idx, g, step):
        d = device_of(denoiser)
        cond = drop_captions(take(captions, idx, d), empty, cfg.caption_dropout, g)
        w, lo = chosen[idx].to(d), rejected[idx].to(d)
        return dpo_loss(family, denoiser, w, lo, cond, g, cfg.beta, stats)

    prompts = [c for _, _, c in pairs]
    return train_lora(
        cfg, family, len(pairs), loss_at, "dpo", progress, prompts=prompts, metrics=lambda: stats
    )
