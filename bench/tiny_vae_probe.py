"""How much of an image statistic survives the tiny VAE. Prints the decoded brightness across
prompts, seeds and guidance, across shifted latents, and through an encode/decode round trip of
inputs of known brightness. A random VAE kept none (0.456..0.461 for everything); the hand-set
one of models/tiny/vae.py keeps it (round trip 0.25 / 0.50 / 0.75 -> 0.2501 / 0.5001 / 0.7501).

    .venv/bin/python bench/tiny_vae_probe.py [--model tiny-sd] [--size 128]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from artloop.tools.diffusion import DiffusionTool
from artloop.tools.images import ImageStore


def brightness(pixels: torch.Tensor) -> list[float]:
    """Mean brightness in [0, 1] of each image of a (B, 3, H, W) batch in [-1, 1]."""
    return ((pixels.clamp(-1, 1) + 1) / 2).mean(dim=(1, 2, 3)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    pipe = DiffusionTool(args.model, store=ImageStore(tempfile.mkdtemp())).pipeline
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    generated = [
        brightness(
            pipe(
                p,
                num_inference_steps=4,
                height=args.size,
                width=args.size,
                guidance_scale=cfg,
                generator=torch.Generator().manual_seed(s),
                output_type="pt",
            ).images
            * 2
            - 1
        )[0]
        for cfg in (1.0, 5.0, 10.0, 20.0)
        for p in ("a fox", "a dark castle at night")
        for s in range(3)
    ]
    print(
        f"generated, 4 guidance x 2 prompts x 3 seeds: brightness "
        f"{min(generated):.4f}..{max(generated):.4f}"
    )
    side = args.size // pipe.vae_scale_factor
    with torch.no_grad():
        for shift in (-3.0, 0.0, 3.0):
            latents = torch.randn((3, 4, side, side), generator=g) + shift
            print(
                f"latents shifted by {shift:+.0f}: decoded brightness "
                f"{[round(b, 4) for b in brightness(pipe.vae.decode(latents).sample)]}"
            )
        x = torch.rand((1, 3, args.size, args.size), generator=g) * 0.5 - 0.25
        for offset in (-0.5, 0.0, 0.5):
            image = x + offset  # brightness 0.25, 0.5, 0.75
            back = pipe.vae.decode(pipe.vae.encode(image).latent_dist.mean).sample
            print(f"round trip: in {brightness(image)[0]:.3f} -> out {brightness(back)[0]:.4f}")


if __name__ == "__main__":
    main()
