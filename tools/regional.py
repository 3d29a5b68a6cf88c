"""Regional prompting: one image drawn from a global prompt and local prompts in boxes, all
regions in ONE batched denoiser call per step (ArtAug's regional regeneration).

The technique is prediction blending (MultiDiffusion; diffusers' regional prompting community
pipeline, "rp"), for every family. Each step the denoiser runs once on the latents repeated for
[uncond, global, local_1..k] prompts (uncond only when guidance needs it), and the conditional
predictions are blended with the regions' masks at latent (or token) resolution:

    cond = (1 - sum w_i) * global + sum w_i * local_i,   w_i = strength_i inside box i, else 0

(normalised where boxes overlap and the weights add up past 1), then guided against the one
shared uncond prediction. Guidance is linear, so blending guided predictions equals guiding the
blended one: the uncond pass is shared by all regions, and a call with k regions costs k + 2
denoiser rows per image, not 2 (k + 1).

- SD 1.5 / SDXL (UNet, epsilon or v prediction): noise predictions blended on the (B, C, h, w)
  latents; SDXL's pooled embedding and size ids travel with each row.
- FLUX (transformer, flow matching): velocities blended on the packed 2x2-patch tokens, each
  token masked by its patch's cell. Attention masking (EliGen: local prompt tokens attend only to
  image tokens in their box) would be one sequence with all prompts, but needs a custom attention
  processor on every block, tied to diffusers' internals and per-version; blending needs only
  the transformer's public call, is the same code as the UNet's, and batches the same way.

With an init image (img2img) the call starts from the image's latents noised to the call's
strength, as diffusers' img2img does, and each latent cell is redrawn only as much as its
region's strength says (differential diffusion): until its own start step a cell is held at the
init noised to the current level, so cells outside every box end as the init's own latents.
Masks are hard at latent resolution: the boxes come from a planner in 0-1000 units, and a
feathered edge would bleed the local prompt outside its box.
"""

from __future__ import annotations

# Deliberately lazy: torch and diffusers are imported inside the functions that use them, so that
# importing this module (the CLI's --help, the config, a test) does not load them.
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Region:
    """A box (x1, y1, x2, y2 in 0-1000, checked by the caller), its local prompt, and how much
    the local prompt steers inside it (and, img2img, how much of the box is redrawn)."""

    box: tuple[int, int, int, int]
    prompt: str
    strength: float = 1.0


@dataclass(frozen=True)
class Job:
    """One image of a call; the jobs of one call have the same number of regions."""

    prompt: str
    negative_prompt: str | None
    seed: int
    regions: tuple[Region, ...] = ()
    init: Image.Image | None = None


def cells(box: Sequence[int], grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """The grid cells (left, top, right, bottom; exclusive) a 0-1000 box covers; at least one,
    so that a thin box still steers something."""
    x1, y1, x2, y2 = box
    left, top = round(x1 * grid_w / 1000), round(y1 * grid_h / 1000)
    right, bottom = round(x2 * grid_w / 1000), round(y2 * grid_h / 1000)
    left, top = min(left, grid_w - 1), min(top, grid_h - 1)
    return left, top, max(right, left + 1), max(bottom, top + 1)


def region_weights(jobs: Sequence[Job], grid_h: int, grid_w: int) -> np.ndarray:
    """(B, k, h, w): each region's strength inside its box, scaled down where boxes overlap so
    that the local weights at a cell add up to at most 1 (the global prompt keeps the rest)."""
    k = len(jobs[0].regions)
    w = np.zeros((len(jobs), k, grid_h, grid_w), dtype=np.float32)
    for b, job in enumerate(jobs):
        for i, region in enumerate(job.regions):
            left, top, right, bottom = cells(region.box, grid_h, grid_w)
            w[b, i, top:bottom, left:right] = region.strength
    return w / np.maximum(w.sum(axis=1, keepdims=True), 1.0)


def start_steps(
    jobs: Sequence[Job], grid_h: int, grid_w: int, steps: int, first: int
) -> np.ndarray:
    """(B, h, w): the step (of the call's own, which starts at schedule step `first`) from which
    each cell is denoised; a cell outside every box never is (held at the init)."""
    start = np.full((len(jobs), grid_h, grid_w), steps - first, dtype=np.int64)
    for b, job in enumerate(jobs):
        for region in job.regions:
            left, top, right, bottom = cells(region.box, grid_h, grid_w)
            own = max(steps - int(steps * region.strength), first) - first
            patch = start[b, top:bottom, left:right]
            start[b, top:bottom, left:right] = np.minimum(patch, own)
    return start


class _UNet:
    """SD 1.5 / SDXL: the UNet on (B, C, h, w) latents."""

    def __init__(self, pipe: Any, device: Any, max_sequence_length: int | None) -> None:
        self.pipe, self.device = pipe, device
        self.net = pipe.unet
        self.dtype = self.net.dtype
        self.xl = hasattr(pipe, "text_encoder_2")

    def grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor
        return height // f, width // f

    def layout(self, grid: torch.Tensor) -> torch.Tensor:
        """A (..., h, w) map as it multiplies latents: a channel axis before h, w."""
        return grid.unsqueeze(-3)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.xl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                texts, device=self.device, do_classifier_free_guidance=False
            )
            return {"text": embeds, "pooled": pooled}
        embeds, _ = self.pipe.encode_prompt(texts, self.device, 1, False)
        return {"text": embeds}

    def uncond(self, negatives: list[str | None], guidance: float, true_cfg: float):
        """The negative prompts' encodings, or None where guidance is off."""
        if guidance <= 1.0 or self.net.config.time_cond_proj_dim is not None:
            return None
        cond = self.encode([n or "" for n in negatives])
        if self.xl and self.pipe.config.force_zeros_for_empty_prompt:
            # SDXL's unconditional input for an absent negative prompt is zeros.
            for b, n in enumerate(negatives):
                if n is None:
                    for v in cond.values():
                        v[b].zero_()
        return cond

    def noise(self, shape_grid: tuple[int, int], generators: list) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        c = self.net.config.in_channels
        shape = (len(generators), c, *shape_grid)
        return randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample

    def timesteps(self, scheduler: Any, steps: int, tokens: int) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler.timesteps

    def start(self, scheduler: Any, noise: torch.Tensor) -> torch.Tensor:
        return noise * scheduler.init_noise_sigma

    def noised(self, scheduler: Any, init: torch.Tensor, noise: torch.Tensor, t: Any):
        return scheduler.add_noise(init, noise, t.reshape(1).expand(init.shape[0]))

    def predict(self, scheduler: Any, x: torch.Tensor, t: Any, cond: dict, guidance: float):
        x = scheduler.scale_model_input(x, t)
        added = None
        if self.xl:  # the size ids: no crop, original size = target size
            h, w = (n * self.pipe.vae_scale_factor for n in x.shape[-2:])
            ids = _tensor([h, w, 0, 0, h, w], x).expand(x.shape[0], -1)
            added = {"text_embeds": cond["pooled"], "time_ids": ids}
        return self.net(
            x, t, encoder_hidden_states=cond["text"], added_cond_kwargs=added, return_dict=False
        )[0]


class _Flux(_UNet):
    """FLUX: the transformer on packed 2x2-patch tokens (B, h/2 * w/2, 4C), flow matching."""

    def __init__(self, pipe: Any, device: Any, max_sequence_length: int | None) -> None:
        self.pipe, self.device = pipe, device
        self.net = pipe.transformer
        self.dtype = self.net.dtype
        self.max_sequence_length = max_sequence_length or 512
        self.latent_grid = (0, 0)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor * 2  # a token is a 2x2 patch of latents
        self.latent_grid = (2 * (height // f), 2 * (width // f))
        return height // f, width // f

    def layout(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.flatten(-2).unsqueeze(-1)  # (..., tokens, 1)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, ids = self.pipe.encode_prompt(
            texts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"text": embeds, "pooled": pooled, "ids": ids}

    def uncond(self, negatives: list[str | None], guidance: float, true_cfg: float):
        # As FluxPipeline: the negative prompt is a second pass only with true CFG.
        if true_cfg <= 1.0 or any(n is None for n in negatives):
            return None
        return self.encode([str(n) for n in negatives])

    def noise(self, shape_grid: tuple[int, int], generators: list) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        # On the latent grid `grid` set (not the token grid), drawn unpacked, then packed, as FluxPipeline.prepare_latents draws them.
        shape = (len(generators), self.net.config.in_channels // 4, *self.latent_grid)
        return self.pack(
            randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
        )

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pack(super().encode_images(pixels))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        h, w = (n * self.pipe.vae_scale_factor for n in self.latent_grid)
        return super().decode(self.pipe._unpack_latents(latents, h, w, self.pipe.vae_scale_factor))

    def timesteps(self, scheduler: Any, steps: int, tokens: int) -> torch.Tensor:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        kwargs: dict[str, Any] = {}
        if not config.get("use_flow_sigmas"):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if config.get("use_dynamic_shifting"):  # the shift FluxPipeline gives this many tokens
            kwargs["mu"] = calculate_shift(
                tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        scheduler.set_timesteps(steps if "sigmas" not in kwargs else None, self.device, **kwargs)
        return scheduler.timesteps

    def start(self, scheduler: Any, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def noised(self, scheduler: Any, init: torch.Tensor, noise: torch.Tensor, t: Any):
        return scheduler.scale_noise(init, t.reshape(1).expand(init.shape[0]), noise)

    def predict(self, scheduler: Any, x: torch.Tensor, t: Any, cond: dict, guidance: float):
        import torch

        n, (gh, gw) = x.shape[0], (s // 2 for s in self.latent_grid)
        embed = None
        if self.net.config.guidance_embeds:  # FLUX-dev's distilled guidance
            embed = _tensor([guidance], x, torch.float32).expand(n)
        return self.net(
            hidden_states=x,
            timestep=(t.expand(n) / 1000).to(x.dtype),
            guidance=embed,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["text"],
            txt_ids=cond["ids"],
            img_ids=self.pipe._prepare_latent_image_ids(n, gh, gw, x.device, x.dtype),
            return_dict=False,
        )[0]


def _tensor(values: list, like: torch.Tensor, dtype: Any = None) -> torch.Tensor:
    """`values` as a tensor on `like`'s device, in `dtype` (default: `like`'s)."""
    import torch

    return torch.tensor(values, device=like.device, dtype=dtype or like.dtype)


DENOISERS = {"sd": _UNet, "sdxl": _UNet, "flux": _Flux}


def generate(
    pipe: Any,
    family: str,
    jobs: Sequence[Job],
    *,
    width: int,
    height: int,
    num_inference_steps: int,
    guidance_scale: float,
    true_cfg_scale: float = 1.0,
    strength: float | None = None,
    max_sequence_length: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """The jobs' images, (H, W, 3) floats in [0, 1]: text-to-image, or with `strength` from each
    job's init image. One denoiser call per step for all jobs, prompts and regions."""
    import torch

    k = len(jobs[0].regions)
    if any(len(job.regions) != k for job in jobs):
        raise ValueError("the images of one regional call need the same number of regions")
    if strength is not None and any(job.init is None for job in jobs):
        raise ValueError("img2img (a strength) needs an init image for every job")
    device = pipe._execution_device
    net = DENOISERS[family](pipe, device, max_sequence_length)
    # A scheduler of its own: the pipe's is shared with the other pipelines (and holds state).
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    grid_h, grid_w = net.grid(height, width)
    with torch.no_grad():
        # Rows per job: [uncond,] global, local_1..k; the texts are encoded once each.
        texts = [t for job in jobs for t in (job.prompt, *(r.prompt for r in job.regions))]
        unique = list(dict.fromkeys(texts))
        encoded = net.encode(unique)
        cond = {
            key: v if key == "ids" else v[[unique.index(t) for t in texts]]
            for key, v in encoded.items()
        }
        negative = net.uncond([j.negative_prompt for j in jobs], guidance_scale, true_cfg_scale)
        rows = k + 1 + (negative is not None)
        if negative is not None:
            cond = {
                key: v if key == "ids" else _interleave(negative[key], v, k + 1)
                for key, v in cond.items()
            }
        weights = torch.from_numpy(region_weights(jobs, grid_h, grid_w)).to(device, net.dtype)
        weights = net.layout(weights)  # (B, k, ...) as it multiplies a row's prediction

        generators = [torch.Generator(device).manual_seed(job.seed) for job in jobs]
        noise = net.noise((grid_h, grid_w), generators)
        timesteps = net.timesteps(scheduler, num_inference_steps, grid_h * grid_w)
        first, steps_in = 0, num_inference_steps
        if strength is not None:  # img2img: the schedule's last int(steps * strength) steps
            first = num_inference_steps - min(int(num_inference_steps * strength), steps_in)
            timesteps = timesteps[first * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first * scheduler.order)
        if strength is None:
            x, init, hold = net.start(scheduler, noise), None, None
        else:
            pixels = torch.cat(
                [pipe.image_processor.preprocess(j.init, height, width) for j in jobs]
            )
            init = net.encode_images(pixels)
            x = net.noised(scheduler, init, noise, timesteps[:1])
            starts = start_steps(jobs, grid_h, grid_w, num_inference_steps, first)
            hold = net.layout(torch.from_numpy(starts).to(device))  # (B, ...) step of each cell

        n = len(timesteps)
        for i, t in enumerate(timesteps):
            pred = net.predict(scheduler, x.repeat_interleave(rows, dim=0), t, cond, guidance_scale)
            pred = pred.unflatten(0, (len(jobs), rows))
            uncond, pred = (pred[:, 0], pred[:, 1:]) if negative is not None else (None, pred)
            local = (pred[:, 1:] * weights).sum(dim=1)
            blended = pred[:, 0] * (1 - weights.sum(dim=1)) + local
            if uncond is not None:
                scale = true_cfg_scale if family == "flux" else guidance_scale
                blended = uncond + scale * (blended - uncond)
            x = scheduler.step(blended, t, x, return_dict=False)[0]
            if hold is not None:
                # A cell not yet started follows the init, noised to the next step's level
                # (from which it is denoised if that is its start); at the end, a cell never
                # started is the init's latents exactly.
                last = i + 1 == n
                target = init if last else net.noised(scheduler, init, noise, timesteps[i + 1])
                x = torch.where(hold > i, target, x)
            if on_step is not None:
                on_step(i + 1, n)
        images = net.decode(x)
        out = pipe.image_processor.postprocess(images, output_type="np")
    return list(out)


def _interleave(first: torch.Tensor, rest: torch.Tensor, per: int) -> torch.Tensor:
    """Rows [first_0, rest_0..per-1, first_1, rest_per..2per-1, ...]: a job's rows together."""
    import torch

    rest = rest.unflatten(0, (first.shape[0], per))
    return torch.cat([first.unsqueeze(1), rest], dim=1).flatten(0, 1)
