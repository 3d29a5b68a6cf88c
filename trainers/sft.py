"""Supervised / differential LoRA training (ArtAug): the base model learns to draw the loop's
accepted images from the ORIGINAL prompts, so no loop is needed at inference.

    artloop train sft --data EXPORT_DIR --output-dir LORA_DIR [--model tiny-sd] [...]

Reads `artloop export --format sft` (a parquet with `image` and `text`). VAE latents and text
embeddings are computed once and cached: only the UNet runs in the training loop. Every step's
batch, noise and timesteps come from (seed, step), so a resumed run matches an unbroken one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it runs: the CLI starts without it
    import torch

from artloop.trainers.common import (
    TrainerConfigError,
    add_lora,
    fuse_preset_lora,
    help_field,
    load_checkpoint,
    save_checkpoint,
    save_lora,
)
from PIL import Image


@dataclass
class SFTConfig:
    """Train a LoRA on accepted images with their original prompts (ArtAug's SFT)."""

    data: str = help_field(help="`artloop export --format sft` directory, or a parquet file")
    output_dir: str = help_field("artloop-lora-sft", help="Where the LoRA and checkpoints go")
    model: str = help_field("tiny-sd", help="Base model: tiny-sd, an SD1.5-family id or path")
    resolution: int = help_field(256, help="Training resolution (images are resized + cropped)")
    rank: int = help_field(8, help="LoRA rank")
    lora_alpha: float = help_field(8.0, help="LoRA alpha (scale = alpha / rank)")
    learning_rate: float = help_field(1e-4, help="AdamW learning rate")
    train_steps: int = help_field(200, help="Optimizer steps")
    batch_size: int = help_field(4, help="Images per step (per device)")
    gradient_accumulation_steps: int = help_field(1, help="Micro-batches per optimizer step")
    seed: int = help_field(0, help="Seed for batches, noise and timesteps")
    checkpoint_every: int = help_field(100, help="Save a resumable checkpoint every N steps")
    resume: bool = help_field(True, help="Continue from output_dir/checkpoint when it exists")
    preset_lora: str | None = help_field(None, help="ArtAug differential mode: a LoRA fused "
                                         "into the base first; the new LoRA learns the rest")  # fmt: skip
    mixed_precision: str = help_field("no", help="no | fp16 | bf16 (accelerate)")

    def __post_init__(self) -> None:
        checks = {"resolution": self.resolution >= 64, "rank": self.rank >= 1,
                  "learning_rate": self.learning_rate > 0, "train_steps": self.train_steps >= 1,
                  "batch_size": self.batch_size >= 1, "checkpoint_every": self.checkpoint_every >= 1,
                  "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1}  # fmt: skip
        for name, ok in checks.items():
            if not ok:
                raise TrainerConfigError(f"SFTConfig.{name}: invalid value {getattr(self, name)!r}")


def load_rows(data: str) -> list[tuple[Image.Image, str]]:
    """(image, text) rows of an sft export (its parquet) or of a parquet file."""
    import datasets

    path = Path(data)
    files = sorted((path / "data").glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise TrainerConfigError(f"SFTConfig.data: no parquet data at {data}")
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    missing = {"image", "text"} - set(ds.column_names)
    if missing:
        raise TrainerConfigError(f"SFTConfig.data: {data} lacks column(s) {sorted(missing)}")
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


def encode(
    pipe: Any, rows: list[tuple[Image.Image, str]], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache: latents (N, 4, size/8, size/8) and text embeddings (N, 77, D), computed once."""
    import torch

    with torch.no_grad():
        return _encode(pipe, rows, size)


def _encode(
    pipe: Any, rows: list[tuple[Image.Image, str]], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    device = pipe.unet.device
    pixels = torch.stack([to_pixels(img, size) for img, _ in rows]).to(device, pipe.vae.dtype)
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    tokens = pipe.tokenizer([t for _, t in rows], padding="max_length", truncation=True,
                            max_length=pipe.tokenizer.model_max_length, return_tensors="pt")  # fmt: skip
    embeddings = pipe.text_encoder(tokens.input_ids.to(device))[0]
    return latents.float(), embeddings.float()


def diffusion_loss(unet, scheduler, latents: torch.Tensor, embeddings: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """The denoising loss on one batch: noise, a random timestep, predict noise (or velocity)."""
    import torch
    import torch.nn.functional as F

    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    )
    t = t.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    target = (
        scheduler.get_velocity(latents, noise, t)
        if scheduler.config.prediction_type == "v_prediction"
        else noise
    )
    pred = unet(noisy, t, encoder_hidden_states=embeddings).sample
    return F.mse_loss(pred.float(), target.float())


def train_sft(cfg: SFTConfig, progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (steps, losses, timing, the LoRA file)."""
    import torch
    from accelerate import Accelerator
    from artloop.tools.diffusion import DiffusionTool
    from artloop.tools.images import ImageStore
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tool = DiffusionTool(model=cfg.model, store=ImageStore(out / ".unused"))
    if tool.family != "sd":
        raise TrainerConfigError(f"SFTConfig.model: {cfg.model} is {tool.family}; the sft "
                                 f"trainer supports the SD1.5 family so far")  # fmt: skip
    pipe = tool.pipeline
    if cfg.preset_lora:
        fuse_preset_lora(pipe, cfg.preset_lora)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision)  # fmt: skip
    pipe.to(accelerator.device)

    started = time.perf_counter()
    latents, embeddings = encode(pipe, load_rows(cfg.data), cfg.resolution)
    encode_s = time.perf_counter() - started
    unet = pipe.unet
    torch.manual_seed(cfg.seed)  # the LoRA's initial weights
    params = add_lora(unet, cfg.rank, cfg.lora_alpha)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    ckpt, step = out / "checkpoint", 0
    if cfg.resume and (ckpt / "state.json").exists():
        step = load_checkpoint(ckpt, unet, optimizer)["step"]
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()

    n, losses = latents.shape[0], []
    bar = tqdm(total=cfg.train_steps, initial=step, desc="sft", disable=not progress)
    loop_started = time.perf_counter()
    first_step = step
    while step < cfg.train_steps:
        for micro in range(cfg.gradient_accumulation_steps):
            # Everything random in this step comes from (seed, step, micro): resumable exactly.
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + micro)
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
            with accelerator.accumulate(unet):
                loss = diffusion_loss(unet, scheduler, latents[idx], embeddings[idx], g)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.train_steps:
            save_checkpoint(ckpt, step, accelerator.unwrap_model(unet), optimizer)
    bar.close()
    loop_s = time.perf_counter() - loop_started
    lora = save_lora(StableDiffusionPipeline, accelerator.unwrap_model(unet), out)
    summary = {"steps": step, "trained_steps": step - first_step, "images": n,
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "encode_s": encode_s, "loop_s": loop_s,
               "steps_per_s": (step - first_step) / loop_s if loop_s > 0 else math.nan,
               "lora": str(lora), "config": asdict(cfg)}  # fmt: skip
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
