"""tiny-sd-fit: tiny SD 1.5 whose UNet is fitted, on first use, to a synthetic image distribution.

A random UNet's samples are noise that a short fine-tune cannot shift: its denoising loss starts
at ~1.2, and an sft LoRA trained on images 0.2 darker changed held-out darkness by -0.013 (the
wrong way; the darkness effect study of issue 4, since removed, on tiny-sd). Fitted for 300 steps to smooth random colour
fields (v-prediction loss 0.97 -> ~0.38), the model samples images whose brightness spread is the
data's, a distribution fine-tuning can shift, as with a real pretrained model. Used where a
trained LoRA must move the model measurably on the tiny stack (the trainers' tests, DDPO);
everything else uses the faster random tiny-sd.
"""

from __future__ import annotations

# Deliberately lazy: torch and diffusers are imported inside the functions that use them, so that
# importing this module (the CLI's --help, the config, a test) does not load them.
from pathlib import Path
from typing import TYPE_CHECKING

from artloop.models.tiny.cache import build_cached
from artloop.models.tiny.diffusion import SD_CONFIG, build_sd

if TYPE_CHECKING:
    import torch

FIT_CONFIG: dict = {
    **SD_CONFIG,
    # Zero terminal SNR, v-prediction and trailing timesteps (Lin et al. 2023, "Common Diffusion
    # Noise Schedules and Sample Steps are Flawed"): with SD 1.5's schedule, the first of 4 steps
    # (t=751) still holds ~22% of the image, so a model reads the brightness off the noise mean
    # it starts from (0) and cannot learn to draw darker images: a LoRA trained on images 0.2
    # darker moved samples by 0.00, by 0.05 with trailing steps alone.
    "scheduler": {
        **SD_CONFIG["scheduler"],
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    },
    "fit": {
        "steps": 300,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "resolution": 64,
        "grid": 2,
        "cfg_dropout": 0.1,
        "seed": 0,
    },
}

# Captions for the fit: conditioning is shared by all images (the data has no content), but
# the model sees real prompt embeddings, and the empty prompt, as in pretraining.
_SUBJECTS = [
    "fox",
    "castle",
    "lighthouse",
    "forest",
    "street",
    "lake",
    "cat",
    "garden",
    "harbour",
    "desert",
    "robot",
    "violin",
    "bridge",
    "owl",
    "ship",
    "tower",
    "dragon",
    "flower",
    "mountain",
    "river",
]


def colour_fields(n: int, size: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """n smooth random images (B, 3, size, size) in [-1, 1]: a grid x grid field of uniform
    random colours, bilinearly upsampled."""
    import torch
    import torch.nn.functional as F

    coarse = torch.rand((n, 3, grid, grid), generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _fit_unet(pipe, fit: dict) -> list[float]:
    """Plain full-UNet denoising training on colour fields; returns the losses. (Written out
    rather than reusing trainers/: models are built below the trainers, which import them.)"""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(fit["seed"])
    torch.manual_seed(fit["seed"])
    with torch.no_grad():
        captions = [f"a {s}" for s in _SUBJECTS] + [""]
        embeddings = pipe.encode_prompt(captions, "cpu", 1, False)[0]  # (C, 77, 32)
    unet, scheduler, vae = pipe.unet, pipe.scheduler, pipe.vae
    optimizer = torch.optim.AdamW(unet.parameters(), lr=fit["learning_rate"])
    unet.train()
    losses, batch = [], fit["batch_size"]
    for _ in range(fit["steps"]):
        with torch.no_grad():
            images = colour_fields(batch, fit["resolution"], fit["grid"], g)
            latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
        caption = torch.randint(0, len(captions) - 1, (batch,), generator=g)
        caption[torch.rand(batch, generator=g) < fit["cfg_dropout"]] = len(captions) - 1
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        pred = unet(scheduler.add_noise(latents, noise, t), t, embeddings[caption]).sample
        loss = F.mse_loss(pred, scheduler.get_velocity(latents, noise, t))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    unet.eval()
    return losses


def _build_sd_fit(config: dict, out_dir: Path) -> None:
    import json

    from diffusers import StableDiffusionPipeline

    build_sd(config, out_dir)
    pipe = StableDiffusionPipeline.from_pretrained(out_dir, use_safetensors=True)
    losses = _fit_unet(pipe, config["fit"])
    pipe.unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    (out_dir / "fit_losses.json").write_text(json.dumps(losses))


def build_tiny_sd_fit() -> Path:
    """The fitted tiny SD directory (fitted on first use, ~1-2 min on 2 cores, then cached)."""
    return build_cached("tiny-sd-fit", FIT_CONFIG, _build_sd_fit)
