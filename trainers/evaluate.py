"""`artloop eval`: the base model vs base + each LoRA, on fixed prompts and seeds, scored by
name (the reward registry); writes results.json, results.md and an image grid.

    artloop eval --prompts prompts.txt --lora loras/sft --lora loras/dpo --scorers darkness,contrast
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from artloop.rewards import get_reward, reward_entry, split_names
from artloop.tools.diffusion import DiffusionTool, GenParams
from artloop.tools.images import ImageStore
from artloop.trainers.common import (
    TrainerConfigError,
    check_lora,
    help_field,
    load_lora,
    load_prompts,
)
from PIL import Image


@dataclass
class EvalConfig:
    """Compare the base model with base + LoRA(s) on fixed prompts and seeds."""

    prompts: str = help_field("", help="Prompts: a text file (one per line) or a prompts export")
    lora: list[str] = field(
        default_factory=list,
        metadata={"help": "A LoRA: its directory or .safetensors file (repeat)"},
    )
    output_dir: str = help_field("artloop-eval", help="Where results.json/.md and grid.png go")
    model: str = help_field("tiny-sd", help="Base model")
    base_lora: list[str] = field(
        default_factory=list,
        metadata={
            "help": "A LoRA fused into the base first, at its trained strength (repeat: fused "
            "in order), e.g. an ArtAug round's earlier LoRAs: 'base' is then the model before "
            "the round and each --lora is drawn on top of it"
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "Seeds (repeat), the same for every model"},
    )
    scorers: list[str] = field(
        default_factory=lambda: ["brightness", "contrast", "sharpness"],
        metadata={"help": "Reward names to score with (repeat, or comma-separated)"},
    )
    width: int = help_field(256, help="Image width")
    height: int = help_field(256, help="Image height")
    steps: int = help_field(4, help="Inference steps")
    guidance_scale: float = help_field(5.0, help="Classifier-free guidance")

    def __post_init__(self) -> None:
        if not self.prompts:
            raise TrainerConfigError("EvalConfig.prompts: required")
        load_prompts(self.prompts, "EvalConfig.prompts")
        # --scorers clip,aesthetic (as the issue writes it), repeated, or a TOML string
        given = self.scorers
        self.scorers = split_names([given] if isinstance(given, str) else list(given))
        for name in self.scorers:
            try:
                get_reward(name)
            except (KeyError, ValueError) as e:
                raise TrainerConfigError(f"EvalConfig.scorers: {e.args[0]}") from None
        for lora in self.lora:
            check_lora(lora, "EvalConfig.lora")
        for lora in self.base_lora:
            check_lora(lora, "EvalConfig.base_lora")
        if not self.seeds:
            raise TrainerConfigError("EvalConfig.seeds: at least one seed")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Generate every (model, prompt, seed), score, and write the table and the grid."""
    out = Path(cfg.output_dir)
    prompts = load_prompts(cfg.prompts, "EvalConfig.prompts")
    # The base LoRAs are fused into the weights as the loop fuses diffusion.lora's list;
    # the compared LoRAs are adapters on top, switched off for the base row.
    tool = DiffusionTool(model=cfg.model, store=ImageStore(out / "images"), lora=cfg.base_lora)
    pipe = tool.pipeline
    variants = ["base", *cfg.lora]
    weights = [
        load_lora(pipe, lora, f"lora{i}", "EvalConfig.lora") for i, lora in enumerate(cfg.lora)
    ]
    cells = [(p, s) for p in prompts for s in cfg.seeds]
    images: dict[str, list[Image.Image]] = {}
    results: dict[str, dict[str, Any]] = {}
    for i, variant in enumerate(variants):
        if variant == "base":
            if cfg.lora:
                pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters([f"lora{i - 1}"], adapter_weights=[weights[i - 1]])
        params = [
            GenParams(
                width=cfg.width,
                height=cfg.height,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale,
                seed=s,
            )
            for _, s in cells
        ]
        hashes = [tool.text_to_image(p, "", gp) for (p, _), gp in zip(cells, params, strict=True)]
        images[variant] = [tool.store.get(h) for h in hashes]
        scores = {}
        for name in cfg.scorers:
            values, _ = get_reward(name)(
                images[variant], [p for p, _ in cells], [{} for _ in cells]
            )
            scores[name] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values)),
                "values": [float(v) for v in values],
            }
        results[variant] = {"scores": scores, "images": hashes}
    summary = {
        "config": asdict(cfg),
        "model": tool.identity,  # the base: its LoRAs' sha256 and scales, fused in order
        # what each score means and which weights gave it (Reward.identity())
        "scorers": {name: reward_entry(name).identity() for name in cfg.scorers},
        "cells": [{"prompt": p, "seed": s} for p, s in cells],
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown_table(variants, cfg.scorers, results))
    grid(images, variants).save(out / "grid.png")
    return summary


def markdown_table(variants: list[str], scorers: list[str], results: dict) -> str:
    """One row per model: each scorer's mean ± std, and its change from the base."""
    head = "| model | " + " | ".join(scorers) + " |\n|---|" + "---|" * len(scorers) + "\n"
    rows = []
    for v in variants:
        cells = []
        for name in scorers:
            s, b = results[v]["scores"][name], results["base"]["scores"][name]
            delta = "" if v == "base" else f" ({s['mean'] - b['mean']:+.4f})"
            cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}{delta}")
        rows.append(f"| {v} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def grid(images: dict[str, list[Image.Image]], variants: list[str]) -> Image.Image:
    """Columns: models; rows: (prompt, seed) cells."""
    w, h = images[variants[0]][0].size
    n = len(images[variants[0]])
    canvas = Image.new("RGB", (w * len(variants), h * n), "white")
    for col, v in enumerate(variants):
        for row, im in enumerate(images[v]):
            canvas.paste(im, (col * w, row * h))
    return canvas
