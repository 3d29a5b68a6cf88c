"""The measured effect (issue 4): collect trajectories with the loop judged by a measured
preference ("dark, subdued images" = darkness), train sft / dpo / ddpo LoRAs on them, then
score base vs base + LoRA on held-out prompts and seeds with no loop. Prints, side by side:
the loop's mean gain, each LoRA's mean change, and the LoRA change as a share of the loop gain.

    .venv/bin/python bench/measured_effect.py [--sessions 8] [--size 64] [--out FILE]

Agents are the in-process tiny Qwen2-VL (its plans, tone factors included, are its own).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from artloop.config import ArtloopConfig
from artloop.graphs.context import build_context
from artloop.graphs.runner import run_session
from artloop.tools.export import ExportFilters, export_dataset
from artloop.tools.store import TrajectoryStore
from artloop.trainers.ddpo import DDPOConfig, train_ddpo
from artloop.trainers.dpo import DPOConfig, train_dpo
from artloop.trainers.evaluate import EvalConfig, evaluate
from artloop.trainers.sft import SFTConfig, train_sft

SUBJECTS = ["fox", "castle", "lighthouse", "forest", "city street", "mountain lake", "cat",
            "garden", "harbour", "desert", "robot", "violin", "bridge", "owl", "ship", "tower"]  # fmt: skip


def collect(home: Path, n: int, size: int) -> list[float]:
    """n loop sessions judged by darkness; returns each run's gain in reward units."""
    cfg = ArtloopConfig(home=home, loop={"judge": "darkness", "max_iters": 3, "accept_score": 10},
                        diffusion={"width": size, "height": size, "steps": 4})  # fmt: skip
    ctx = build_context(cfg)
    gains = []
    for i in range(n):
        ctx.diffusion_config = ctx.diffusion_config.model_copy(update={"seed": 1000 + i})
        s = run_session(ctx, prompt=f"a {SUBJECTS[i % len(SUBJECTS)]}", config={})
        gains.append((s.best_score - s.scores[0]) / 10)  # score = 10 x darkness
        print(f"session {i}: scores {s.scores} best {s.best_score}", flush=True)
    return gains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200, help="sft / dpo optimizer steps")
    ap.add_argument("--ddpo-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results/measured_effect.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="artloop-effect-"))
    started = time.perf_counter()
    gains = collect(work / "home", args.sessions, args.size)
    store = TrajectoryStore(work / "home")
    for fmt in ("sft", "dpo", "prompts"):
        export_dataset(store, work / fmt, fmt, ExportFilters())
    common = {"resolution": args.size, "batch_size": 4, "seed": 0}
    loras = {
        "sft": train_sft(SFTConfig(**{**common, "data": str(work / "sft"), "output_dir": str(work / "l-sft"),
                                      "train_steps": args.steps, "learning_rate": 1e-3}), progress=False),
        "dpo": train_dpo(DPOConfig(**{**common, "data": str(work / "dpo"), "output_dir": str(work / "l-dpo"),
                                      "train_steps": args.steps, "learning_rate": 1e-4}), progress=False),
        "ddpo": train_ddpo(DDPOConfig(**{**common, "data": str(work / "prompts"), "output_dir": str(work / "l-ddpo"),
                                        "train_steps": args.ddpo_steps, "reward": "darkness"}), progress=False),
    }  # fmt: skip
    held_out = work / "held_out.txt"
    held_out.write_text("\n".join(f"a {s}, seen anew" for s in SUBJECTS[args.sessions % 16 :][:6]))
    result = evaluate(EvalConfig(prompts=str(held_out), lora=[str(work / f"l-{k}") for k in loras],
                                 output_dir=str(work / "eval"), seeds=[7, 8, 9], scorers=["darkness"],
                                 width=args.size, height=args.size))  # fmt: skip
    base = np.array(result["results"]["base"]["scores"]["darkness"]["values"])
    loop_gain = float(np.mean(gains))
    figures = {"sessions": args.sessions, "loop_mean_gain": loop_gain,
               "base_mean": float(base.mean()), "seconds": time.perf_counter() - started}  # fmt: skip
    print(f"loop mean gain (darkness): {loop_gain:+.4f} over {args.sessions} sessions")
    for k in loras:
        vals = np.array(result["results"][str(work / f"l-{k}")]["scores"]["darkness"]["values"])
        delta = vals - base  # paired: same prompt and seed
        share = float(delta.mean() / loop_gain) if loop_gain else float("nan")
        figures[k] = {"mean_change": float(delta.mean()), "std_change": float(delta.std()),
                      "share_of_loop_gain": share}  # fmt: skip
        print(
            f"{k:5s}: mean change {delta.mean():+.5f} (std {delta.std():.5f}, "
            f"{len(delta)} held-out cells) = {share:.3f} x loop gain"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(f"written {args.out} ({figures['seconds']:.0f} s; work dir {work})")


if __name__ == "__main__":
    main()
