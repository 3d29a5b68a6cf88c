"""tiny-shapes-qwen2vl's two warm-ups, run before the agents' calls (trainers/shapes_vlm.py).

Copying: strings of the calls' words, each said twice, the second time learned, on the
language model alone. The agents mostly copy (the caption into a prompt, a box from the critique
into the plan), and a model trained from scratch on the calls alone learned the training
captions by heart instead (bench/copy_warmup.py: 0 of 30 held-out captions copied without it,
30 of 30 after it).

Looking: a picture and the question "which shapes, where?", answered with Data-CoT's own object
list (labels and boxes on the 0-1000 grid, from the detector), on fresh pictures every step:
renders of training scenes (some with one thing wrong) and the episodes' BEFORE pictures (half of
them tiny-shapes-sd samples). In the agents' calls a box is a few tokens of a long answer, and
three runs trained on the calls alone placed every box near the whole picture (held-out box IoU
0.04-0.07): the vision tower had not learned where things are. Pictures cannot be memorised, so
the warm-up makes it learn to see them.
"""

from __future__ import annotations

# Deliberately lazy: torch and transformers are imported inside the functions that use them.
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from artloop.trainers.shapes_agents import answer_text, facts, perturb
from artloop.world.detect import detect
from artloop.world.scenes import render, sample_scenes

if TYPE_CHECKING:
    from PIL import Image


class WarmupSettings(Protocol):
    """What the warm-ups read of the training's config (trainers/shapes_vlm.ShapesVLMTraining,
    which imports this module)."""

    seed: int
    lr: float
    warmup: int
    max_grad_norm: float
    copy_steps: int
    copy_batch: int
    look_steps: int
    look_batch: int


LOOK_ASK = "Which shapes are in the picture, and where? List them largest first, with boxes."


def run_warmup(
    model,
    cfg: WarmupSettings,
    name: str,
    steps: int,
    loss_of: Callable,
    log,
    after_step: Callable[[int], None] | None = None,
):
    """`steps` AdamW steps at the peak rate after a short linear warm-up, clipped; `loss_of(rng)`
    draws a batch and returns its loss; `after_step(n)` runs after the n-th step (a bench's
    measurement). The losses, one per step."""
    import torch
    from artloop.models.tiny.shapes_sd import optimiser_step
    from transformers import get_constant_schedule_with_warmup

    rng = random.Random(f"{cfg.seed}-{name}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = get_constant_schedule_with_warmup(opt, min(cfg.warmup, steps // 4))
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        loss = loss_of(rng)
        optimiser_step(loss, opt, sched, list(model.parameters()), cfg.max_grad_norm)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            log(f"{name} {step + 1}/{steps} loss {recent:.4f} ({time.perf_counter() - start:.0f}s)")
        if after_step is not None:
            after_step(step + 1)
    return losses


# --- copying ----------------------------------------------------------------------------------
def copy_strings(tokenizer, words: list[str], n: int, rng: random.Random):
    """`n` copying rows: 3-14 random `words`, a newline, the same again (learned: labels
    -100 elsewhere); ids, attention mask and labels, (n, T) right-padded."""
    import torch

    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    rows = []
    for _ in range(n):
        said = " " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        ids = tokenizer(said, add_special_tokens=False)["input_ids"]
        rows.append((ids + newline, ids))
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), -100)
    for r, (first, again) in enumerate(rows):
        both = first + again
        ids[r, : len(both)] = torch.tensor(both)
        mask[r, : len(both)] = 1
        labels[r, len(first) : len(both)] = torch.tensor(again)
    return ids, mask, labels


def copy_warmup(model, processor, words: list[str], cfg: WarmupSettings, log=print) -> list:
    """The copying warm-up on the language model (no images); the losses, one per step."""
    import torch.nn.functional as F

    def loss_of(rng: random.Random):
        ids, mask, labels = copy_strings(processor.tokenizer, words, cfg.copy_batch, rng)
        hidden = model.model.language_model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model.lm_head(hidden[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten())

    return run_warmup(model, cfg, "copy", cfg.copy_steps, loss_of, log)


# --- looking ----------------------------------------------------------------------------------
def look_answer(image: Image.Image) -> str:
    """What the looking warm-up learns for `image`: Data-CoT's object list, as the grammar
    writes it."""
    return answer_text({"objects": facts(detect(image))["objects"]})


def look_prompt(processor) -> str:
    """The looking question as the model sees it: a user turn with the picture, then the
    assistant's turn opened."""
    ask = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": LOOK_ASK}]}]
    return processor.apply_chat_template(ask, tokenize=False, add_generation_prompt=True)


def look_rows(processor, pictures: list[Image.Image], answers: list[str]):
    """The rows of a looking batch: ids, attention mask, labels (the answer tokens only),
    pixels and grid, right-padded."""
    import torch

    prompt = look_prompt(processor)
    tok = processor.tokenizer
    tok.padding_side = "right"
    enc = processor(
        text=[prompt + a + "<|im_end|>" for a in answers],
        images=pictures,
        return_tensors="pt",
        padding=True,
    )
    labels = torch.full_like(enc["input_ids"], -100)
    for r, (a, length) in enumerate(
        zip(answers, enc["attention_mask"].sum(1).tolist(), strict=True)
    ):
        n = len(tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"])
        labels[r, length - n : length] = enc["input_ids"][r, length - n : length]
    return enc, labels


def look_warmup(
    model,
    processor,
    pool: list[Image.Image],
    cfg: WarmupSettings,
    log=print,
    after_step: Callable[[int], None] | None = None,
):
    """The looking warm-up: each batch half fresh renders of training scenes (one thing wrong
    or none), half pictures of `pool` (the episodes' BEFORE pictures); the losses, one per
    step."""
    import torch.nn.functional as F

    answers: dict[int, str] = {}  # the pool's, detected once

    def loss_of(rng: random.Random):
        n_fresh = cfg.look_batch - min(len(pool), cfg.look_batch // 2)
        scenes = sample_scenes("train", n_fresh, seed=rng.randrange(1 << 30))
        pictures = [render(perturb(s, rng)) for s in scenes]
        picked = rng.sample(range(len(pool)), cfg.look_batch - n_fresh)
        for k in picked:
            if k not in answers:
                answers[k] = look_answer(pool[k])
        batch = [(p, look_answer(p)) for p in pictures] + [(pool[k], answers[k]) for k in picked]
        enc, labels = look_rows(processor, [p for p, _ in batch], [a for _, a in batch])
        logits = model(**enc).logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten())

    return run_warmup(model, cfg, "look", cfg.look_steps, loss_of, log, after_step)
