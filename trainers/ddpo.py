"""DDPO (Black et al. 2023; kvablack/ddpo-pytorch): reinforcement learning on the denoising
chain. Sample images with DDIM (eta > 0) while recording each step's log-probability, score them
with a reward, then push up the log-probability of high-advantage steps with PPO's clipped,
importance-sampled objective.

    artloop train ddpo --data PROMPTS_EXPORT --output-dir LORA_DIR --reward darkness [...]

Reads `artloop export --format prompts` (prompts.txt) or a text file, one prompt per line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from artloop.tools.rewards import REWARDS, get_reward
from artloop.trainers.common import (
    LoRATrainConfig,
    TrainerConfigError,
    help_field,
    load_base,
    load_prompts,
    train_lora,
)
from artloop.trainers.sft import encode_texts

if TYPE_CHECKING:  # torch is imported where it runs: the CLI starts without it
    import torch


@dataclass
class DDPOConfig(LoRATrainConfig):
    """Train a LoRA with DDPO against a reward (a measured statistic, a scorer, ...)."""

    reward: str = help_field("darkness", help="Reward name: " + ", ".join(sorted(REWARDS)))
    sample_steps: int = help_field(10, help="DDIM steps per sampled image")
    eta: float = help_field(1.0, help="DDIM eta (> 0: a stochastic policy with log-probs)")
    guidance_scale: float = help_field(5.0, help="Classifier-free guidance while sampling")
    inner_epochs: int = help_field(2, help="Optimizer steps on each sampled batch (PPO)")
    clip_range: float = help_field(0.2, help="PPO clip range of the importance ratio")
    learning_rate: float = help_field(3e-4, help="AdamW learning rate")
    resolution: int = help_field(64, help="Sampled image size")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            get_reward(self.reward)
        except KeyError as e:  # an unknown name fails here, naming the choices
            raise TrainerConfigError(f"DDPOConfig.reward: {e.args[0]}") from None
        for name, ok in {"sample_steps": self.sample_steps >= 2, "eta": self.eta > 0,
                         "inner_epochs": self.inner_epochs >= 1, "clip_range": self.clip_range > 0}.items():  # fmt: skip
            if not ok:
                raise TrainerConfigError(
                    f"DDPOConfig.{name}: invalid value {getattr(self, name)!r}"
                )


def ddim_step_with_logprob(scheduler, pred: torch.Tensor, t: int, sample: torch.Tensor,
                           eta: float, generator: torch.Generator | None = None,
                           prev_sample: torch.Tensor | None = None):  # fmt: skip
    """One DDIM step that also returns log p(prev_sample | sample): (B,). `pred` is the UNet's
    output: noise, or velocity for a v-prediction scheduler. Given `prev_sample`, scores it
    instead of sampling (the PPO re-evaluation)."""
    import torch

    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    if scheduler.config.prediction_type == "v_prediction":  # also at zero terminal SNR (a_t = 0)
        x0 = a_t.sqrt() * sample - (1 - a_t).sqrt() * pred
        eps = a_t.sqrt() * pred + (1 - a_t).sqrt() * sample
    else:
        x0, eps = (sample - (1 - a_t).sqrt() * pred) / a_t.sqrt(), pred
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator).to(sample)
        prev_sample = mean + std * noise
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
        - std.log()
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.ndim)))


def guided_prediction(unet, latents, t, text, uncond, guidance: float):
    """Classifier-free guided UNet output (noise or velocity)."""
    import torch

    eps = unet(
        torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, text])
    ).sample
    e_uncond, e_text = eps.chunk(2)
    return e_uncond + guidance * (e_text - e_uncond)


def sample_with_logprobs(pipe, unet, scheduler, text, uncond, cfg: DDPOConfig, g):
    """Sample a batch: the latents chain (T+1, B, ...), log-probs (T, B), timesteps, images."""
    import torch

    size = cfg.resolution // pipe.vae_scale_factor
    latents = torch.randn((text.shape[0], unet.config.in_channels, size, size), generator=g).to(
        text
    )
    chain, log_probs = [latents], []
    with torch.no_grad():
        for t in scheduler.timesteps:
            pred = guided_prediction(unet, latents, t, text, uncond, cfg.guidance_scale)
            latents, lp = ddim_step_with_logprob(scheduler, pred, int(t), latents, cfg.eta, g)
            chain.append(latents)
            log_probs.append(lp)
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    images = pipe.image_processor.postprocess(pixels, output_type="pil")
    return torch.stack(chain), torch.stack(log_probs), images


def ppo_loss(new_lp, old_lp, advantages, clip: float):
    """PPO's clipped surrogate (to minimise)."""
    import torch

    ratio = torch.exp(new_lp - old_lp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped).mean()


def train_ddpo(cfg: DDPOConfig, progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (steps, losses and mean rewards, the LoRA file)."""
    import numpy as np
    import torch
    from diffusers import DDIMScheduler

    pipe = load_base(cfg)
    prompts = load_prompts(cfg.data, "DDPOConfig.data")
    text = encode_texts(pipe, prompts)
    uncond = encode_texts(pipe, [""])
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.sample_steps)
    score = get_reward(cfg.reward)
    batches: dict[int, tuple] = {}  # sampled batch per PPO round, reused for its inner epochs
    rewards: list[float] = []

    def loss_at(unet, idx, g, step):
        round_ = step // cfg.inner_epochs  # PPO: each sampled batch serves inner_epochs steps
        if round_ not in batches:  # sample fresh with the current policy (no gradients)
            batches.clear()
            d = unet.device
            chain, old_lp, images = sample_with_logprobs(pipe, unet, scheduler, text[idx].to(d),
                                                         uncond.to(d).expand(len(idx), -1, -1), cfg, g)  # fmt: skip
            r, _ = score(images, [prompts[i] for i in idx], [{} for _ in idx])
            rewards.append(float(np.mean(r)))
            adv = torch.as_tensor((r - r.mean()) / (r.std() + 1e-6), dtype=torch.float32)
            batches[round_] = (idx, chain, old_lp, adv)
        idx, chain, old_lp, adv = batches[round_]
        d = unet.device
        cond, unc = text[idx].to(d), uncond.to(d).expand(len(idx), -1, -1)
        losses = []
        for j, t in enumerate(scheduler.timesteps):  # every denoising step of the chain
            pred = guided_prediction(unet, chain[j], t, cond, unc, cfg.guidance_scale)
            _, new_lp = ddim_step_with_logprob(
                scheduler, pred, int(t), chain[j], cfg.eta, prev_sample=chain[j + 1]
            )
            losses.append(ppo_loss(new_lp, old_lp[j], adv.to(d), cfg.clip_range))
        return torch.stack(losses).mean()

    summary = train_lora(cfg, pipe, len(prompts), loss_at, "ddpo", progress)
    summary["mean_rewards"] = rewards
    return summary
