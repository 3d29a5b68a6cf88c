"""tiny-shapes-sd: a Stable Diffusion 1.5-architecture model trained from scratch on the shapes
world (world/), every part of it: a CLIP BPE tokenizer trained on the world's captions, an
AutoencoderKL (4x downscale, 64 px images -> 16 x 16 x 4 latents), and a CLIPTextModel and a
UNet2DConditionModel trained together on the denoising loss, with 10% empty captions for
classifier-free guidance. Saved as a StableDiffusionPipeline directory (safetensors), loaded by
the same code as any SD 1.5.

Two stages, both plain PyTorch loops with AdamW, warm-up then cosine decay and gradient
clipping: the VAE on rendered scenes (L1 + a small KL term), then, on latents of rendered
training scenes encoded once, the text encoder and UNet. (Written out rather than through
trainers/: models sit below the trainers, which import them.)
"""

from __future__ import annotations

# Deliberately lazy: torch, transformers and diffusers are imported inside the functions that use
# them, so that importing this module (the CLI's --help, the config, a test) does not load them.
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random
from typing import TYPE_CHECKING

from artloop.models.tiny import cache
from artloop.models.tiny.diffusion import SD_CONFIG, clip_tokenizer
from artloop.world import render, sample_scenes, score_image

if TYPE_CHECKING:
    import torch

RESOLUTION = 64
MAX_TOKENS = 40  # the longest caption (four phrases, a prefix) is ~30 tokens

ARCH: dict = {
    "tokenizer": {"vocab_size": 640, "model_max_length": MAX_TOKENS},
    "text_encoder": {
        "vocab_size": 640,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    },
    "vae": {
        "sample_size": RESOLUTION,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [16, 32, 32],  # three blocks: two downsamplings, 4x
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        # No attention in the mid-block: flat shapes need none, and it cost 30% of a step.
        "mid_block_add_attention": False,
    },
    "unet": {
        "sample_size": RESOLUTION // 4,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 1,
        # Cross-attention at 8 x 8 and 4 x 4 latents (a cell is 8 px, an object 12-26 px): at
        # 16 x 16 as well, a training step on 2 CPU cores took 1.9x as long (0.75 s vs 0.40 s).
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "scheduler": SD_CONFIG["scheduler"],  # SD 1.5's DDIM settings
}


def shipped() -> Path:
    """The shipped tiny-shapes-sd directory; ValueError when this checkout lacks it."""
    return cache.shipped("tiny-shapes-sd", "model_index.json", "train-shapes-sd", "diffusion.model")


def shipped_inpaint() -> Path:
    """The shipped tiny-shapes-sd-inpaint directory; ValueError when this checkout lacks it."""
    return cache.shipped(
        "tiny-shapes-sd-inpaint",
        "model_index.json",
        "train-shapes-inpaint",
        "diffusion.inpaint_model",
    )


def _field(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ShapesSDTraining:
    """Train tiny-shapes-sd from scratch on the shapes world (CPU: about 40 min on 2 cores)."""

    output_dir: str = _field("tiny-shapes-sd", "Where the pipeline directory goes")
    seed: int = _field(0, "Seed of the weights, the scenes and the noise")
    vae_steps: int = _field(600, "VAE training steps")
    vae_batch: int = _field(32, "VAE images per step")
    vae_lr: float = _field(1e-3, "VAE peak learning rate (AdamW)")
    kl_weight: float = _field(1e-6, "Weight of the VAE's KL term beside L1 reconstruction")
    scenes: int = _field(20000, "Training scenes rendered and encoded once for the UNet stage")
    unet_steps: int = _field(4000, "UNet + text encoder training steps")
    unet_batch: int = _field(32, "Latents per UNet step")
    unet_lr: float = _field(6e-4, "UNet + text encoder peak learning rate (AdamW)")
    warmup: int = _field(100, "Linear warm-up steps of each stage, then cosine decay")
    cfg_dropout: float = _field(0.1, "Share of empty captions (classifier-free guidance)")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm")
    eval_scenes: int = _field(100, "Held-out scenes scored with `shapes` after training (0: none)")

    def check(self) -> None:
        """ValueError naming the first field out of its range."""
        for name in ("vae_steps", "vae_batch", "scenes", "unet_steps", "unet_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("vae_lr", "unet_lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must be in [0, 1), not {self.cfg_dropout}")
        if self.warmup < 0 or self.eval_scenes < 0 or self.kl_weight < 0:
            raise ValueError("warmup, eval_scenes and kl_weight must not be negative")


def corpus(n: int = 3000) -> list[str]:
    """The tokenizer's training text: captions of training scenes, with every synonym."""
    scenes = sample_scenes("train", n, seed=10_000)
    return [s.caption(Random(i)) for i, s in enumerate(scenes)]


def _schedule(optimizer, warmup: int, steps: int):
    import torch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimiser_step(loss, opt, sched, params: list, max_grad_norm: float) -> None:
    """One optimiser step (each stage here, and tiny-shapes-qwen2vl's): backward, clip, step,
    advance the schedule."""
    import torch

    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()


def _images(scenes, start: int, n: int) -> torch.Tensor:
    """Renders of scenes[start : start + n] (cycling) as (n, 3, H, W) in [-1, 1]."""
    import numpy as np
    import torch

    picked = [scenes[(start + i) % len(scenes)] for i in range(n)]
    arrays = np.stack([np.asarray(render(s, RESOLUTION)) for s in picked])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(cfg: ShapesSDTraining, log: Callable[[str], None]):
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**ARCH["vae"])
    scenes = sample_scenes("train", 4096, seed=cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    sched = _schedule(opt, cfg.warmup, cfg.vae_steps)
    start = time.perf_counter()
    for step in range(cfg.vae_steps):
        x = _images(scenes, step * cfg.vae_batch, cfg.vae_batch)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        optimiser_step(loss, opt, sched, list(vae.parameters()), cfg.max_grad_norm)
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    vae.eval()
    return vae


def encode_scenes(vae, cfg: ShapesSDTraining):
    """Latents (unscaled) and captions of `cfg.scenes` training scenes."""
    import torch

    scenes = sample_scenes("train", cfg.scenes, seed=cfg.seed + 2)
    latents = []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            x = _images(scenes, i, min(256, len(scenes) - i))
            latents.append(vae.encode(x).latent_dist.mode())
    return torch.cat(latents), scenes


def train_unet(vae, tokenizer, cfg: ShapesSDTraining, log: Callable[[str], None]):
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    latents, scenes = encode_scenes(vae, cfg)
    scaling = float(1.0 / latents.std())
    latents = latents * scaling
    torch.manual_seed(cfg.seed)
    text = CLIPTextModel(CLIPTextConfig(**ARCH["text_encoder"]))
    unet = UNet2DConditionModel(**ARCH["unet"])
    scheduler = DDIMScheduler(**ARCH["scheduler"])
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = _schedule(opt, cfg.warmup, cfg.unet_steps)
    g = torch.Generator().manual_seed(cfg.seed)
    rng = Random(cfg.seed)
    start = time.perf_counter()
    for step in range(cfg.unet_steps):
        idx = torch.randint(0, len(scenes), (cfg.unet_batch,), generator=g)
        captions = [
            "" if rng.random() < cfg.cfg_dropout else scenes[i].caption(rng) for i in idx.tolist()
        ]
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=MAX_TOKENS,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, text(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        optimiser_step(loss, opt, sched, params, cfg.max_grad_norm)
        if step % 200 == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    unet.eval()
    text.eval()
    return unet, text, scheduler, scaling


def train_shapes_sd(cfg: ShapesSDTraining, log: Callable[[str], None] = print) -> dict:
    """Train tiny-shapes-sd from `cfg.seed`, save it as a StableDiffusionPipeline (safetensors)
    with its model card in `cfg.output_dir`, score it on held-out scenes; the summary."""
    import torch
    from diffusers import StableDiffusionPipeline

    cfg.check()
    out_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    tokenizer = clip_tokenizer(**ARCH["tokenizer"], corpus=corpus())
    vae = train_vae(cfg, log)
    vae_seconds = time.perf_counter() - start
    ceiling = vae_round_trip(vae, n=max(cfg.eval_scenes, 20), seed=cfg.seed)
    log(f"vae round trip: held-out renders score {ceiling:.3f} after encode + decode")
    unet, text, scheduler, scaling = train_unet(vae, tokenizer, cfg, log)
    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Stored in float16 (half the size in the repository), loaded as float32: the figures below
    # are measured on the stored weights.
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    summary: dict = {
        "output_dir": str(out_dir),
        "training": asdict(cfg),
        "arch": ARCH,
        "seconds": {"vae": round(vae_seconds), "total": round(time.perf_counter() - start)},
        "torch_threads": torch.get_num_threads(),
        "vae_round_trip": ceiling,
    }
    if cfg.eval_scenes:
        log(f"scoring {cfg.eval_scenes} held-out scenes with `shapes`, and single objects")
        summary["heldout"] = evaluate(out_dir, "heldout", cfg.eval_scenes, seed=cfg.seed)
        summary["single"] = evaluate(
            out_dir, "train", cfg.eval_scenes, seed=cfg.seed + 1, n_objects=1
        )
    (out_dir / "training.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "README.md").write_text(model_card(summary))
    return summary


def model_card(summary: dict) -> str:
    """The model card: what the model is, its data, its training, and its measured figures."""
    t = summary["training"]
    lines = [
        "# tiny-shapes-sd",
        "",
        "A Stable Diffusion 1.5-architecture pipeline (CLIP BPE tokenizer, CLIPTextModel, "
        "AutoencoderKL with a 4x downscale, UNet2DConditionModel, DDIM) trained from scratch by "
        "`artloop models train-shapes-sd` on artloop's shapes world: 1-4 flat shapes (circle, "
        "square, triangle) in six colours on a grey background, at "
        f"{RESOLUTION} x {RESOLUTION} px, with template captions. Training scenes never show "
        "together a pair of kinds that the held-out split holds out.",
        "",
        "## Training",
        "",
        f"- seed {t['seed']}; VAE {t['vae_steps']} steps x {t['vae_batch']} images "
        f"(lr {t['vae_lr']}, L1 + {t['kl_weight']} KL); UNet + text encoder {t['unet_steps']} "
        f"steps x {t['unet_batch']} latents of {t['scenes']} encoded training scenes "
        f"(lr {t['unet_lr']}, {t['cfg_dropout']:.0%} empty captions), AdamW, {t['warmup']} "
        f"warm-up steps then cosine, gradient clipping {t['max_grad_norm']}",
        f"- {summary['seconds']['total']} s in all ({summary['seconds']['vae']} s the VAE) on "
        f"{summary['torch_threads']} CPU threads; weights stored in float16, run in float32",
        f"- the VAE alone: held-out renders, encoded and decoded, score "
        f"{summary['vae_round_trip']:.3f} (the ceiling for the UNet's samples)",
        "",
    ]
    if h := summary.get("heldout"):
        lines += [
            "## Measured (the `shapes` scorer, which training never used)",
            "",
            f"{h['n']} held-out scenes, one image each (20 DDIM steps, guidance 5):",
            "",
            f"- mean score {h['mean']:.3f} (95% bootstrap interval {h['ci95'][0]:.3f}-"
            f"{h['ci95'][1]:.3f}); {h['perfect']:.0%} of images meet every requirement",
            "- by number of objects: "
            + ", ".join(f"{k}: {v:.3f}" for k, v in h["by_objects"].items()),
            "- requirements met, by kind: "
            + ", ".join(f"{k} {v:.0%}" for k, v in h["met_by_kind"].items()),
            "",
        ]
    if one := summary.get("single"):
        lines += [
            f"Single objects ({one['n']} one-object training-split captions, new draws): mean "
            f"{one['mean']:.3f} ({one['ci95'][0]:.3f}-{one['ci95'][1]:.3f}); by kind: "
            + ", ".join(f"{k} {v:.0%}" for k, v in one["met_by_kind"].items()),
            "",
        ]
    return "\n".join(lines)


# --- evaluation -----------------------------------------------------------------------------------
def sample(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 5.0):
    """One image per (prompt, seed), at the model's resolution."""
    import torch

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe(
            prompts,
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
        ).images


def evaluate(
    model_dir: Path | str,
    split: str = "heldout",
    n: int = 100,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 5.0,
    batch: int = 25,
    n_objects: int | None = None,
) -> dict:
    """The model's `shapes` scores on `n` scenes of `split` (one image each, seed = `seed` + i):
    the mean with a 95% bootstrap interval, the means by number of objects and the share of
    each kind of requirement met."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, use_safetensors=True, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    scenes = sample_scenes(split, n, seed=seed + 50_000, n_objects=n_objects)  # not training's
    prompts = [s.caption() for s in scenes]
    reports = []
    for i in range(0, n, batch):
        images = sample(
            pipe,
            prompts[i : i + batch],
            [seed + j for j in range(i, min(n, i + batch))],
            steps,
            guidance,
        )
        reports += [
            score_image(im, p) for im, p in zip(images, prompts[i : i + batch], strict=True)
        ]
    scores = np.array([r.score for r in reports])
    boot = np.random.default_rng(seed).choice(scores, (2000, n)).mean(axis=1)
    kinds: dict[str, list[bool]] = {}
    for r in reports:
        for q in r.requirements:
            kinds.setdefault(q.kind, []).append(q.met)
    by_objects: dict[int, list[float]] = {}
    for s, r in zip(scenes, reports, strict=True):
        by_objects.setdefault(len(s.objects), []).append(r.score)
    return {
        "split": split,
        "n": n,
        "n_objects": n_objects,
        "mean": float(scores.mean()),
        "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
        "perfect": float((scores == 1.0).mean()),
        "by_objects": {k: float(np.mean(v)) for k, v in sorted(by_objects.items())},
        "met_by_kind": {k: float(np.mean(v)) for k, v in sorted(kinds.items())},
    }


def vae_round_trip(vae, split: str = "heldout", n: int = 100, seed: int = 0) -> float:
    """The mean `shapes` score of `n` renders of `split` after the VAE's encode and decode: the
    ceiling the UNet's samples can reach through this VAE."""
    import numpy as np
    import torch
    from PIL import Image

    scenes = sample_scenes(split, n, seed=seed + 60_000)
    with torch.no_grad():
        x = _images(scenes, 0, n).to(vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
    arrays = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    scores = [
        score_image(Image.fromarray(a), s.caption()).score
        for a, s in zip(arrays, scenes, strict=True)
    ]
    return float(np.mean(scores))
