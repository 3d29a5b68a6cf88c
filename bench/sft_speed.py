"""artloop's SFT trainer (latents and text embeddings cached once) vs a plain reference loop
that re-encodes every batch through the VAE and text encoder each step, the way diffusers'
train_text_to_image_lora.py does. Same tiny model, data, LoRA and batch; steps/s side by side.

    .venv/bin/python bench/sft_speed.py [--resolution 256] [--steps 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from artloop.tools.diffusion import DiffusionTool
from artloop.tools.images import ImageStore
from artloop.trainers.common import add_lora
from artloop.trainers.families import SDFamily, to_pixels
from artloop.trainers.sft import SFTConfig, diffusion_loss, load_rows, train_sft
from PIL import Image


def make_data(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)) for _ in range(n)
    ]
    (root / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": [f"a red fox, take {i}" for i in range(n)]}
    )
    ds.cast_column("image", datasets.Image()).to_parquet(
        root / "data" / "train-00000-of-00001.parquet"
    )
    return root


def reference_loop(data: Path, cfg: SFTConfig, root: Path) -> float:
    """steps/s of the re-encoding loop."""
    pipe = DiffusionTool(cfg.model, store=ImageStore(root / "img")).pipeline
    rows = load_rows(str(data))
    torch.manual_seed(cfg.seed)
    params = add_lora(pipe.unet, cfg.rank, cfg.lora_alpha)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    family = SDFamily(pipe)  # its DDPM noising and UNet call
    pipe.unet.train()
    start = time.perf_counter()
    for step in range(cfg.train_steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101)
        idx = torch.randint(0, len(rows), (cfg.batch_size,), generator=g).tolist()
        with torch.no_grad():  # what the examples do every step
            pixels = torch.stack([to_pixels(rows[i][0], cfg.resolution) for i in idx])
            latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer(
                [rows[i][1] for i in idx],
                padding="max_length",
                truncation=True,
                max_length=pipe.tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids
            embeddings = pipe.text_encoder(ids)[0]
        loss = diffusion_loss(family, pipe.unet, latents, {"text": embeddings}, g)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return cfg.train_steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds of each")
    parser.add_argument("--out", default="bench/results/sft_speed.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="artloop-sft-bench-"))
    data = make_data(root / "data", args.images, args.resolution)
    ours, ref = [], []
    for r in range(args.rounds):  # alternate, so that machine noise hits both
        cfg = SFTConfig(
            data=str(data),
            output_dir=str(root / f"lora{r}"),
            resolution=args.resolution,
            train_steps=args.steps,
            batch_size=4,
            checkpoint_every=10**9,
        )
        ours.append(train_sft(cfg, progress=False)["steps_per_s"])
        ref.append(reference_loop(data, cfg, root))
    result = {
        "resolution": args.resolution,
        "steps": args.steps,
        "batch_size": 4,
        "artloop_steps_per_s": ours,
        "reference_steps_per_s": ref,
        "ratio": float(np.median(ours) / np.median(ref)),
    }
    print(
        f"sft at {args.resolution}px, batch 4: artloop {np.median(ours):.2f} steps/s, re-encoding "
        f"reference {np.median(ref):.2f} steps/s -> ratio {result['ratio']:.2f}x (goal >= 1.5x)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
