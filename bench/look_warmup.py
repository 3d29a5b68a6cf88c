"""Does tiny-shapes-qwen2vl's looking warm-up teach the vision tower where things are? The
warm-up alone (trainers/shapes_warmups.look_warmup: a picture -> Data-CoT's object list with
boxes; after the seeing warm-up when `--see-steps` > 0) on a fresh model, and every `--every` steps the greedy answer
on held-out renders scored against the detector: object F1 (a listed object must match a
detection's colour and shape) and the box IoU of the matches (trainers/shapes_eval).

    .venv/bin/python bench/look_warmup.py [--steps 1200] [--every 400] [--batch 32] [--cases 40]
        [--see-steps 0]

`--see-steps N` runs the seeing warm-up (the vision tower alone, each cell's shape and box)
first, as the trainer does; compare a run with 0.

The model and tokenizer are built as the trainer builds them (on the calls of `--episodes`
recorded episodes, rendered BEFORE pictures only); its image size is SHAPES_CONFIG's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from artloop.trainers.shapes_eval import object_match
from artloop.trainers.shapes_vlm import ShapesVLMTraining, episodes, fixed_lines, new_model
from artloop.trainers.shapes_warmups import Pictures, look_prompt, look_warmup, see_warmup
from artloop.world.detect import detect
from artloop.world.scenes import render, sample_scenes


def grounding(model, processor, n: int, seed: int) -> dict:
    """Object F1 and box IoU of the greedy answers on `n` held-out renders."""
    import torch

    scenes = sample_scenes("heldout", n, seed=seed)
    pictures = [render(s) for s in scenes]
    tok = processor.tokenizer
    tp = listed = detected = bad = 0
    ious: list[float] = []
    model.eval()
    tok.padding_side = "left"  # generation continues each prompt: pad on the left
    for i in range(0, n, 20):
        part = pictures[i : i + 20]
        prompts = [look_prompt(processor)] * len(part)
        enc = processor(text=prompts, images=part, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=120, do_sample=False)
        for row, picture in zip(out, part, strict=True):
            text = tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True)
            try:
                objects = [o for o in json.loads(text)["objects"] if len(o.get("box", [])) == 4]
            except (ValueError, KeyError, TypeError, AttributeError):
                objects, bad = [], bad + 1
            t, p, g, m = object_match(objects, detect(picture))
            tp, listed, detected, ious = tp + t, listed + p, detected + g, ious + m
    model.train()
    precision, recall = tp / max(listed, 1), tp / max(detected, 1)
    return {
        "objects_f1": 2 * precision * recall / (precision + recall) if tp else 0.0,
        "box_iou": sum(ious) / len(ious) if ious else 0.0,
        "iou_over_half": sum(v > 0.5 for v in ious) / max(detected, 1),
        "unparsed": bad,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--every", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--episodes", type=int, default=60, help="calls the tokenizer is trained on")
    ap.add_argument("--see-steps", type=int, default=0, help="seeing warm-up steps first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/look_warmup.json"))
    args = ap.parse_args()
    cfg = ShapesVLMTraining(
        seed=args.seed,
        sd_share=0.0,
        look_batch=args.batch,
        episodes=args.episodes,
        see_steps=args.see_steps,
    )
    examples = episodes(cfg, "train", args.episodes, args.seed, log=lambda _: None)
    model, processor = new_model(examples, args.seed, fixed_lines(examples))
    pictures = Pictures([], cfg.pictures, args.seed)
    see_warmup(model, processor, pictures, cfg)
    rows = [{"steps": 0, **grounding(model, processor, args.cases, args.seed + 90_000)}]
    start = time.perf_counter()

    def measure(step: int) -> None:
        if step % args.every == 0 or step == args.steps:
            rows.append(
                {"steps": step, **grounding(model, processor, args.cases, args.seed + 90_000)}
            )
            print(rows[-1], f"({time.perf_counter() - start:.0f}s)", flush=True)

    look_warmup(model, processor, pictures, replace(cfg, look_steps=args.steps), after_step=measure)
    print(f"{'steps':>6}{'object F1':>11}{'box IoU':>9}{'IoU>0.5':>9}{'unparsed':>10}")
    for r in rows:
        print(
            f"{r['steps']:>6}{r['objects_f1']:>11.3f}{r['box_iou']:>9.3f}"
            f"{r['iou_over_half']:>9.2f}{r['unparsed']:>10}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}))


if __name__ == "__main__":
    main()
