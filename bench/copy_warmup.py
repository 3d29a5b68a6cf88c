"""Why tiny-shapes-qwen2vl starts with a copying warm-up: the enhancer's task alone (copy the
caption into the prompt), trained from scratch with and without it, side by side.

Both arms: the same model and tokenizer (trainers/shapes_vlm.new_model), the enhancer's real
calls on fresh training-split captions (none repeats by design of the count: one epoch), the
same steps; the warm-up arm first runs `copy_steps` steps on random strings of the calls' words.
Measured: the share of captions the greedy answer copies word for word, on training and on
held-out captions (combinations never seen in training).

    .venv/bin/python bench/copy_warmup.py [--steps 500] [--copy-steps 600] [--cases 30]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

from artloop import agents
from artloop.models.inprocess import to_qwen_messages
from artloop.trainers.shapes_agents import Example, Recorder, answer_text
from artloop.trainers.shapes_vlm import (
    ShapesVLMTraining,
    _prompt_text,
    episodes,
    fixed_lines,
    new_model,
    train,
    words_of,
)
from artloop.trainers.shapes_warmups import copy_warmup
from artloop.world.scenes import sample_scenes


def enhancer_calls(split: str, n: int, seed: int) -> list[Example]:
    """The enhancer's recorded calls on `n` captions of `split`, each answered by copying."""
    rng, recorder, out = random.Random(seed), Recorder(), []
    for scene in sample_scenes(split, n, seed=seed):
        caption = scene.caption(rng)
        recorder.answer = answer_text({"prompt": caption, "negative_prompt": ""})
        agents.enhance(recorder, caption)
        messages, answer, schema = recorder._calls.pop()
        chat, images = to_qwen_messages(messages)
        out.append(Example("enhance", chat, images, answer, schema))
    return out


def copied(model, processor, examples: list[Example]) -> float:
    """The share of greedy answers equal to the target."""
    import torch

    hits = 0
    for e in examples:
        enc = processor(text=[_prompt_text(processor, e)], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=120, do_sample=False)
        text = processor.tokenizer.decode(
            out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        hits += text == e.answer
    return hits / len(examples)


def arm(cfg: ShapesVLMTraining, calls, base, train_cases, held) -> dict:
    started = time.perf_counter()
    fixed = fixed_lines(base)
    model, processor = new_model(base, cfg.seed, fixed)  # the same tokenizer and weights in both
    warm = copy_warmup(model, processor, words_of(base, set(fixed)), cfg, log=print)
    losses = train(model, processor, calls, cfg, log=print)
    return {
        "copy_steps": cfg.copy_steps,
        "copy_final_loss": warm[-1] if warm else None,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_copied": copied(model, processor, train_cases),
        "heldout_copied": copied(model, processor, held),
        "seconds": round(time.perf_counter() - started),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--copy-steps", type=int, default=600)
    ap.add_argument("--cases", type=int, default=30, help="captions measured per split")
    ap.add_argument("--out", type=Path, default=Path("bench/results/copy_warmup.json"))
    args = ap.parse_args()
    cfg = ShapesVLMTraining(sd_share=0.0, steps=args.steps, warmup=30, eval_scenes=0)
    base = episodes(cfg, "train", 300, 0, log=lambda _: None)  # the tokenizer's corpus
    calls = enhancer_calls("train", args.steps * cfg.batch_size, 1)
    held = enhancer_calls("heldout", args.cases, 7)
    result = {}
    for name, n in (("without", 0), ("with", args.copy_steps)):
        result[name] = arm(replace(cfg, copy_steps=n), calls, base, calls[: args.cases], held)
        print(name, json.dumps(result[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
