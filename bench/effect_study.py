"""The measured effect of training on the loop's trajectories (ArtAug's claim: the trained model
draws the improved image directly, with no loop at inference).

The preference is measurable: "dark, subdued images", scored by darkness (1 - mean luma). Loop
sessions judged by darkness collect trajectories; their exports train sft, dpo and ddpo LoRAs;
base vs base + LoRA are scored on held-out prompts and seeds, and compared with the loop's gain.
bench/measured_effect.py runs it, prints the figures and the checks below (once a test,
tests/test_effect.py: a ~5-minute study, out of the default suite since issue 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from artloop.config import ArtloopConfig
from artloop.graphs.context import build_context
from artloop.graphs.runner import run_session
from artloop.store.export import ExportFilters, export_dataset
from artloop.store.trajectories import TrajectoryStore
from artloop.trainers.ddpo import DDPOConfig, train_ddpo
from artloop.trainers.dpo import DPOConfig, train_dpo
from artloop.trainers.evaluate import EvalConfig, evaluate
from artloop.trainers.sft import SFTConfig, train_sft

# A Thesis-CoT plan that only darkens: no regional edits, no img2img (strength 0). The tiny
# random Qwen2-VL never proposes tone edits, so a scripted planner gives the loop a gain to learn.
DARKEN_PLAN = {
    "revised_prompt": "the same scene, darker and subdued",
    "negative_prompt": "bright",
    "regional_edits": [],
    "params": {"strength": 0.0, "exposure": 0.6},
    "rationale": "the image is too bright for a dark, subdued look",
}

SUBJECTS = [
    "fox",
    "castle",
    "lighthouse",
    "forest",
    "city street",
    "mountain lake",
    "cat",
    "garden",
    "harbour",
    "desert",
    "robot",
    "violin",
    "bridge",
    "owl",
    "ship",
    "tower",
]


@dataclass
class EffectStudy:
    """Settings of one study; the defaults are the ones measured in the closing note."""

    work_dir: Path
    model: str = "tiny-sd-fit"  # a random UNet cannot be shifted: see models/tiny/fit.py
    agents: str = "scripted"  # or "tiny-vlm": the in-process tiny Qwen2-VL plans
    sessions: int = 8
    size: int = 64
    sft: dict[str, Any] = field(default_factory=lambda: {"train_steps": 600, "learning_rate": 3e-3})
    # beta 10: at the paper's 5000 the 8 pairs are separated by tiny changes (loss ~1e-3 within
    # 300 steps) and the samples do not move.
    dpo: dict[str, Any] = field(
        default_factory=lambda: {"train_steps": 300, "learning_rate": 1e-3, "beta": 10.0}
    )
    # 32 samples per PPO round at the 4 steps eval samples with: at 8 the reward's noise
    # outweighed the signal (the mean reward drifted either way).
    ddpo: dict[str, Any] = field(
        default_factory=lambda: {
            "train_steps": 60,
            "learning_rate": 1e-3,
            "batch_size": 32,
            "sample_steps": 4,
        }
    )
    trainers: tuple[str, ...] = ("sft", "dpo", "ddpo")
    seed: int = 0
    eval_seeds: tuple[int, ...] = (7, 8, 9)
    held_out: int = 6

    def __post_init__(self) -> None:
        if self.agents not in ("scripted", "tiny-vlm"):
            raise ValueError(f"EffectStudy.agents: {self.agents!r} is not scripted or tiny-vlm")


def collect(study: EffectStudy) -> list[float]:
    """Loop sessions judged by darkness; returns each one's gain over its first image."""
    chat = (
        {}
        if study.agents == "tiny-vlm"
        else {
            "backend": "scripted",
            "custom_kwargs": {"scripts": {"EditPlan": [DARKEN_PLAN]}},
        }
    )
    cfg = ArtloopConfig(
        home=study.work_dir / "home",
        chat=chat,
        loop={"judge": "darkness", "max_iters": 3, "accept_score": 6.5},
        diffusion={"model": study.model, "width": study.size, "height": study.size, "steps": 4},
    )
    ctx = build_context(cfg)
    gains = []
    for i in range(study.sessions):
        ctx.diffusion_config = ctx.diffusion_config.model_copy(update={"seed": 1000 + i})
        s = run_session(ctx, prompt=f"a {SUBJECTS[i % len(SUBJECTS)]}", config={})
        # Scores are of the images kept after each edit: the gain is over the first generation.
        first = 1.0 - ctx.store.get_run(s.run_id)["steps"][0]["stats"]["image"]["brightness"]
        gains.append(s.best_score / 10 - first)  # score = 10 x darkness
    return gains


def run_study(study: EffectStudy) -> dict[str, Any]:
    """Collect, export, train, evaluate. Returns the loop's gains, the base's held-out scores and
    each LoRA's paired changes (same prompt and seed) with their share of the loop's mean gain."""
    work = study.work_dir
    gains = collect(study)
    store = TrajectoryStore(work / "home")
    for fmt in ("sft", "dpo", "prompts"):
        export_dataset(store, work / fmt, fmt, ExportFilters())
    trainers = {
        "sft": (SFTConfig, train_sft, "sft"),
        "dpo": (DPOConfig, train_dpo, "dpo"),
        "ddpo": (DDPOConfig, train_ddpo, "prompts"),
    }
    loras = {}
    for name in study.trainers:
        config_cls, train, data = trainers[name]
        settings = {
            "model": study.model,
            "resolution": study.size,
            "batch_size": 4,
            "seed": study.seed,
            **getattr(study, name),
        }
        loras[name] = str(work / f"lora-{name}")
        train(config_cls(data=str(work / data), output_dir=loras[name], **settings), progress=False)
    unseen = SUBJECTS[study.sessions % len(SUBJECTS) :][: study.held_out]
    (work / "held_out.txt").write_text("\n".join(f"a {s}, seen anew" for s in unseen))
    result = evaluate(
        EvalConfig(
            prompts=str(work / "held_out.txt"),
            lora=list(loras.values()),
            output_dir=str(work / "eval"),
            seeds=list(study.eval_seeds),
            scorers=["darkness"],
            model=study.model,
            width=study.size,
            height=study.size,
        )
    )

    def scores(key: str) -> np.ndarray:
        return np.array(result["results"][key]["scores"]["darkness"]["values"])

    base, loop_gain = scores("base"), float(np.mean(gains))
    figures: dict[str, Any] = {
        "loop_gains": gains,
        "loop_mean_gain": loop_gain,
        "base_mean": float(base.mean()),
    }
    for name, lora in loras.items():
        delta = scores(lora) - base
        figures[name] = {
            "mean_change": float(delta.mean()),
            "std_change": float(delta.std()),
            "cells": len(delta),
            "share_of_loop_gain": float(delta.mean() / loop_gain),
        }
    return figures


def noise_margin(f: dict[str, Any]) -> float:
    """Three standard errors of a LoRA's paired mean change: what noise could explain."""
    return 3 * f["std_change"] / math.sqrt(f["cells"])


def check(figures: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The study's claims on its figures (the assertions tests/test_effect.py made, for the
    default study: 8 scripted sessions on tiny-sd-fit): (claim, holds, the figures it read)."""
    least = min(figures["loop_gains"])
    checks = [("the loop darkens (each gain > 0.1)", least > 0.1, f"least gain {least:+.4f}")]
    if "sft" in figures:
        share = figures["sft"]["share_of_loop_gain"]
        checks.append(("sft carries at least half the loop gain", share >= 0.5, f"{share:.2f} x"))
    for name in ("dpo", "ddpo"):
        if name in figures:
            change, margin = figures[name]["mean_change"], noise_margin(figures[name])
            holds = change > 0.005 and change > margin
            seen = f"change {change:+.4f}, 3 s.e. {margin:.4f}"
            checks.append((f"{name} moves toward darker (> 0.005 and > 3 s.e.)", holds, seen))
    return checks
