"""Issue 19's effect study: does a LoRA trained on the loop's accepted trajectories draw, with no
loop, what the loop reached (ArtAug's claim)? Judged by `shapes`, which no step of collection or
training sees (it only watches: loop.watch_scorers).

1. Collect: loop sessions on training-split captions, each with its own seed, the VLM as every
   agent and as the validator (loop.judge = vlm), edits carried over; on tiny-shapes-sd at 64 px.
2. Export sft: the accepted runs' best images with their captions (`--all-runs`: every run).
3. Train sft LoRAs on tiny-shapes-sd: the learning rate chosen on validation-split captions
   (the best mean `shapes` score, training seed 0), then one LoRA per training seed.
4. Held-out captions x evaluation seeds: the loop's gain (its first image -> its final image)
   beside each LoRA's change of the base image (same caption and seed, no loop), each a mean
   with a 95% bootstrap interval, and the LoRA's change as a share of the loop's gain.

    .venv/bin/python bench/shapes_effect.py [--chat-model DIR] [--sessions 120] [--held-out 30]
        [--train-seeds 0 1 2] [--lrs 3e-4 1e-3] [--sft-steps 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from artloop.graphs.batch import BatchItem, item_run_id, run_batch
from artloop.graphs.context import build_context
from artloop.rewards import get_reward
from artloop.store.export import ExportFilters, export_dataset
from artloop.store.trajectories import TrajectoryStore
from artloop.trainers.evaluate import EvalConfig, evaluate
from artloop.trainers.sft import SFTConfig, train_sft
from artloop.world.scenes import sample_scenes
from shapes_loop import SIZE, STEPS, config, figures

MODEL = "tiny-shapes-sd"


@dataclass
class ShapesStudy:
    """One study's settings; the defaults are the ones the closing note reports."""

    work_dir: Path
    chat_model: str = "tiny-shapes-qwen2vl"
    sessions: int = 120  # collection: training-split captions, one seed each
    held_out: int = 30  # held-out captions, each at every evaluation seed
    validation: int = 20  # validation captions for the learning rate
    eval_seeds: tuple[int, ...] = (7, 8)
    train_seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (3e-4, 1e-3)
    sft_steps: int = 400
    max_iters: int = 3
    concurrency: int = 8  # sessions at once: the in-process VLM batches their calls
    accepted_only: bool = True
    canaries: str = "once"  # the validator's control images (scorers.canaries); off: smoke runs


def captions(split: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [s.caption(rng) for s in sample_scenes(split, n, seed=seed)]


def loop_runs(study: ShapesStudy, name: str, items: list[BatchItem]) -> list[tuple[float, float]]:
    """Run the loop on `items` (stored in the study's home); (first, final) `shapes` per item."""
    cfg = config(study.work_dir / "home", study.chat_model, study.max_iters, True)
    cfg.scorers.canaries = study.canaries
    ctx = build_context(cfg)
    done = asyncio.run(run_batch(ctx, items, name=name, concurrency=study.concurrency))
    if done.failed:
        raise RuntimeError(f"{done.failed} of {len(items)} sessions failed: {done.errors}")
    shapes = get_reward("shapes")
    pairs = []
    for i, item in enumerate(items):
        run = ctx.store.get_run(item_run_id(name, i, item))
        first = run["steps"][0]["watch"]["image"]["shapes"]["score"]
        (final,), _ = shapes([ctx.store.images.get(run["final_image"])], [item.prompt], [{}])
        pairs.append((first, float(final)))
    return pairs


def train(study: ShapesStudy, data: Path, lr: float, seed: int) -> str:
    out = study.work_dir / f"lora-lr{lr:g}-seed{seed}"
    cfg = SFTConfig(
        data=str(data),
        output_dir=str(out),
        model=MODEL,
        resolution=SIZE,
        learning_rate=lr,
        train_steps=study.sft_steps,
        batch_size=8,
        seed=seed,
    )
    train_sft(cfg, progress=False)
    return str(out)


def scored(study: ShapesStudy, prompts: list[str], loras: list[str], name: str) -> dict:
    """Base and each LoRA, no loop: `shapes` per (caption, seed), in one fixed order."""
    path = study.work_dir / f"{name}.txt"
    path.write_text("\n".join(prompts) + "\n")
    result = evaluate(
        EvalConfig(
            prompts=str(path),
            lora=loras,
            output_dir=str(study.work_dir / f"eval-{name}"),
            seeds=list(study.eval_seeds),
            scorers=["shapes"],
            model=MODEL,
            width=SIZE,
            height=SIZE,
            steps=STEPS,
        )
    )
    return {k: v["scores"]["shapes"]["values"] for k, v in result["results"].items()}


def run_study(study: ShapesStudy, log=print) -> dict:
    started = time.perf_counter()
    train_caps = captions("train", study.sessions, 11)
    collect = [BatchItem(prompt=c, seed=1000 + i) for i, c in enumerate(train_caps)]
    collected = loop_runs(study, "collect", collect)
    log(f"collected {len(collected)} sessions: {figures(collected)}")
    store = TrajectoryStore(study.work_dir / "home")
    data = study.work_dir / "sft"
    exported = export_dataset(store, data, "sft", ExportFilters(accepted_only=study.accepted_only))
    log(f"exported {exported.rows} rows")

    # The learning rate: on validation captions, training seed 0.
    val_caps = captions("val", study.validation, 12)
    trial = {lr: train(study, data, lr, study.train_seeds[0]) for lr in study.lrs}
    val = scored(study, val_caps, list(trial.values()), "validation")
    means = {lr: float(np.mean(val[path])) for lr, path in trial.items()}
    best = max(means, key=means.get)
    log(f"validation shapes: base {np.mean(val['base']):.3f}, by lr {means}: lr {best:g}")

    held = captions("heldout", study.held_out, 13)
    loop_items = [BatchItem(prompt=c, seed=s) for c in held for s in study.eval_seeds]
    loop = figures(loop_runs(study, "heldout", loop_items))
    log(f"the loop on held-out captions: {loop}")
    loras = {
        seed: trial[best] if seed == study.train_seeds[0] else train(study, data, best, seed)
        for seed in study.train_seeds
    }
    # evaluate's order: each prompt at every seed, the loop's items' order.
    cells = scored(study, held, list(loras.values()), "heldout")
    base = cells["base"]
    per_seed = {}
    for seed, path in loras.items():
        change = figures(list(zip(base, cells[path], strict=True)))
        change["share_of_loop_gain"] = change["gain_mean"] / loop["gain_mean"]
        per_seed[seed] = change
    shares = [f["share_of_loop_gain"] for f in per_seed.values()]
    return {
        "study": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(study).items()},
        "collected": figures(collected),
        "exported_rows": exported.rows,
        "validation_means": {"base": float(np.mean(val["base"])), **means},
        "lr": best,
        "loop_heldout": loop,
        "base_heldout_mean": float(np.mean(base)),
        "sft_by_seed": per_seed,
        "sft_share_mean": float(np.mean(shares)),
        "seconds": round(time.perf_counter() - started),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chat-model", default="tiny-shapes-qwen2vl", help="the agents' VLM")
    ap.add_argument("--sessions", type=int, default=120)
    ap.add_argument("--held-out", type=int, default=30)
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3])
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--all-runs", action="store_true", help="export every run, not the accepted")
    ap.add_argument("--canaries", default="once", help="scorers.canaries (off: a smoke run)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/shapes_effect.json"))
    args = ap.parse_args()
    study = ShapesStudy(
        work_dir=Path(tempfile.mkdtemp(prefix="artloop-shapes-effect-")),
        chat_model=args.chat_model,
        sessions=args.sessions,
        held_out=args.held_out,
        train_seeds=tuple(args.train_seeds),
        lrs=tuple(args.lrs),
        sft_steps=args.sft_steps,
        accepted_only=not args.all_runs,
        canaries=args.canaries,
    )
    result = run_study(study)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
