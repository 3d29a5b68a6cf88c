"""Supervised / differential LoRA training (ArtAug): the base model learns to draw the loop's
accepted images from the ORIGINAL prompts, so no loop is needed at inference.

    artloop train sft --data EXPORT_DIR --output-dir LORA_DIR [--model tiny-sd] [...]

Reads `artloop export --format sft` (a parquet with `image` and `text`). VAE latents and text
embeddings are computed once and cached: only the denoiser (UNet, or FLUX's transformer) runs in
the training loop. What differs between SD 1.5, SDXL and FLUX lives in trainers/families.py.

`--differential` is ArtAug's differential training on the export's triples: LoRA1 learns the
`original` images (what the base model drew for each prompt) into OUTPUT_DIR/lora1; it is fused
into the base (`preset_lora`), and LoRA2 learns the `image` column (the loop's best) on top, so
it holds what the loop changed rather than the pictures' content. LoRA2 is the output's LoRA,
used alone on the plain base; LoRA1 stays for provenance.
"""

from __future__ import annotations

# Deliberately lazy: torch is imported inside the functions that use it, so that importing this
# module (the CLI's --help, the config, a test) does not load them.
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artloop.runtime.tracking import location
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
from artloop.trainers.families import Cond, Family, device_of, take
from PIL import Image

if TYPE_CHECKING:  # torch is imported where it runs: the CLI starts without it
    import torch

LORA1 = "lora1"  # OUTPUT_DIR/lora1: a differential run's first LoRA, on the original images


@dataclass
class SFTConfig(DenoisingTrainConfig):
    """Train a LoRA on accepted images with their original prompts (ArtAug's SFT)."""

    differential: bool = help_field(
        False,
        help="ArtAug's differential training: a LoRA on the data's `original` images (what the "
        "base drew) into output_dir/lora1, fused into the base, then the output's LoRA on "
        "`image` on top of it, so that it alone on the plain base carries the enhancement "
        "(train_steps each). Needs an sft export with `original`; not with preset_lora",
    )

    def __post_init__(self) -> None:
        if self.differential and self.preset_lora:  # before the preset is checked: either way
            raise TrainerConfigError(
                "SFTConfig.differential: fuses its own first LoRA (output_dir/lora1) into the "
                f"base; not with preset_lora {self.preset_lora}"
            )
        super().__post_init__()


def load_rows(data: str) -> list[tuple[Image.Image, str]]:
    """(image, text) rows of an sft export (its parquet) or of a parquet file."""
    ds = parquet_rows(data, {"image", "text"}, "SFTConfig")
    return read_rows(
        ds, lambda row: (as_image(row["image"]), as_text(row["text"])), "SFTConfig", data
    )


def load_triples(data: str) -> list[tuple[Image.Image, str, Image.Image]]:
    """(image, text, original) rows: a differential run's data. Data without `original` (an
    export by an earlier artloop, another dataset) is a TrainerConfigError saying what writes it."""
    ds = parquet_rows(data, {"image", "text"}, "SFTConfig")
    if "original" not in ds.column_names:
        raise TrainerConfigError(
            f"SFTConfig.differential: {data} has no `original` column (the base model's "
            "first images); `artloop export OUT --format sft` writes it"
        )

    def triple(row: dict) -> tuple[Image.Image, str, Image.Image]:
        return as_image(row["image"]), as_text(row["text"]), as_image(row["original"])

    return read_rows(ds, triple, "SFTConfig", data)


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
    """Train; returns a summary (steps, losses, timing, the LoRA file). Differential: both
    LoRAs, the summary LoRA2's with LoRA1's under `differential`."""
    if cfg.differential:
        return _train_differential(cfg, progress)
    rows = load_rows(cfg.data)  # bad data fails before the model loads
    return _train_on(cfg, rows, "sft", progress)


def _train_differential(cfg: SFTConfig, progress: bool) -> dict[str, Any]:
    """LoRA1 on the originals into output_dir/lora1, then LoRA2 on the best images with LoRA1
    fused into the base (`preset_lora`, as any preset). Each stage checkpoints and resumes in
    its own directory; a named resume_from_checkpoint is LoRA2's (the output's)."""
    from accelerate import PartialState

    triples = load_triples(cfg.data)  # bad data fails before the model loads
    out = Path(cfg.output_dir)
    resume1 = "none" if cfg.resume_from_checkpoint in ("none", "") else "latest"
    tracking_uri = cfg.tracking_uri
    if cfg.report_to != "none":  # both stages log where the output's tracker logs
        tracking_uri = tracking_uri or location(cfg.report_to, None, out)
    stage1 = replace(
        cfg,
        differential=False,
        output_dir=str(out / LORA1),
        resume_from_checkpoint=resume1,
        tracking_uri=tracking_uri,
    )
    first = _train_on(stage1, [(o, t) for _, t, o in triples], "sft-lora1", progress)
    PartialState().wait_for_everyone()  # the main process has written LoRA1: all may fuse it
    stage2 = replace(cfg, differential=False, preset_lora=str(out / LORA1))
    second = _train_on(stage2, [(i, t) for i, t, _ in triples], "sft", progress)
    keys = ("steps", "trained_steps", "first_loss", "last_loss", "lora")
    summary = second | {
        "differential": {
            "lora2": second["lora"],  # the output's LoRA: use it alone, on the plain base
            "lora1": first["lora"],  # the originals' LoRA, fused while LoRA2 trained
            "lora1_summary": {k: first[k] for k in keys},
        },
        "config": {**second["config"], "differential": True, "preset_lora": cfg.preset_lora},
    }
    if summary.get("main_process", True):
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _train_on(
    cfg: SFTConfig, rows: list[tuple[Image.Image, str]], name: str, progress: bool
) -> dict[str, Any]:
    """One LoRA on (image, text) rows."""
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
    return train_lora(cfg, family, len(rows), loss_at, name, progress, extra, prompts=prompts)
