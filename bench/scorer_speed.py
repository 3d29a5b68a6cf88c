"""Scorer throughput on the tiny twins, side by side in one run: images/s scoring N images in
batches of `scorers.batch_size` vs one call per image, for each CLIP-family scorer, ImageReward
and the VQA score answered by BLIP-2 (one question an image, given in the metadata, so that only
the answerer is timed), and any other registered scorer named with --scorers whose tiny twin is
given with --model name=tiny-x.

    .venv/bin/python bench/scorer_speed.py [--images 64] [--batch-size 16] [--device cpu]

Prints a table (scorer, batched images/s, one-at-a-time images/s, ratio). The tiny models
measure the per-call overhead the batching removes, not a real model's compute.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from artloop.config import ScorersConfig
from artloop.models.tiny.clip import COLOURS
from artloop.rewards import clip as _clip  # noqa: F401  # registers the CLIP-family scorers
from artloop.rewards import hps as _hps  # noqa: F401  # registers hpsv2
from artloop.rewards import imagereward as _ir  # noqa: F401  # registers imagereward
from artloop.rewards import vqa as _vqa  # noqa: F401  # registers vqa
from artloop.rewards.registry import configure_scorers, reward_entry
from PIL import Image

TINY = {
    "clip": "tiny-clip",
    "pickscore": "tiny-clip",
    "aesthetic": "tiny-aesthetic",
    "hpsv2": "tiny-hps",
    "imagereward": "tiny-imagereward",
    "vqa": "tiny-blip2",
}


def _images(n: int, size: int) -> tuple[list[Image.Image], list[str], list[dict]]:
    rng = np.random.default_rng(0)
    images, prompts, meta = [], [], []
    for i in range(n):
        name, rgb = COLOURS[i % len(COLOURS)]
        a = np.clip(np.array(rgb) + rng.integers(-20, 21, size=(size, size, 3)), 0, 255)
        images.append(Image.fromarray(a.astype(np.uint8)))
        prompts.append(f"a {name} painting")
        meta.append({"vqa_questions": [f"Is the picture {name}?"]})
    return images, prompts, meta


def _rate(fn, images, prompts, meta, one_at_a_time: bool, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        if one_at_a_time:
            for im, p, m in zip(images, prompts, meta, strict=True):
                fn([im], [p], [m])
        else:
            fn(images, prompts, meta)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="image side, pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scorers", default=",".join(TINY))
    parser.add_argument("--model", action="append", default=[], help="name=tiny-x (repeatable)")
    args = parser.parse_args()
    models = dict(TINY, **dict(m.split("=", 1) for m in args.model))
    configure_scorers(ScorersConfig(device=args.device, batch_size=args.batch_size, models=models))
    images, prompts, meta = _images(args.images, args.size)
    rows = []
    for name in args.scorers.split(","):
        fn = reward_entry(name).fn
        fn(images[:2], prompts[:2], meta[:2])  # load (and build the tiny twin) before timing
        batched = _rate(fn, images, prompts, meta, False, args.repeats)
        single = _rate(fn, images, prompts, meta, True, args.repeats)
        rows.append((name, models.get(name, "?"), batched, single))
    print(
        f"{args.images} images of {args.size}px, batch {args.batch_size}, device {args.device}, "
        f"best of {args.repeats}"
    )
    print(f"{'scorer':<12}{'model':<16}{'batched img/s':>15}{'one-by-one img/s':>18}{'ratio':>8}")
    for name, model, batched, single in rows:
        print(f"{name:<12}{model:<16}{batched:>15.1f}{single:>18.1f}{batched / single:>8.2f}")


if __name__ == "__main__":
    main()
