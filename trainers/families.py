"""What differs between model families when training a LoRA: which network is the denoiser,
how images and prompts are encoded (once, then cached), how a training example is noised, how
the denoiser is called, and how its LoRA is saved so that `pipe.load_lora_weights` loads it.

- SD 1.5: the UNet; DDPM noising with an epsilon or velocity target.
- SDXL: the same, plus the pooled text embedding and the size/crop "time ids" the UNet reads.
- FLUX: the transformer on 2x2-packed latent patches; rectified flow: x_s = (1 - s) x0 + s n
  at s ~ U(0, 1), target n - x0 (diffusers' train_dreambooth_lora_flux.py, uniform weighting).

A prompt encoding is a `Cond`: a dict of tensors with the prompt count as first dimension, so
that trainers index, batch and drop captions without knowing the family.
"""

from __future__ import annotations

# Deliberately lazy: torch and diffusers are imported inside the functions that use them, so that
# importing this module (the CLI's --help, the config, a test) does not load them.
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:  # torch is imported where it runs: the CLI starts without it
    import torch

Cond = dict[str, "torch.Tensor"]


def take(cond: Cond, idx: torch.Tensor, device: Any) -> Cond:
    """The rows `idx` of every tensor in `cond`, on `device`."""
    return {k: v[idx].to(device) for k, v in cond.items()}


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a (possibly accelerate-wrapped) module's weights are."""
    return next(module.parameters()).device


def concat(*conds: Cond) -> Cond:
    """Conds stacked along the batch (for classifier-free guidance's two halves)."""
    import torch

    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


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


class SDFamily:
    """SD 1.5 (and the base of SDXL): UNet, DDPM noising, CLIP hidden states."""

    name = "sd"
    component = "unet"  # the pipeline's denoiser, as diffusers' LoRA loaders name it

    def __init__(self, pipe: Any, max_sequence_length: int | None = None) -> None:
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # for training noise

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.component)

    def encode_images(self, images: list[Image.Image], size: int) -> torch.Tensor:
        """VAE latents, scaled as the denoiser sees them: (N, C, size/8, size/8)."""
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            pixels = torch.stack([to_pixels(img, size) for img in images]).to(vae.device, vae.dtype)
            latents = vae.encode(pixels).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Images from scaled latents (N, C, h, w)."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")

    def encode_texts(self, texts: list[str]) -> Cond:
        """{"text": (N, 77, D)} from the pipeline's own encode_prompt."""
        import torch

        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(texts, self.pipe.text_encoder.device, 1, False)
        return {"text": embeds.float()}

    def encode_captions(self, texts: list[str]) -> tuple[Cond, Cond]:
        """The captions' encodings (batch N) and the unconditional prompt's (batch 1): what
        guidance subtracts and caption dropout stands in. One encoder pass for both."""
        both = self.encode_texts([*texts, ""])
        return {k: v[:-1] for k, v in both.items()}, {k: v[-1:] for k, v in both.items()}

    def sample_noise(self, latents: torch.Tensor, g: torch.Generator):
        """Gaussian noise like `latents` and a training timestep per example: (B,)."""
        import torch

        noise = torch.randn(latents.shape, generator=g).to(latents)
        t = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g
        ).to(latents.device)
        return noise, t

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(noisy latents, the denoiser's target: the noise, or the velocity)."""
        s = self.scheduler
        target = (
            s.get_velocity(latents, noise, t)
            if s.config.prediction_type == "v_prediction"
            else noise
        )
        return s.add_noise(latents, noise, t), target

    def predict(self, denoiser: Any, noisy: torch.Tensor, t: torch.Tensor, cond: Cond):
        return denoiser(noisy, t, encoder_hidden_states=cond["text"]).sample

    def lora_layers(self, denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The LoRA's tensors as this family's `save_lora_weights` takes them."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))

    def save_lora(self, denoiser: torch.nn.Module, out_dir: Any) -> None:
        """The LoRA in diffusers' layout, with its adapter config (rank, alpha, targets) in the
        file's metadata: without it `load_lora_weights` assumes alpha = rank, which loads a LoRA
        trained at another alpha at the wrong strength. The targets are sorted (peft keeps a
        set), so that the same training writes the same bytes (the same sha256)."""
        metadata = denoiser.peft_config["default"].to_dict()
        if isinstance(metadata.get("target_modules"), set | list | tuple):
            metadata["target_modules"] = sorted(metadata["target_modules"])
        type(self.pipe).save_lora_weights(
            out_dir,
            safe_serialization=True,
            **{
                f"{self.component}_lora_layers": self.lora_layers(denoiser),
                f"{self.component}_lora_adapter_metadata": metadata,
            },
        )


class SDXLFamily(SDFamily):
    """SDXL: two text encoders; the UNet also reads the pooled embedding and the time ids."""

    name = "sdxl"

    def encode_texts(self, texts: list[str]) -> Cond:
        """{"text": (N, 77, D1 + D2), "pooled": (N, P)}."""
        import torch

        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                texts, device=self.pipe.text_encoder_2.device, do_classifier_free_guidance=False
            )
        return {"text": embeds.float(), "pooled": pooled.float()}

    def encode_captions(self, texts: list[str]) -> tuple[Cond, Cond]:
        cond, empty = super().encode_captions(texts)
        if self.pipe.config.force_zeros_for_empty_prompt:  # SDXL's unconditional input is zeros
            empty = {k: v.zero_() for k, v in empty.items()}
        return cond, empty

    def predict(self, denoiser: Any, noisy: torch.Tensor, t: torch.Tensor, cond: Cond):
        import torch

        # Trained at a square crop of the whole image: original = target size, crop at (0, 0).
        side_h, side_w = (n * self.pipe.vae_scale_factor for n in noisy.shape[-2:])
        time_ids = torch.tensor([side_h, side_w, 0, 0, side_h, side_w], dtype=noisy.dtype)
        added = {
            "text_embeds": cond["pooled"],
            "time_ids": time_ids.to(noisy.device).expand(noisy.shape[0], -1),
        }
        return denoiser(
            noisy, t, encoder_hidden_states=cond["text"], added_cond_kwargs=added
        ).sample


class FluxFamily(SDFamily):
    """FLUX.1: the transformer over packed latents, rectified-flow noising."""

    name = "flux"
    component = "transformer"
    guidance = 3.5  # FLUX-dev's distilled guidance while training (diffusers' example default)

    def __init__(self, pipe: Any, max_sequence_length: int | None = None) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length or 512

    def encode_texts(self, texts: list[str]) -> Cond:
        """{"text": (N, L, D) T5 states, "pooled": (N, P) CLIP pooled}."""
        import torch

        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(
                texts,
                prompt_2=None,
                device=self.pipe.text_encoder.device,
                max_sequence_length=self.max_sequence_length,
            )
        return {"text": embeds.float(), "pooled": pooled.float()}

    def sample_noise(self, latents: torch.Tensor, g: torch.Generator):
        """Gaussian noise like `latents` and a flow time s ~ U(0, 1) per example: (B,)."""
        import torch

        noise = torch.randn(latents.shape, generator=g).to(latents)
        return noise, torch.rand(latents.shape[0], generator=g).to(latents)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        s = t.view(-1, *[1] * (latents.ndim - 1))
        return (1 - s) * latents + s * noise, noise - latents

    def predict(self, denoiser: Any, noisy: torch.Tensor, t: torch.Tensor, cond: Cond):
        """The velocity for unpacked latents (B, C, h, w): packs them into (B, h/2 * w/2, 4C)
        tokens, runs the transformer, unpacks."""
        import torch

        b, c, h, w = noisy.shape
        tokens = self.pipe._pack_latents(noisy, b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(cond["text"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        model = getattr(denoiser, "module", denoiser)  # accelerate may wrap it
        guidance = (
            torch.full((b,), self.guidance, device=noisy.device)
            if model.config.guidance_embeds
            else None
        )
        out = denoiser(
            hidden_states=tokens,
            timestep=t.expand(b),
            guidance=guidance,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["text"],
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)

    def lora_layers(self, denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)  # FLUX's loader reads PEFT's layout as is


Family = SDFamily  # the interface the others override
FAMILIES: dict[str, type[Family]] = {f.name: f for f in (SDFamily, SDXLFamily, FluxFamily)}
