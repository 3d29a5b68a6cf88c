"""The loop's gain in the shapes world (issue 19's first goal), measured by a judge no agent sees.

Held-out captions; the loop on tiny-shapes-sd (its regional edits on tiny-shapes-sd-inpaint) at
64 px, 20 steps, with a VLM as every agent and the validator judging; the `shapes` scorer watches
(loop.watch_scorers) and scores each session's first image and its final image against the
caption. Prints the mean first and final scores, the gain with a 95% bootstrap interval, and the
share of imperfect first images that the loop improved.

Iterations carry their edits over (loop.carry_edits; `--no-carry`: each starts from a fresh
text-to-image with the same seed, as the loop does by default).

`--agents oracle` replaces the agents by the detector's own targets (trainers/shapes_agents.py:
the plan of a Thesis-CoT that knows exactly what is wrong, accepted when the `shapes` score
rises), through the same diffusion tool: the loop's ceiling with these edits.

    .venv/bin/python bench/shapes_loop.py [--sessions 40] [--chat-model DIR] [--agents oracle]
        [--max-iters 3] [--no-carry] [--loop-set enhancer=false ...]

`--loop-set KEY=VALUE` sets a loop variant field (a JSON value), e.g. `enhancer=false`: the
caption is drawn as it is, which is all tiny-shapes-sd understands.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from artloop.config import ArtloopConfig
from artloop.graphs.context import build_context
from artloop.graphs.runner import run_session
from artloop.rewards import get_reward
from artloop.tools.diffusion import GenParams
from artloop.trainers.shapes_agents import plan
from artloop.world.check import check
from artloop.world.detect import detect
from artloop.world.scenes import sample_scenes

SIZE, STEPS = 64, 20


def config(
    home: Path, chat_model: str, max_iters: int, carry: bool, extra: dict | None = None
) -> ArtloopConfig:
    loop = {"max_iters": max_iters, "watch_scorers": ["shapes"], "carry_edits": carry}
    return ArtloopConfig(
        home=home,
        chat={"backend": "inprocess", "model": chat_model},
        loop=loop | (extra or {}),
        diffusion={"model": "tiny-shapes-sd", "width": SIZE, "height": SIZE, "steps": STEPS},
    )


def loop_sessions(
    captions: list[str],
    chat_model: str,
    max_iters: int,
    carry: bool,
    home: Path,
    extra: dict | None = None,
):
    """(first, final) `shapes` scores of one loop session per caption (diffusion seed i);
    `extra`: loop settings."""
    ctx = build_context(config(home, chat_model, max_iters, carry, extra))
    shapes = get_reward("shapes")
    pairs = []
    for i, caption in enumerate(captions):
        ctx.diffusion_config = ctx.diffusion_config.model_copy(update={"seed": i})
        run = ctx.store.get_run(run_session(ctx, prompt=caption, config={}).run_id)
        first = run["steps"][0]["watch"]["image"]["shapes"]["score"]
        (final,), _ = shapes([ctx.store.images.get(run["final_image"])], [caption], [{}])
        pairs.append((first, float(final)))
        print(f"  {i:3d} {first:.2f} -> {final:.2f} ({run['status']}): {caption}", flush=True)
    return pairs


def oracle_sessions(captions: list[str], scenes, max_iters: int, carry: bool, home: Path):
    """(first, final) with the detector's targets as the agents: each iteration one repaint
    per missing or wrongly coloured object, kept when the `shapes` score rises; as the loop
    runs it (`carry`: iteration k edits the best image so far with seed + k; else every
    iteration edits the first image again with the same seed)."""
    ctx = build_context(config(home, "tiny-qwen2vl", max_iters, carry))
    tool, images = ctx.diffusion, ctx.store.images
    pairs = []
    for i, (caption, scene) in enumerate(zip(captions, scenes, strict=True)):
        first = tool.text_to_image(caption, "", GenParams(SIZE, SIZE, STEPS, 5.0, i))
        start = check(scene.spec, detect(images.get(first)))
        best, report = first, start
        for k in range(max_iters):
            if report.score == 1.0:
                break
            image, before = (best, report) if carry else (first, start)
            params = GenParams(SIZE, SIZE, STEPS, 5.0, i + k if carry else i)
            for e in plan(scene.spec, before, caption)["regional_edits"]:
                image = tool.inpaint(image, tuple(e["box"]), e["prompt"], "", params, e["strength"])
            after = check(scene.spec, detect(images.get(image)))
            if after.score > report.score:
                best, report = image, after
        pairs.append((start.score, report.score))
        print(f"  {i:3d} {start.score:.2f} -> {report.score:.2f}: {caption}", flush=True)
    return pairs


def figures(pairs: list[tuple[float, float]], seed: int = 0) -> dict:
    first, final = (np.array(v) for v in zip(*pairs, strict=True))
    gain = final - first
    rng = np.random.default_rng(seed)
    boot = [gain[rng.integers(0, len(gain), len(gain))].mean() for _ in range(2000)]
    imperfect = first < 1.0
    return {
        "sessions": len(pairs),
        "first_mean": float(first.mean()),
        "final_mean": float(final.mean()),
        "gain_mean": float(gain.mean()),
        "gain_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "imperfect": int(imperfect.sum()),
        "improved_share_of_imperfect": float((gain[imperfect] > 0).mean())
        if imperfect.any()
        else None,
        "worse": int((gain < 0).sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=40)
    ap.add_argument("--agents", choices=["vlm", "oracle"], default="vlm")
    ap.add_argument("--chat-model", default="tiny-shapes-qwen2vl", help="the agents' VLM")
    ap.add_argument("--max-iters", type=int, default=3)
    ap.add_argument(
        "--no-carry", action="store_true", help="every iteration from a fresh text-to-image"
    )
    ap.add_argument(
        "--loop-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a loop setting (JSON value), e.g. enhancer=false",
    )
    ap.add_argument("--seed", type=int, default=0, help="which held-out captions")
    ap.add_argument("--out", type=Path, default=Path("bench/results/shapes_loop.json"))
    args = ap.parse_args()
    # Not the scenes any evaluation of the trained models uses (seed + 70000, + 50000, + 80000).
    scenes = sample_scenes("heldout", args.sessions, seed=args.seed + 90_000)
    rng = random.Random(args.seed)
    captions = [s.caption(rng) for s in scenes]
    home = Path(tempfile.mkdtemp(prefix="artloop-shapes-loop-"))
    started = time.perf_counter()
    carry = not args.no_carry
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.loop_set)}
    if args.agents == "oracle":
        pairs = oracle_sessions(captions, scenes, args.max_iters, carry, home)
    else:
        pairs = loop_sessions(captions, args.chat_model, args.max_iters, carry, home, extra)
    result = {
        "agents": args.agents,
        "chat_model": None if args.agents == "oracle" else args.chat_model,
        "max_iters": args.max_iters,
        "carry_edits": carry,
        "loop_set": extra,
        **figures(pairs, args.seed),
        "seconds": round(time.perf_counter() - started),
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
