"""DDPO (Black et al. 2023; kvablack/ddpo-pytorch): reinforcement learning on the denoising
chain. Sample images with DDIM (eta > 0) while recording each step's log-probability, score them
with a reward, then push up the log-probability of high-advantage steps with PPO's clipped,
importance-sampled objective. FLUX samples by flow matching, a deterministic ODE; there the chain
is Flow-GRPO's SDE with the same marginals, whose steps are Gaussian with known log-probability.

    artloop train ddpo --data PROMPTS_EXPORT --output-dir LORA_DIR --reward darkness [...]

Reads `artloop export --format prompts` (prompts.txt) or a text file, one prompt per line.
"""

from __future__ import annotations

# Deliberately lazy: torch and diffusers are imported inside the functions that use them, so that
# importing this module (the CLI's --help, the config, a test) does not load them.
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from artloop.rewards import REWARDS, get_reward, reward_entry
from artloop.trainers.common import (
    LoRATrainConfig,
    TrainerConfigError,
    help_field,
    load_base,
    load_prompts,
    train_lora,
)
from artloop.trainers.families import Cond, Family, concat, device_of, take

if TYPE_CHECKING:  # torch is imported where it runs: the CLI starts without it
    import torch


@dataclass
class DDPOConfig(LoRATrainConfig):
    """Train a LoRA with DDPO against a reward (a measured statistic, a scorer, ...)."""

    reward: str = help_field("darkness", help="Reward name: " + ", ".join(sorted(REWARDS)))
    sample_steps: int = help_field(10, help="DDIM steps per sampled image")
    eta: float = help_field(
        1.0,
        help="Sampling noise (> 0: a stochastic policy with "
        "log-probs): DDIM's eta, or the flow SDE's noise level for FLUX "
        "(Flow-GRPO used 0.7)",
    )
    guidance_scale: float = help_field(
        5.0, help="Classifier-free guidance while sampling (not FLUX: it is guidance-distilled)"
    )
    inner_epochs: int = help_field(2, help="Optimizer steps on each sampled batch (PPO)")
    clip_range: float = help_field(0.2, help="PPO clip range of the importance ratio")
    learning_rate: float = help_field(3e-4, help="AdamW learning rate")
    resolution: int = help_field(64, help="Sampled image size")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            get_reward(self.reward)
        except (KeyError, ValueError) as e:  # an unknown or unloadable name fails here
            raise TrainerConfigError(f"DDPOConfig.reward: {e.args[0]}") from None
        for name, ok in {
            "sample_steps": self.sample_steps >= 2,
            "eta": self.eta > 0,
            "inner_epochs": self.inner_epochs >= 1,
            "clip_range": self.clip_range > 0,
        }.items():
            if not ok:
                raise TrainerConfigError(
                    f"DDPOConfig.{name}: invalid value {getattr(self, name)!r}"
                )


def ddim_step_with_logprob(
    scheduler,
    pred: torch.Tensor,
    t: int,
    sample: torch.Tensor,
    eta: float,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
):
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
    # At zero terminal SNR with eta = 1 this is 0 in exact arithmetic, and float32 rounding can
    # make it -1e-8 on some CPUs: its square root is NaN (diffusers' own step has that bug).
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator).to(sample)
        prev_sample = mean + std * noise
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
        - std.log()
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.ndim)))


def flow_sde_step_with_logprob(
    pred: torch.Tensor,
    sigma: float,
    sigma_next: float,
    sigma_max: float,
    sample: torch.Tensor,
    noise_level: float,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
):
    """One step of the SDE that has rectified flow's marginals (Flow-GRPO, Liu et al. 2025), with
    log p(prev_sample | sample): (B,). `pred` is the velocity n - x0 at flow time `sigma`; the
    step goes to `sigma_next` < sigma. noise_level -> 0 gives the plain Euler (ODE) step."""
    import torch

    dt = sigma_next - sigma  # < 0: from noise (1) towards data (0)
    # sigma_t = a * sqrt(s / (1 - s)); at s = 1 it is infinite, so the first step uses s_max.
    std_t = noise_level * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    mean = (
        sample * (1 + std_t**2 / (2 * sigma) * dt)
        + pred * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    std = std_t * math.sqrt(-dt)
    if prev_sample is None:
        prev_sample = mean + std * torch.randn(sample.shape, generator=generator).to(sample)
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
        - math.log(std)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.ndim)))


class Chain:
    """The stochastic sampling chain DDPO scores: DDIM for SD / SDXL, the flow SDE for FLUX.
    `timesteps[i]` is what the denoiser reads at step i; `step(i, ...)` is that step."""

    def __init__(self, family: Family, steps: int, eta: float) -> None:
        import torch
        from diffusers import DDIMScheduler

        self.eta, self.flow = eta, family.name == "flux"
        if self.flow:  # flow time from 1 (noise) to 0, evenly spaced
            self.sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
            self.timesteps = [torch.tensor(s) for s in self.sigmas[:-1]]
        else:
            # set_alpha_to_one=False (SD 1.5's own setting): with True (the default that SDXL's
            # Euler config falls back to), the last step is deterministic and has no log-prob.
            self.scheduler = DDIMScheduler.from_config(
                family.pipe.scheduler.config, set_alpha_to_one=False
            )
            self.scheduler.set_timesteps(steps)
            self.timesteps = list(self.scheduler.timesteps)

    def step(self, i: int, pred, sample, g=None, prev_sample=None):
        if self.flow:
            s = self.sigmas
            return flow_sde_step_with_logprob(
                pred, s[i], s[i + 1], s[1], sample, self.eta, g, prev_sample
            )
        return ddim_step_with_logprob(
            self.scheduler, pred, int(self.timesteps[i]), sample, self.eta, g, prev_sample
        )


def guided_prediction(
    family: Family, denoiser, latents, t, cond: Cond, uncond: Cond, guidance: float
):
    """The denoiser's output with classifier-free guidance (FLUX: guidance-distilled, one pass)."""
    import torch

    if family.name == "flux":
        return family.predict(denoiser, latents, t, cond)
    pred = family.predict(denoiser, torch.cat([latents, latents]), t, concat(uncond, cond))
    e_uncond, e_text = pred.chunk(2)
    return e_uncond + guidance * (e_text - e_uncond)


def sample_with_logprobs(
    family: Family, denoiser, chain: Chain, cond: Cond, uncond: Cond, cfg: DDPOConfig, g
):
    """Sample a batch: the latents chain (T+1, B, ...), log-probs (T, B), images."""
    import torch

    size = cfg.resolution // family.pipe.vae_scale_factor
    channels = family.pipe.vae.config.latent_channels
    batch = next(iter(cond.values())).shape[0]
    latents = torch.randn((batch, channels, size, size), generator=g).to(cond["text"])
    states, log_probs = [latents], []
    with torch.no_grad():
        for i, t in enumerate(chain.timesteps):
            pred = guided_prediction(
                family, denoiser, latents, t.to(latents.device), cond, uncond, cfg.guidance_scale
            )
            latents, lp = chain.step(i, pred, latents, g)
            states.append(latents)
            log_probs.append(lp)
        images = family.decode(latents)
    return torch.stack(states), torch.stack(log_probs), images


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

    prompts = load_prompts(cfg.data, "DDPOConfig.data")  # bad data fails before the model loads
    family = load_base(cfg)
    text, uncond = family.encode_captions(prompts)
    chain = Chain(family, cfg.sample_steps, cfg.eta)
    score = get_reward(cfg.reward)
    batches: dict[int, tuple] = {}  # sampled batch per PPO round, reused for its inner epochs
    rewards: list[float] = []

    def loss_at(denoiser, idx, g, step):
        d = device_of(denoiser)
        round_ = step // cfg.inner_epochs  # PPO: each sampled batch serves inner_epochs steps
        if round_ not in batches:  # sample fresh with the current policy (no gradients)
            batches.clear()
            cond = take(text, idx, d)
            unc = {k: v.to(d).expand(len(idx), *v.shape[1:]) for k, v in uncond.items()}
            states, old_lp, images = sample_with_logprobs(
                family, denoiser, chain, cond, unc, cfg, g
            )
            r, _ = score(images, [prompts[i] for i in idx], [{} for _ in idx])
            rewards.append(float(np.mean(r)))
            adv = torch.as_tensor((r - r.mean()) / (r.std() + 1e-6), dtype=torch.float32)
            batches[round_] = (cond, unc, states, old_lp, adv)
        cond, unc, states, old_lp, adv = batches[round_]  # with the prompts it was sampled for
        losses = []
        for j, t in enumerate(chain.timesteps):  # every denoising step of the chain
            pred = guided_prediction(
                family, denoiser, states[j], t.to(d), cond, unc, cfg.guidance_scale
            )
            _, new_lp = chain.step(j, pred, states[j], prev_sample=states[j + 1])
            losses.append(ppo_loss(new_lp, old_lp[j], adv.to(d), cfg.clip_range))
        return torch.stack(losses).mean()

    # the reward's identity (its range, direction and model weights) goes into train_summary.json
    extra = {"reward": reward_entry(cfg.reward).identity()}
    summary = train_lora(
        cfg,
        family,
        len(prompts),
        loss_at,
        "ddpo",
        progress,
        extra,
        prompts=prompts,
        metrics=lambda: {"reward_mean": rewards[-1]} if rewards else {},  # this round's batch
    )
    summary["mean_rewards"] = rewards
    return summary
