"""tiny-shapes-qwen2vl's warm-ups, run before the agents' calls (trainers/shapes_vlm.py).

Copying: strings of the calls' words, each said twice, the second time learned, on the
language model alone. The agents mostly copy (the caption into a prompt, a box from the critique
into the plan), and a model trained from scratch on the calls alone learned the training
captions by heart instead (bench/copy_warmup.py: 0 of 30 held-out captions copied without it,
30 of 30 after it).

Seeing: the vision tower alone, with a throwaway linear head, on a dense task: each cell of an
8 x 8 grid over the picture is labelled with the kind and box of the shape over it. Every cell
of every picture is a target, so the tower learns where things are in a few hundred cheap steps.

Looking: a picture and the question "which shapes, where?", answered with Data-CoT's own object
list (labels and boxes on the 0-1000 grid, from the detector). In the agents' calls a box is a
few tokens of a long answer, and three runs trained on the calls alone placed every box near the
whole picture (held-out box IoU 0.04-0.07); this teaches the language model to read the boxes
off the picture.

Seeing and looking draw from `Pictures`: thousands of renders of training scenes (some with one
thing wrong) and the episodes' BEFORE pictures (half of them tiny-shapes-sd samples), each
detected once. Copying and looking are rehearsed in every training step afterwards.
"""

from __future__ import annotations

# Deliberately lazy: torch and transformers are imported inside the functions that use them.
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from artloop.trainers.shapes_agents import answer_text, facts, perturb
from artloop.world.detect import Detection, detect
from artloop.world.language import SHAPES
from artloop.world.scenes import RGB, render, sample_scenes

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
    see_steps: int


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


def copy_loss(model, processor, words: list[str], batch: int) -> Callable:
    """`loss_of(rng)` for copying: `batch` strings through the language model (no images)."""
    import torch.nn.functional as F

    def loss_of(rng: random.Random):
        ids, mask, labels = copy_strings(processor.tokenizer, words, batch, rng)
        hidden = model.model.language_model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model.lm_head(hidden[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten())

    return loss_of


def copy_warmup(model, processor, words: list[str], cfg: WarmupSettings, log=print) -> list:
    """The copying warm-up on the language model (no images); the losses, one per step."""
    loss_of = copy_loss(model, processor, words, cfg.copy_batch)
    return run_warmup(model, cfg, "copy", cfg.copy_steps, loss_of, log)


# --- looking ----------------------------------------------------------------------------------
def look_answer(found: list[Detection]) -> str:
    """What the looking warm-up learns for a picture in which the detector `found` these:
    Data-CoT's object list, as the grammar writes it."""
    return answer_text({"objects": facts(found)["objects"]})


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


class Pictures:
    """What the seeing and looking warm-ups (and their rehearsals) draw from: `fresh` renders of
    training scenes (one thing wrong or none) made once, and `before` (the episodes' BEFORE
    pictures, half of them tiny-shapes-sd samples); each picture's detections are computed on
    first use and kept (detecting is most of a small step's cost)."""

    def __init__(self, before: list[Image.Image], fresh: int, seed: int) -> None:
        rng = random.Random(f"{seed}-pictures")
        scenes = sample_scenes("train", fresh, seed=rng.randrange(1 << 30))
        self.pools = ([render(perturb(s, rng)) for s in scenes], list(before))
        self._found: dict[tuple[int, int], list[Detection]] = {}

    def draw(self, n: int, rng: random.Random) -> list[tuple[Image.Image, list[Detection]]]:
        """`n` pictures with their detections, up to half of them BEFORE pictures."""
        fresh, before = self.pools
        n_before = min(len(before), n // 2)
        # With replacement: a scaled-down run's pools may be smaller than a batch.
        picks = [(0, k) for k in rng.choices(range(len(fresh)), k=n - n_before)]
        picks += [(1, k) for k in rng.choices(range(len(before)), k=n_before)]
        for pick in picks:
            if pick not in self._found:
                self._found[pick] = detect(self.pools[pick[0]][pick[1]])
        return [(self.pools[p][k], self._found[p, k]) for p, k in picks]


def look_loss(model, processor, pictures: Pictures, batch: int) -> Callable:
    """`loss_of(rng)` for looking: `batch` pictures -> their object lists."""
    import torch.nn.functional as F

    def loss_of(rng: random.Random):
        drawn = pictures.draw(batch, rng)
        answers = [look_answer(found) for _, found in drawn]
        enc, labels = look_rows(processor, [p for p, _ in drawn], answers)
        logits = model(**enc).logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten())

    return loss_of


def look_warmup(
    model,
    processor,
    pictures: Pictures,
    cfg: WarmupSettings,
    log=print,
    after_step: Callable[[int], None] | None = None,
):
    """The looking warm-up; the losses, one per step."""
    loss_of = look_loss(model, processor, pictures, cfg.look_batch)
    return run_warmup(model, cfg, "look", cfg.look_steps, loss_of, log, after_step)


# --- seeing -----------------------------------------------------------------------------------
# Each cell of the 8 x 8 grid is one 14 px patch at 112 px: the kind of the shape whose box holds
# the cell's centre (or none), and that box. The head is dropped afterwards, so the model stays a
# Qwen2-VL.
CELLS = 8
KINDS = [(c, s) for c in RGB for s in SHAPES]  # class k + 1; 0 is background


def see_targets(found: list[Detection]):
    """The dense targets of a picture in which the detector `found` these: kinds
    (CELLS * CELLS,) and boxes (CELLS * CELLS, 4) as shares of the side, cells in raster
    order; a cell two boxes hold goes to the smaller."""
    import torch

    kinds = torch.zeros(CELLS, CELLS, dtype=torch.long)
    boxes = torch.zeros(CELLS, CELLS, 4)
    centres = (torch.arange(CELLS) + 0.5) / CELLS
    for d in sorted(found, key=lambda d: -d.area):  # smaller ones overwrite
        x1, y1, x2, y2 = d.box
        across, down = (x1 < centres) & (centres < x2), (y1 < centres) & (centres < y2)
        held = down[:, None] & across[None, :]  # a box edge on a centre: not held
        kinds[held] = KINDS.index((d.colour, d.shape)) + 1
        boxes[held] = torch.tensor(d.box)
    return kinds.flatten(), boxes.view(-1, 4)


def see_head(model):
    """A linear read-out of each merged vision token (a 2 x 2 block of cells): per cell, the
    kind's logits and the box."""
    import torch

    width = model.config.text_config.hidden_size
    return torch.nn.Linear(width, 4 * (len(KINDS) + 1 + 4))


def in_cells(out):
    """The head's outputs (B, merged tokens, 4 * F), each merged token's 2 x 2 cells in a row,
    as (B, CELLS * CELLS, F) in the cells' raster order: the merged tokens run in raster order
    over the picture (Qwen2-VL's processor groups each 2 x 2 block of patches into one)."""
    side = CELLS // 2  # merged tokens per side
    out = out.view(out.shape[0], side, side, 2, 2, -1).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(out.shape[0], CELLS * CELLS, -1)


def see_loss(model, head, processor, pictures: list[Image.Image], targets: list) -> tuple:
    """Cross-entropy of the cells' kinds, plus the L1 error of the boxes of the cells a shape
    holds; and the share of cells whose kind is right."""
    import torch
    import torch.nn.functional as F

    enc = processor.image_processor(images=pictures, return_tensors="pt")
    feats = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
    tokens = torch.stack(list(feats.pooler_output))  # (B, merged tokens, width)
    if tokens.shape[1] != (CELLS // 2) ** 2:
        raise ValueError(
            f"seeing needs {(CELLS // 2) ** 2} merged tokens a picture, not {tokens.shape[1]}"
        )
    out = in_cells(head(tokens))
    kinds = torch.stack([k for k, _ in targets])
    boxes = torch.stack([b for _, b in targets])
    n = len(KINDS) + 1
    ce = F.cross_entropy(out[..., :n].flatten(0, 1), kinds.flatten())
    held = kinds > 0
    l1 = F.l1_loss(out[..., n:][held], boxes[held]) if held.any() else out.sum() * 0
    right = (out[..., :n].argmax(-1) == kinds).float().mean()
    return ce + 10 * l1, right.item(), l1.item()


def see_warmup(model, processor, pictures: Pictures, cfg: WarmupSettings, log=print):
    """The seeing warm-up on the vision tower (and its merger) with a throwaway head, pictures
    drawn as the looking warm-up draws them; the losses, one per step."""
    import torch

    head = see_head(model)
    recent: list[tuple[float, float]] = []

    def loss_of(rng: random.Random):
        drawn = pictures.draw(cfg.look_batch, rng)
        targets = [see_targets(found) for _, found in drawn]
        loss, right, l1 = see_loss(model, head, processor, [p for p, _ in drawn], targets)
        recent.append((right, l1))
        return loss

    def report(step: int) -> None:
        if step % 100 == 0 or step == cfg.see_steps:
            right, l1 = recent[-1]
            log(f"see {step}/{cfg.see_steps}: cells right {right:.3f}, box L1 {l1:.4f}")

    parts = torch.nn.ModuleList([model.model.visual, head])
    return run_warmup(parts, cfg, "see", cfg.see_steps, loss_of, log, report)
