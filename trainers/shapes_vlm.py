"""tiny-shapes-qwen2vl: a Qwen2-VL trained from scratch to be the five agents in the shapes world.

Data: episodes of one loop iteration on training scenes (world/): a BEFORE image (a
tiny-shapes-sd sample of the caption, or a render of the scene with an object dropped,
recoloured or moved) and an AFTER image for the validator; each agent's real prompt recorded with
its target (trainers/shapes_agents.py). The tokenizer: a byte-level BPE trained on those prompts
and answers, plus one token per fixed line of the prompts (`fixed_lines`): a call is 130-360
tokens, where the stdlib-trained tiny tokenizer makes it 2.5k-3.6k. Training is next-token
cross-entropy on the answer tokens only. The system message is the same in every call, so each
step runs it once and shares its keys and values with the batch's rows (gradients flow back
through the shared copy).

Before the agents' calls, two warm-ups (trainers/shapes_warmups.py): copying (strings of the
calls' words, said twice), so that the model copies captions and boxes instead of learning the
training captions by heart; and looking (a picture -> Data-CoT's object list with boxes, fresh
pictures every step), so that the vision tower learns where things are.
"""

from __future__ import annotations

# Deliberately lazy: torch, transformers and diffusers are imported inside the functions that use
# them, so that importing this module (the CLI's --help, a test) does not load them.
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from artloop.models.tiny.vlm import SHAPES_CONFIG
from artloop.trainers.common import help_field
from artloop.world.scenes import render, sample_scenes

if TYPE_CHECKING:  # the agents (langchain) are imported where they run: the CLI starts without
    from artloop.trainers.shapes_agents import Example

MODEL_ID = "tiny-shapes-qwen2vl"
ARCH = SHAPES_CONFIG  # models/tiny/vlm.py: the registry reads its image settings without torch


@dataclass
class ShapesVLMTraining:
    """Train tiny-shapes-qwen2vl from scratch on the five agents' prompts (CPU: ~1.4 h on 2 cores)."""

    output_dir: str = help_field("tiny-shapes-qwen2vl", help="Where the model directory goes")
    init_from: str = help_field(
        "",
        help="A trained tiny-shapes-qwen2vl directory to go on from (its weights and tokenizer;"
        " set the warm-ups' steps to 0 to skip them); empty: from scratch",
    )
    seed: int = help_field(0, help="Seed of the weights, the episodes and their order")
    episodes: int = help_field(4000, help="Loop iterations recorded (five agent calls each)")
    sd_model: str = help_field(
        "tiny-shapes-sd", help="Diffusion model whose samples are half the BEFORE images"
    )
    sd_share: float = help_field(0.5, help="Share of BEFORE images sampled (the rest rendered)")
    copy_steps: int = help_field(
        600, help="Copying warm-up steps before the agents' calls (random word strings, twice)"
    )
    copy_batch: int = help_field(64, help="Strings per copying warm-up step")
    see_steps: int = help_field(
        1000, help="Seeing warm-up steps: the vision tower alone, each cell's shape and box"
    )
    look_steps: int = help_field(
        1500, help="Looking warm-up steps: a picture -> its shapes with boxes (fresh pictures)"
    )
    look_batch: int = help_field(32, help="Pictures per seeing and looking warm-up step")
    pictures: int = help_field(
        8000, help="Renders the seeing and looking warm-ups draw from, beside the BEFORE pictures"
    )
    steps: int = help_field(2000, help="Training steps")
    rehearse_copy: int = help_field(
        16, help="Copying strings added to each training step (0: none), so it is not forgotten"
    )
    rehearse_look: int = help_field(
        8, help="Looking pictures added to each training step (0: none), so it is not forgotten"
    )
    batch_size: int = help_field(16, help="Agent calls per step")
    lr: float = help_field(1e-3, help="Peak learning rate (AdamW), warm-up then cosine decay")
    warmup: int = help_field(100, help="Linear warm-up steps")
    max_grad_norm: float = help_field(1.0, help="Gradient clipping norm")
    eval_scenes: int = help_field(50, help="Held-out scenes evaluated after training (0: none)")

    def check(self) -> None:
        """ValueError naming the first field out of its range."""
        for name in ("episodes", "steps", "batch_size", "copy_batch", "look_batch", "pictures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not 0 <= self.sd_share <= 1:
            raise ValueError(f"sd_share must be in [0, 1], not {self.sd_share}")
        counts = ("warmup", "eval_scenes", "copy_steps", "see_steps", "look_steps")
        for name in (*counts, "rehearse_copy", "rehearse_look"):  # 0 turns each off
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")


# --- the data: episodes of the loop, each agent's prompt recorded with its target ------------
def episodes(cfg: ShapesVLMTraining, split: str, n: int, seed: int, log=print) -> list[Example]:
    """`n` recorded loop iterations on scenes of `split`: five examples each."""
    from artloop.trainers.shapes_agents import Recorder, perturb, record_episode

    scenes = sample_scenes(split, n, seed=seed)
    rng = random.Random(seed)
    captions = [s.caption(rng) for s in scenes]
    drawn = [k for k in range(n) if rng.random() < cfg.sd_share]  # BEFORE sampled, not rendered
    sampled = dict(zip(drawn, _samples(cfg, [captions[k] for k in drawn], seed), strict=True))
    recorder = Recorder()
    out: list[Example] = []
    for k, (scene, caption) in enumerate(zip(scenes, captions, strict=True)):
        before = sampled[k] if k in sampled else render(perturb(scene, rng))
        after = render(perturb(scene, rng)) if rng.random() < 0.7 else render(scene)
        params = {
            "width": 64,
            "height": 64,
            "num_inference_steps": 20,
            "guidance_scale": 5.0,
            "seed": k,
        }
        out += record_episode(recorder, caption, scene.spec, before, after, params, rng)
        if (k + 1) % 500 == 0:
            log(f"recorded {k + 1}/{n} episodes")
    return out


def _samples(cfg: ShapesVLMTraining, captions: list[str], seed: int, batch: int = 50) -> list:
    """One tiny-shapes-sd sample per caption (seed + i), as the loop would draw it."""
    if not captions:
        return []
    import torch
    from artloop.models.tiny import resolve_model
    from artloop.models.tiny.shapes_sd import sample
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_model(cfg.sd_model), use_safetensors=True, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, len(captions), batch):
        part = captions[i : i + batch]
        images += sample(pipe, part, [seed + i + j for j in range(len(part))])
    return images


# --- the model -------------------------------------------------------------------------------
def _prompt_text(processor, e: Example) -> str:
    return processor.apply_chat_template(e.chat, tokenize=False, add_generation_prompt=True)


def _texts(e: Example) -> list[str]:
    """The call's message texts: the system message, then the user message's text parts."""
    return [e.chat[0]["content"]] + [p["text"] for p in e.chat[1]["content"] if "text" in p]


def corpus(examples: list[Example], fixed: set[str], limit: int = 2000) -> list[str]:
    """The BPE's training text: the calls' lines that are not `fixed` (those are one token
    each), as often as training sees them, and the answers."""
    texts = []
    for e in examples[:limit]:
        texts += [line for t in _texts(e) for line in t.split("\n") if line not in fixed]
        texts.append(e.answer)
    return texts


def fixed_lines(examples: list[Example], share: float = 0.05, least: int = 30) -> list[str]:
    """The prompts' fixed lines: every line of at least `least` characters that occurs in at
    least `share` of the calls (the system message, each agent's task, worked example and
    field guide), but no caption, statistic or answer, which vary."""
    counts: dict[str, int] = {}
    for e in examples:
        for line in {line for t in _texts(e) for line in t.split("\n") if len(line) >= least}:
            counts[line] = counts.get(line, 0) + 1
    return sorted(line for line, n in counts.items() if n >= share * len(examples))


def new_model(examples: list[Example], seed: int, fixed: list[str] | None = None):
    """The untrained model and its processor: a BPE trained on `examples`, and each of the
    prompts' fixed lines (`fixed`, computed when not given) one token. A fixed line says the same in every call, so as one token
    it tells the model all it did, and the prompts shrink from ~2k tokens to ~0.2k (attention
    to them was half a step's cost)."""
    from artloop.models.tiny.vlm import new_vlm

    fixed = fixed_lines(examples) if fixed is None else fixed
    return new_vlm({**ARCH, "seed": seed}, corpus(examples, set(fixed)), fixed)


def load_model(path: str):
    """A trained model and its processor, in float32 for training (stored in float16)."""
    import torch
    from artloop.models.tiny.vlm import load_processor
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model, load_processor(path)


@dataclass
class _Batch:
    ids: object  # (B, T) right-padded, prefix included
    mask: object  # (B, T)
    pixels: object | None
    grid: object | None
    mm_types: object
    answer: list[tuple[int, int]]  # each row's answer token span [start, end) in ids


def _encode(processor, batch: list[Example]) -> _Batch:
    texts = [_prompt_text(processor, e) + e.answer + "<|im_end|>" for e in batch]
    images = [im for e in batch for im in e.images]
    tok = processor.tokenizer
    tok.padding_side = "right"
    enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    spans = []
    for e, length in zip(batch, lengths, strict=True):
        n = len(tok(e.answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
        spans.append((length - n, length))
    return _Batch(
        enc["input_ids"],
        enc["attention_mask"],
        enc.get("pixel_values"),
        enc.get("image_grid_thw"),
        enc["mm_token_type_ids"],
        spans,
    )


def prefix_ids(processor) -> list[int]:
    """The tokens every agent call starts with: the system message."""
    from artloop.agents.base import system_text

    head = processor.apply_chat_template(
        [{"role": "system", "content": system_text()}], tokenize=False
    )
    return processor.tokenizer(head, add_special_tokens=False)["input_ids"]


def batch_loss(model, processor, batch: list[Example], prefix: list[int]):
    """Mean cross-entropy of the rows' answer tokens; the shared system prefix run once."""
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    b = _encode(processor, batch)
    n, p = b.ids.shape[0], len(prefix)
    if not (b.ids[:, :p] == torch.tensor(prefix)).all():
        raise ValueError("an agent call does not start with the shared system message")
    positions, _ = model.model.get_rope_index(
        b.ids, b.mm_types, image_grid_thw=b.grid, attention_mask=b.mask
    )
    cache = DynamicCache(config=model.config)
    model.model(input_ids=b.ids[:1, :p], cache=cache, use_cache=True)
    cache.batch_repeat_interleave(n)
    hidden = model.model(
        input_ids=b.ids[:, p:],
        attention_mask=b.mask,
        position_ids=positions[:, :, p:],
        cache=cache,
        use_cache=True,
        pixel_values=b.pixels,
        image_grid_thw=b.grid,
    ).last_hidden_state  # (B, T - p, d)
    rows, cols, targets = [], [], []
    for r, (start, end) in enumerate(b.answer):
        rows += [r] * (end - start)
        cols += list(range(start - 1 - p, end - 1 - p))  # position t predicts token t + 1
        targets += b.ids[r, start:end].tolist()
    logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)])
    return F.cross_entropy(logits.float(), torch.tensor(targets))


def words_of(examples: list[Example], fixed: set[str]) -> list[str]:
    """The words the calls vary in (captions, labels, numbers, JSON pieces): what the warm-up
    strings are drawn from."""
    return sorted({w for line in corpus(examples, fixed) for w in line.split() if len(w) <= 24})


def train(
    model,
    processor,
    examples: list[Example],
    cfg: ShapesVLMTraining,
    log=print,
    rehearsals: tuple[Callable, ...] = (),
) -> list:
    """AdamW with warm-up and cosine decay, gradient clipping; each step's loss is the agent
    calls' plus each of `rehearsals(rng)` (a warm-up's batch: without them the agents' calls
    overwrite copying and looking); the agent calls' losses, one per step."""
    import torch
    from artloop.models.tiny.shapes_sd import optimiser_step
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.steps)
    prefix = prefix_ids(processor)
    order: list[int] = []
    losses = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        while len(order) < cfg.batch_size:  # epochs in a new order (fewer calls than a batch)
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[order.pop()] for _ in range(cfg.batch_size)]
        loss = batch_loss(model, processor, batch, prefix)
        total = loss + sum(rehearse(rng) for rehearse in rehearsals)
        optimiser_step(total, opt, sched, list(model.parameters()), cfg.max_grad_norm)
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(
                f"step {step + 1}/{cfg.steps} loss {recent:.4f} ({time.perf_counter() - start:.0f}s)"
            )
    model.eval()
    return losses


def source_commit() -> str | None:
    """The git commit of the artloop checkout that trains (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def train_shapes_vlm(cfg: ShapesVLMTraining, log: Callable[[str], None] = print) -> dict:
    """Record the episodes, train, save (safetensors, float16: 5 MB) with a model card; the
    held-out figures, measured on the stored weights, when `eval_scenes` > 0."""
    from artloop.models.tiny.vlm import save_vlm
    from artloop.trainers.shapes_eval import evaluate_agents, model_card
    from artloop.trainers.shapes_warmups import (
        Pictures,
        copy_loss,
        copy_warmup,
        look_loss,
        look_warmup,
        see_warmup,
    )

    cfg.check()
    start = time.perf_counter()
    examples = episodes(cfg, "train", cfg.episodes, cfg.seed, log)
    log(f"recorded {len(examples)} agent calls in {time.perf_counter() - start:.0f}s")
    fixed = fixed_lines(examples)  # the tokenizer's one-token lines, which the warm-up skips
    model, processor = (
        load_model(cfg.init_from) if cfg.init_from else new_model(examples, cfg.seed, fixed)
    )
    words = words_of(examples, set(fixed))
    copied = copy_warmup(model, processor, words, cfg, log)
    before = [e.images[0] for e in examples if e.agent == "data_cot"]
    pictures = Pictures(before, cfg.pictures, cfg.seed)
    seen = see_warmup(model, processor, pictures, cfg, log)
    looked = look_warmup(model, processor, pictures, cfg, log)
    lengths = [
        len(processor.tokenizer(_prompt_text(processor, e))["input_ids"]) for e in examples[:5]
    ]
    log(f"prompt tokens of one episode's calls: {lengths}")
    rehearsals = []
    if cfg.rehearse_copy:
        rehearsals.append(copy_loss(model, processor, words, cfg.rehearse_copy))
    if cfg.rehearse_look:
        rehearsals.append(look_loss(model, processor, pictures, cfg.rehearse_look))
    losses = train(model, processor, examples, cfg, log, tuple(rehearsals))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_vlm(model.half(), processor, out)  # stored in float16; run (and measured) in float32
    summary = {
        "model": MODEL_ID,
        "config": asdict(cfg),
        "arch": ARCH,
        "examples": len(examples),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "copy_final_loss": sum(copied[-50:]) / len(copied[-50:]) if copied else None,
        "see_final_loss": sum(seen[-50:]) / len(seen[-50:]) if seen else None,
        "look_final_loss": sum(looked[-50:]) / len(looked[-50:]) if looked else None,
        "seconds": round(time.perf_counter() - start),
        "commit": source_commit(),
    }
    if cfg.init_from and (Path(cfg.init_from) / "training.json").exists():
        # The card tells every stage: what this run went on from, and what that one did.
        summary["continued_from"] = json.loads((Path(cfg.init_from) / "training.json").read_text())
    if cfg.eval_scenes:
        summary["heldout"] = evaluate_agents(out, "heldout", cfg.eval_scenes, seed=cfg.seed)
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    (out / "README.md").write_text(model_card(summary))
    log(f"saved {out} in {summary['seconds']}s")
    return summary
