"""DDPO (Black et al. 2023; kvablack/ddpo-pytorch): reinforcement learning on the denoising
chain. Sample images with DDIM (eta > 0) while recording each step's log-probability, score them
with a reward, then push up the log-probability of high-advantage steps with PPO's clipped,
importance-sampled objective. FLUX samples by flow matching, a deterministic ODE; there the chain
is Flow-GRPO's SDE with the same marginals, whose steps are Gaussian with known log-probability.

    artloop train ddpo --data PROMPTS_EXPORT --output-dir LORA_DIR --reward darkness [...]

Reads `artloop export --format prompts` (prompts.txt) or a text file, one prompt per line.

The loop follows ddpo-pytorch's: each round samples gradient_accumulation_steps micro-batches
without gradients (each its own prompts and noise), scores them, gathers the rewards of every
process and turns them into advantages (per prompt once a prompt has stat_min_count rewards,
else over the batch; clipped to adv_clip_max); then for each of inner_epochs optimizer steps, for
each micro-batch, for a timestep_fraction share of the chain's steps (chosen per image) it scores
that one step with gradients and backpropagates it at once, so one step's graph is alive at a
time: memory does not grow with sample_steps. accelerate accumulates the micro-batches' and steps'
gradients into one optimizer step, clipped (common.Run.backward). Approximate KL and the share of
clipped ratios are logged.
"""

from __future__ import annotations

# Deliberately lazy: torch and diffusers are imported inside the functions that use them, so that
# importing this module (the CLI's --help, the config, a test) does not load them.
import math
from collections import deque
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from artloop.rewards import REWARDS, get_reward, reward_entry
from artloop.trainers.common import (
    CheckpointedState,
    LoRATrainConfig,
    Run,
    TrainerConfigError,
    help_field,
    load_base,
    load_prompts,
    run_training,
)
from artloop.trainers.families import Cond, Family, concat, take

if TYPE_CHECKING:  # torch is imported where it runs: the CLI starts without it
    import numpy as np
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
    timestep_fraction: float = help_field(
        1.0,
        help="Share of each image's sampling steps trained on in an inner epoch, chosen at random "
        "per image (ddpo-pytorch's train.timestep_fraction)",
    )
    adv_clip_max: float = help_field(5.0, help="Clip the advantages to [-this, this]")
    per_prompt_stat_tracking: bool = help_field(
        True,
        help="Normalise a reward by its prompt's recent rewards (mean, std) once it has "
        "stat_min_count of them, else by the batch's; off: always by the batch's",
    )
    stat_buffer_size: int = help_field(16, help="Rewards kept per prompt for its statistics")
    stat_min_count: int = help_field(
        16, help="Rewards a prompt needs before its own statistics are used"
    )
    learning_rate: float = help_field(3e-4, help="AdamW learning rate")
    resolution: int = help_field(64, help="Sampled image size")

    @property
    def train_timesteps(self) -> int:
        """Timesteps per image trained on in an inner epoch."""
        return max(1, int(self.sample_steps * self.timestep_fraction))

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
            "timestep_fraction": 0 < self.timestep_fraction <= 1,
            "adv_clip_max": self.adv_clip_max > 0,
            "stat_buffer_size": self.stat_buffer_size >= 1,
            "stat_min_count": self.stat_min_count >= 1,
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
    output: noise, or velocity for a v-prediction scheduler; `t` one timestep, or one per image
    (B,). Given `prev_sample`, scores it instead of sampling (the PPO re-evaluation)."""
    import torch

    alphas = scheduler.alphas_cumprod
    t = torch.as_tensor(t, device=alphas.device)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], scheduler.final_alpha_cumprod)
    a_t, a_prev = (per_image(a, sample) for a in (alphas[t], a_prev))
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


def per_image(value: Any, sample: torch.Tensor) -> torch.Tensor:
    """A number, or one per image (B,), shaped to broadcast over `sample` (B, ...) in float32."""
    import torch

    value = torch.as_tensor(value, dtype=torch.float32)
    return value.reshape(-1, *[1] * (sample.ndim - 1)).to(sample.device)


def flow_sde_step_with_logprob(
    pred: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    sigma_max: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
):
    """One step of the SDE that has rectified flow's marginals (Flow-GRPO, Liu et al. 2025), with
    log p(prev_sample | sample): (B,). `pred` is the velocity n - x0 at flow time `sigma`; the
    step goes to `sigma_next` < sigma (numbers, or one per image: (B,)). noise_level -> 0
    gives the plain Euler (ODE) step."""
    import torch

    sigma, sigma_next, sigma_max = (per_image(v, sample) for v in (sigma, sigma_next, sigma_max))
    dt = sigma_next - sigma  # < 0: from noise (1) towards data (0)
    # sigma_t = a * sqrt(s / (1 - s)); at s = 1 it is infinite, so the first step uses s_max.
    std_t = noise_level * (sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))).sqrt()
    mean = (
        sample * (1 + std_t**2 / (2 * sigma) * dt)
        + pred * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    std = std_t * (-dt).sqrt()
    if prev_sample is None:
        prev_sample = mean + std * torch.randn(sample.shape, generator=generator).to(sample)
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
        - std.log()
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.ndim)))


class Chain:
    """The stochastic sampling chain DDPO scores: DDIM for SD / SDXL, the flow SDE for FLUX.
    `timesteps[i]` is what the denoiser reads at step i; `step(i, ...)` is that step. `i` is
    one step index, or one per image (B,): training scores each image at its own steps."""

    def __init__(self, family: Family, steps: int, eta: float) -> None:
        import torch
        from diffusers import DDIMScheduler

        self.eta, self.flow = eta, family.name == "flux"
        if self.flow:  # flow time from 1 (noise) to 0, evenly spaced
            self.sigmas = torch.linspace(1.0, 0.0, steps + 1)
            self.timesteps = self.sigmas[:-1]
        else:
            # set_alpha_to_one=False (SD 1.5's own setting): with True (the default that SDXL's
            # Euler config falls back to), the last step is deterministic and has no log-prob.
            self.scheduler = DDIMScheduler.from_config(
                family.pipe.scheduler.config, set_alpha_to_one=False
            )
            self.scheduler.set_timesteps(steps)
            self.timesteps = self.scheduler.timesteps

    def step(self, i, pred, sample, g=None, prev_sample=None):
        if self.flow:
            s = self.sigmas
            return flow_sde_step_with_logprob(
                pred, s[i], s[i + 1], s[1], sample, self.eta, g, prev_sample
            )
        return ddim_step_with_logprob(
            self.scheduler, pred, self.timesteps[i], sample, self.eta, g, prev_sample
        )


def guided_prediction(
    family: Family, denoiser, latents, t, cond: Cond, uncond: Cond, guidance: float
):
    """The denoiser's output with classifier-free guidance (FLUX: guidance-distilled, one pass).
    `t`: one timestep, or one per image (B,)."""
    import torch

    if family.name == "flux":
        return family.predict(denoiser, latents, t, cond)
    t = torch.cat([t, t]) if t.ndim else t  # per image: the same for both halves
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


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """Rewards normalised by the batch's mean and standard deviation."""
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


class PerPromptStatTracker:
    """ddpo-pytorch's per-prompt advantages: each prompt keeps its last `buffer_size` rewards;
    once it has `min_count` of them its rewards are normalised by their mean and standard
    deviation, before that by the batch's. A prompt that is easy to satisfy then no longer
    outweighs a hard one."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Advantages of `rewards` (one per image, of `prompts`), after adding them."""
        import numpy as np

        rewards = np.asarray(rewards, dtype=np.float64)
        names = np.array(prompts, dtype=object)
        batch = batch_advantages(rewards)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mine = names == prompt
            seen = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            seen.extend(rewards[mine].tolist())
            if len(seen) < self.min_count:
                advantages[mine] = batch[mine]
            else:
                advantages[mine] = (rewards[mine] - np.mean(seen)) / (np.std(seen) + 1e-6)
        return advantages

    def state(self) -> dict[str, list[float]]:
        return {prompt: list(seen) for prompt, seen in self.stats.items()}

    def load(self, state: dict[str, list[float]]) -> None:
        self.stats = {p: deque(seen, maxlen=self.buffer_size) for p, seen in state.items()}


@dataclass
class Rollout:
    """One micro-batch of a round's samples, on this process."""

    idx: torch.Tensor  # (B,) the prompts' indices
    states: torch.Tensor  # (T + 1, B, C, h, w): the latents chain
    log_probs: torch.Tensor  # (T, B): log p of each step under the policy that sampled
    advantages: torch.Tensor  # (B,)
    order: torch.Tensor  # (inner_epochs, B, K): the chain steps trained on, per epoch and image


class DDPOTrainer:
    """DDPO's step (`train_step`) for common.run_training: a new round of samples every
    inner_epochs optimizer steps, then PPO on one timestep at a time."""

    def __init__(self, cfg: DDPOConfig, family: Family, prompts: list[str]) -> None:
        self.cfg, self.family, self.prompts = cfg, family, prompts
        self.text, self.uncond = family.encode_captions(prompts)
        self.chain = Chain(family, cfg.sample_steps, cfg.eta)
        self.score = get_reward(cfg.reward)
        self.stats = (
            PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)
            if cfg.per_prompt_stat_tracking
            else None
        )
        self.round, self.rollouts, self.reward_mean = -1, [], math.nan
        self.mean_rewards: list[float] = []  # per round sampled by this run
        self.approx_kl: list[float] = []  # per optimizer step
        self.clipfrac: list[float] = []

    def conds(self, idx: torch.Tensor, device: Any) -> tuple[Cond, Cond]:
        """The prompts' encodings and the unconditional one, batch len(idx)."""
        unc = {k: v.to(device).expand(len(idx), *v.shape[1:]) for k, v in self.uncond.items()}
        return take(self.text, idx, device), unc

    def sample(self, run: Run, round_: int) -> None:
        """This round's micro-batches: sampled with the current policy, no gradients; rewards
        gathered from every process into advantages."""
        import numpy as np
        import torch

        cfg, accelerator = self.cfg, run.accelerator
        d, sampled = accelerator.device, []
        for micro in range(cfg.gradient_accumulation_steps):
            g = run.generator(round_ * cfg.inner_epochs, micro)
            idx = torch.randint(0, len(self.prompts), (cfg.batch_size,), generator=g)
            cond, unc = self.conds(idx, d)
            states, log_probs, images = sample_with_logprobs(
                self.family, run.unet, self.chain, cond, unc, cfg, g
            )
            rewards, _ = self.score(images, [self.prompts[i] for i in idx], [{} for _ in idx])
            # Each image's own random steps for each inner epoch (ddpo-pytorch's permutation).
            order = torch.stack(
                [
                    torch.randperm(cfg.sample_steps, generator=g)[: cfg.train_timesteps]
                    for _ in range(cfg.inner_epochs * cfg.batch_size)
                ]
            ).view(cfg.inner_epochs, cfg.batch_size, -1)
            sampled.append((idx, states, log_probs, np.asarray(rewards, np.float32), order))
        ids = torch.cat([s[0] for s in sampled]).to(d)
        rewards = torch.as_tensor(np.concatenate([s[3] for s in sampled])).to(d)
        all_ids, all_rewards = (accelerator.gather(x).cpu().numpy() for x in (ids, rewards))
        advantages = (
            self.stats.update([self.prompts[i] for i in all_ids], all_rewards)
            if self.stats
            else batch_advantages(all_rewards.astype(np.float64))
        )
        advantages = np.clip(advantages, -cfg.adv_clip_max, cfg.adv_clip_max)
        mine = torch.as_tensor(advantages, dtype=torch.float32).view(accelerator.num_processes, -1)
        mine = mine[accelerator.process_index].split(cfg.batch_size)
        self.rollouts = [
            Rollout(idx, states, log_probs, adv, order)
            for (idx, states, log_probs, _, order), adv in zip(sampled, mine, strict=True)
        ]
        self.round, self.reward_mean = round_, float(all_rewards.mean())
        self.mean_rewards.append(self.reward_mean)

    def train_step(self, run: Run) -> dict[str, float]:
        """One optimizer step: every micro-batch of the round, each at its images' chosen
        steps, one step's graph at a time."""
        import torch

        cfg = self.cfg
        if run.step // cfg.inner_epochs != self.round:  # PPO: a round serves inner_epochs steps
            self.sample(run, run.step // cfg.inner_epochs)
        epoch, d = run.step % cfg.inner_epochs, run.accelerator.device
        losses, kls, clipped = [], [], []
        for r in self.rollouts:
            cond, unc = self.conds(r.idx, d)
            images, adv = torch.arange(len(r.idx)), r.advantages.to(d)
            for k in range(cfg.train_timesteps):
                j = r.order[epoch, :, k]  # each image's chain step
                with run.accelerator.accumulate(run.unet):
                    x, x_next = r.states[j, images].to(d), r.states[j + 1, images].to(d)
                    t = self.chain.timesteps[j].to(d)
                    pred = guided_prediction(
                        self.family, run.unet, x, t, cond, unc, cfg.guidance_scale
                    )
                    _, log_prob = self.chain.step(j, pred, x, prev_sample=x_next)
                    old = r.log_probs[j, images].to(d)
                    loss = ppo_loss(log_prob, old, adv, cfg.clip_range)
                    run.backward(loss)
                with torch.no_grad():  # ddpo-pytorch's diagnostics
                    diff = log_prob.detach() - old
                    kls.append(0.5 * (diff**2).mean().item())
                    clipped.append(((diff.exp() - 1).abs() > cfg.clip_range).float().mean().item())
                losses.append(loss.item())
        self.approx_kl.append(sum(kls) / len(kls))
        self.clipfrac.append(sum(clipped) / len(clipped))
        return {
            "loss": sum(losses) / len(losses),
            "reward_mean": self.reward_mean,
            "approx_kl": self.approx_kl[-1],
            "clipfrac": self.clipfrac[-1],
        }

    def checkpointed(self) -> CheckpointedState:
        """The round's samples and the reward statistics, so that a run resumed inside a round
        goes on with the same samples. (Each process's samples are its own: with several
        processes only the main one's are saved, and the others sample afresh.)"""

        def save() -> tuple[dict, dict[str, Any]]:
            tensors = {
                f"rollout.{m}.{name}": getattr(r, name)
                for m, r in enumerate(self.rollouts)
                for name in (f.name for f in fields(Rollout))
            }
            meta = {"round": self.round, "reward_mean": self.reward_mean}
            return {**meta, "stats": self.stats.state() if self.stats else {}}, tensors

        def load(meta: dict, tensors: dict[str, Any]) -> None:
            from accelerate import PartialState  # the processes' shared state

            if self.stats:
                self.stats.load(meta.get("stats", {}))
            rollouts = [
                Rollout(*(tensors[f"rollout.{m}.{f.name}"] for f in fields(Rollout)))
                for m in range(self.cfg.gradient_accumulation_steps)
                if f"rollout.{m}.idx" in tensors
            ]
            if rollouts and PartialState().is_main_process:  # the saved samples are its own
                self.rollouts, self.round = rollouts, meta["round"]
                self.reward_mean = meta["reward_mean"]

        return CheckpointedState(save, load)


def train_ddpo(cfg: DDPOConfig, progress: bool = True) -> dict[str, Any]:
    """Train; returns a summary (steps, losses, mean rewards per round, approximate KL and
    clipped share per step, the LoRA file)."""
    prompts = load_prompts(cfg.data, "DDPOConfig.data")  # bad data fails before the model loads
    family = load_base(cfg)
    trainer = DDPOTrainer(cfg, family, prompts)
    identity = reward_entry(cfg.reward).identity()  # its range, direction and model weights
    return run_training(
        cfg,
        family,
        "ddpo",
        trainer.train_step,
        progress=progress,
        extra=lambda: {
            "examples": len(prompts),
            "reward": identity,
            "mean_rewards": trainer.mean_rewards,
            "approx_kl": trainer.approx_kl,
            "clipfrac": trainer.clipfrac,
        },
        prompts=prompts,
        # one backward pass per micro-batch and trained timestep, one optimizer step for all
        accumulation_steps=cfg.gradient_accumulation_steps * cfg.train_timesteps,
        state=trainer.checkpointed(),
    )
