"""Regional prompting: one image drawn from a global prompt and local prompts in boxes, all
regions in ONE batched denoiser call per step (ArtAug's regional regeneration).

Two techniques (generate's `technique`; TECHNIQUE gives each family's default):

- "attention" (the default for every family): ONE conditional row whose text is the global
  prompt's tokens followed by each local prompt's, and masked attention that ties each local
  prompt to its box. The denoiser runs on [uncond, cond] as plain text-to-image does (the uncond
  row's text is padded with zeros to the same length, which no query sees), so the extra cost
  is only the longer text sequence and the mask.
  - SD 1.5 / SDXL (UNet): the cross-attention layers (attn2) get a processor for the call only
    (the originals restored after it; the tool runs pipeline calls under its lock, so a plain
    call never sees it). Per image-token query, the keys are masked: a query inside box i sees
    the global tokens and local_i's (overlapping boxes: each's), a query outside every box only
    the global tokens. The mask is built at each UNet level's (h, w), found from the query length
    by halving the latent grid (rounding up, as the UNet's stride-2 convolutions do). SDXL's
    pooled embedding is the global prompt's. The self-attention layers are untouched.
  - FLUX (joint attention, EliGen): text = the global prompt's tokens (max_sequence_length) then
    each local prompt's (LOCAL_TOKENS, so the sequence grows little), text ids zeros as FLUX's.
    Image tokens see the image, the global text and local_i's text where inside box i; local_i's
    text sees itself and the image tokens in box i; the global text sees itself and the whole
    image. Prompts do not see each other (as EliGen): global text seeing local text would carry
    the local prompts into the global stream and from it to every image token. The mask goes
    through the transformer's `joint_attention_kwargs` to the stock FluxAttnProcessor (double and
    single blocks), which passes it to scaled_dot_product_attention: no processor is swapped.
  A region's strength s weights its local tokens by an additive log-bias log(s) on the image
  queries' logits for them (s = 1: the mask alone): each local token's softmax weight is scaled
  by s against the global tokens', before normalisation, so s -> 0 fades the region to the
  global prompt alone.

- "blend" (prediction blending, MultiDiffusion; diffusers' regional prompting community pipeline,
  "rp"): each step the denoiser runs on the latents repeated for [uncond, global, local_1..k]
  and the conditional predictions are blended with the regions' masks at latent (or token)
  resolution, cond = (1 - sum w_i) * global + sum w_i * local_i (w_i = strength_i inside box i,
  normalised where the weights add up past 1), then guided against the shared uncond. A call
  with k regions costs k + 2 denoiser rows per image, not 2: kept as the alternative (each local
  prompt is a full, independent prediction: the strongest steering, at that price).

Cost, against a plain text-to-image call of the same size and steps (bench/regional_cost.py,
CPU, one thread, this process's CPU time, median of 7; a machine shared with other work, so
the tiny models' figures move by about 0.1-0.2x from run to run; the issue's target: 1.3x):

    model (size, steps)              attention 1 / 3 regions    blend 1 / 3 regions
    tiny-shapes-sd (64 px, 20)       1.11x / 1.22x              1.29x / 1.65x
    tiny-sd (256 px, 8)              1.06x / 1.17x              1.17x / 1.78x
    tiny-flux (256 px, 8)            0.94x / 1.03x              1.02x / 1.15x
    SD 1.5's UNet + CLIP-L (512, 2)  1.04x / 1.04x (of 4)       1.43x / 2.37x (wall, of 3)

At full size the denoiser is compute-bound: blending's k + 2 rows cost (k + 2) / 2, while
the attention technique adds only k * 77 keys to the cross-attention (the UNet) or k *
LOCAL_TOKENS tokens to the joint sequence (FLUX: +4% at 1024 px with 3 regions) and the mask.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


TECHNIQUES = ("attention", "blend")
TECHNIQUE = {"sd": "attention", "sdxl": "attention", "flux": "attention"}  # each family's default
LOCAL_TOKENS = 64  # FLUX: a local prompt's T5 tokens (the global prompt keeps its own length)


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


def inside_boxes(jobs: Sequence[Job], grid_h: int, grid_w: int, device: Any) -> torch.Tensor:
    """(B, k, h * w) bools: the grid's cells (row-major, as the tokens of an image) in each box."""
    import torch

    k = len(jobs[0].regions)
    out = torch.zeros((len(jobs), k, grid_h, grid_w), dtype=torch.bool)
    for b, job in enumerate(jobs):
        for i, region in enumerate(job.regions):
            left, top, right, bottom = cells(region.box, grid_h, grid_w)
            out[b, i, top:bottom, left:right] = True
    return out.flatten(-2).to(device)


def _local_bias(jobs: Sequence[Job], like: torch.Tensor) -> torch.Tensor:
    """(B, k): each region's logit bias on its local tokens, log(strength)."""
    import math

    return _tensor([[math.log(r.strength) for r in job.regions] for job in jobs], like)


def cross_attention_bias(
    jobs: Sequence[Job], spans: Sequence[int], grid_h: int, grid_w: int, like: Any
) -> torch.Tensor:
    """UNet cross-attention: the additive bias (B, 1, h * w, sum(spans)) of each image query of
    a job's conditional row on each text key; spans: the global prompt's token count, then each
    local prompt's."""
    import torch

    inside = inside_boxes(jobs, grid_h, grid_w, like.device)  # (B, k, N)
    n, length, start = grid_h * grid_w, sum(spans), spans[0]
    bias = torch.full((len(jobs), n, length), -torch.inf, device=like.device, dtype=like.dtype)
    bias[:, :, :start] = 0
    for i, (span, strength) in enumerate(zip(spans[1:], _local_bias(jobs, like).T, strict=True)):
        local = torch.where(inside[:, i, :, None], strength[:, None, None], -torch.inf)
        bias[:, :, start : start + span] = local
        start += span
    return bias.unsqueeze(1)


def joint_attention_mask(
    jobs: Sequence[Job], spans: Sequence[int], grid_h: int, grid_w: int, uncond: bool, like: Any
) -> torch.Tensor:
    """FLUX joint attention over [text, image] tokens (EliGen): the additive mask (B * rows, 1,
    L, L), rows [uncond,] cond per job; spans as cross_attention_bias's. The uncond row's text
    past its own tokens is padding: no query sees it (its own queries see what the global's do)."""
    import torch

    inside = inside_boxes(jobs, grid_h, grid_w, like.device)  # (B, k, N)
    text, total = sum(spans), sum(spans) + grid_h * grid_w
    b, g = len(jobs), spans[0]
    mask = torch.full((b, total, total), -torch.inf, device=like.device, dtype=like.dtype)
    mask[:, :g, :g] = 0  # the global text: itself and the whole image
    mask[:, :g, text:] = 0
    mask[:, text:, :g] = 0  # the image: the global text and the whole image
    mask[:, text:, text:] = 0
    start = g
    for i, (span, strength) in enumerate(zip(spans[1:], _local_bias(jobs, like).T, strict=True)):
        end, box = start + span, inside[:, i]
        mask[:, start:end, start:end] = 0  # local_i's text: itself and its box
        mask[:, start:end, text:] = torch.where(box[:, None, :], 0.0, -torch.inf)
        # The image inside box i: local_i's text, weighted by the region's strength.
        mask[:, text:, start:end] = torch.where(
            box[:, :, None], strength[:, None, None], -torch.inf
        )
        start = end
    if uncond:
        padding = torch.full_like(mask, -torch.inf)
        padding[:, :, :g] = 0
        padding[:, :, text:] = 0
        mask = torch.stack([padding, mask], dim=1).flatten(0, 1)
    return mask.unsqueeze(1)


class _MaskedCrossAttention:
    """A UNet cross-attention (attn2) processor for one regional call: diffusers'
    AttnProcessor2_0 with the call's bias on the conditional rows' text keys, for the query grid
    of the layer's level (`bias(query_length)`), broadcast over the heads. With `uncond` (rows
    [uncond, cond] per job) the uncond rows attend their own first `own` tokens, unmasked, as in
    a plain call: their padding costs nothing in the attention."""

    def __init__(self, bias: Callable[[int], torch.Tensor], uncond: bool, own: int) -> None:
        self.bias, self.uncond, self.own = bias, uncond, own

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("regional attention needs a cross-attention layer without a mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.uncond:
            u, c = slice(0, None, 2), slice(1, None, 2)
            out = torch.empty_like(query)
            own = slice(0, self.own)
            out[u] = F.scaled_dot_product_attention(query[u], key[u, :, own], value[u, :, own])
            out[c] = F.scaled_dot_product_attention(
                query[c], key[c], value[c], attn_mask=self.bias(length)
            )
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=self.bias(length))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


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

    def joint(self, jobs: Sequence[Job]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Attention technique: one conditional row per job, its text the global prompt's tokens
        then each local prompt's (pooled: the global's); and the token count of each prompt."""
        b, k = len(jobs), len(jobs[0].regions)
        texts = [t for job in jobs for t in (job.prompt, *(r.prompt for r in job.regions))]
        encoded = _encoded(self.encode, texts)
        cond = {"text": encoded["text"].unflatten(0, (b, k + 1)).flatten(1, 2)}
        if "pooled" in encoded:
            cond["pooled"] = encoded["pooled"][:: k + 1]
        return cond, [encoded["text"].shape[1]] * (k + 1)

    @contextmanager
    def attend(
        self, jobs: Sequence[Job], spans: list[int], uncond: bool, grid: tuple[int, int]
    ) -> Iterator[dict]:
        """The masked cross-attention processor on every attn2 layer for the call, the original
        processors restored after it."""
        import torch

        levels, (h, w) = {}, grid
        while True:  # each UNet level's grid by its token count: halved, rounding up
            levels.setdefault(h * w, (h, w))
            if h == w == 1:
                break
            h, w = (h + 1) // 2, (w + 1) // 2
        like = torch.empty(0, device=self.device, dtype=self.dtype)
        biases: dict[int, torch.Tensor] = {}

        def bias(length: int) -> torch.Tensor:
            if length not in biases:
                if length not in levels:
                    raise ValueError(f"no UNet level of {grid} latents has {length} tokens")
                biases[length] = cross_attention_bias(jobs, spans, *levels[length], like)
            return biases[length]

        processor = _MaskedCrossAttention(bias, uncond, spans[0])
        layers = [
            m
            for m in self.net.modules()
            if getattr(m, "is_cross_attention", False) and hasattr(m, "set_processor")
        ]
        saved = [m.processor for m in layers]
        try:
            for m in layers:
                m.set_processor(processor)
            yield {}
        finally:
            for m, original in zip(layers, saved, strict=True):
                m.set_processor(original)

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

    def predict(
        self, scheduler: Any, x: torch.Tensor, t: Any, cond: dict, guidance: float, **extra: Any
    ) -> torch.Tensor:
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

    def encode(self, texts: list[str], length: int | None = None) -> dict[str, torch.Tensor]:
        embeds, pooled, ids = self.pipe.encode_prompt(
            texts,
            prompt_2=None,
            device=self.device,
            max_sequence_length=length or self.max_sequence_length,
        )
        return {"text": embeds, "pooled": pooled, "ids": ids}

    def joint(self, jobs: Sequence[Job]) -> tuple[dict[str, torch.Tensor], list[int]]:
        import torch

        b, k = len(jobs), len(jobs[0].regions)
        cond = _encoded(self.encode, [job.prompt for job in jobs])
        length = min(LOCAL_TOKENS, self.max_sequence_length)
        local = _encoded(
            lambda texts: self.encode(texts, length),
            [r.prompt for job in jobs for r in job.regions],
        )["text"]
        cond["text"] = torch.cat([cond["text"], local.unflatten(0, (b, k)).flatten(1, 2)], dim=1)
        ids = cond["ids"]
        cond["ids"] = ids.new_zeros((cond["text"].shape[1], ids.shape[-1]))  # FLUX's: zeros
        return cond, [ids.shape[0]] + [local.shape[1]] * k

    @contextmanager
    def attend(
        self, jobs: Sequence[Job], spans: list[int], uncond: bool, grid: tuple[int, int]
    ) -> Iterator[dict]:
        """The joint attention mask, through the transformer's joint_attention_kwargs to its
        stock processors."""
        import torch

        like = torch.empty(0, device=self.device, dtype=self.dtype)
        mask = joint_attention_mask(jobs, spans, *grid, uncond, like)
        yield {"joint_attention_kwargs": {"attention_mask": mask}}

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

    def predict(
        self, scheduler: Any, x: torch.Tensor, t: Any, cond: dict, guidance: float, **extra: Any
    ) -> torch.Tensor:
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
            **extra,
        )[0]


def _tensor(values: list, like: torch.Tensor, dtype: Any = None) -> torch.Tensor:
    """`values` as a tensor on `like`'s device, in `dtype` (default: `like`'s)."""
    import torch

    return torch.tensor(values, device=like.device, dtype=dtype or like.dtype)


def _encoded(encode: Callable, texts: list[str]) -> dict[str, torch.Tensor]:
    """encode(texts) with each distinct text encoded once; "ids" (one for all rows) as is."""
    unique = list(dict.fromkeys(texts))
    rows = [unique.index(t) for t in texts]
    return {key: v if key == "ids" else v[rows] for key, v in encode(unique).items()}


def _padded(negative: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The uncond rows' text padded with zeros to the joint text's length (masked out)."""
    import torch

    text = negative["text"]
    pad = text.new_zeros((text.shape[0], length - text.shape[1], text.shape[2]))
    return {**negative, "text": torch.cat([text, pad], dim=1)}


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
    technique: str | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """The jobs' images, (H, W, 3) floats in [0, 1]: text-to-image, or with `strength` from each
    job's init image. One denoiser call per step for all jobs, prompts and regions; `technique`:
    "attention" or "blend" (None: the family's, TECHNIQUE). Without regions both are the
    pipeline's own text-to-image."""
    import torch

    k = len(jobs[0].regions)
    if any(len(job.regions) != k for job in jobs):
        raise ValueError("the images of one regional call need the same number of regions")
    if strength is not None and any(job.init is None for job in jobs):
        raise ValueError("img2img (a strength) needs an init image for every job")
    technique = technique or TECHNIQUE[family]
    if technique not in TECHNIQUES:
        raise ValueError(f"regional technique {technique!r} is not one of {TECHNIQUES}")
    attend = technique == "attention" and k > 0
    device = pipe._execution_device
    net = DENOISERS[family](pipe, device, max_sequence_length)
    # A scheduler of its own: the pipe's is shared with the other pipelines (and holds state).
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    grid_h, grid_w = net.grid(height, width)
    with torch.no_grad():
        # Conditional rows per job: attention, one (all prompts' tokens); blend, global and
        # local_1..k. Each text is encoded once.
        if attend:
            cond, spans = net.joint(jobs)
            per = 1
        else:
            texts = [t for job in jobs for t in (job.prompt, *(r.prompt for r in job.regions))]
            cond, spans, per = _encoded(net.encode, texts), [], k + 1
        negative = net.uncond([j.negative_prompt for j in jobs], guidance_scale, true_cfg_scale)
        rows = per + (negative is not None)  # [uncond,] then the conditional rows
        if negative is not None:
            if attend:
                negative = _padded(negative, cond["text"].shape[1])
            cond = {
                key: v if key == "ids" else _interleave(negative[key], v, per)
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
        masked = nullcontext({})
        if attend:  # the mask (and UNet: the processors) for this call only
            masked = net.attend(jobs, spans, negative is not None, (grid_h, grid_w))
        with masked as extra:
            for i, t in enumerate(timesteps):
                x_in = x.repeat_interleave(rows, dim=0)
                pred = net.predict(scheduler, x_in, t, cond, guidance_scale, **extra)
                pred = pred.unflatten(0, (len(jobs), rows))
                uncond, pred = (pred[:, 0], pred[:, 1:]) if negative is not None else (None, pred)
                mixed = pred[:, 0]  # attention: the one conditional row
                if not attend:
                    local = (pred[:, 1:] * weights).sum(dim=1)
                    mixed = mixed * (1 - weights.sum(dim=1)) + local
                if uncond is not None:
                    scale = true_cfg_scale if family == "flux" else guidance_scale
                    mixed = uncond + scale * (mixed - uncond)
                x = scheduler.step(mixed, t, x, return_dict=False)[0]
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
