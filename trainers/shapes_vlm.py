"""tiny-shapes-qwen2vl: a Qwen2-VL trained from scratch to be the five agents in the shapes world.

Data: episodes of one loop iteration on training scenes (world/): a BEFORE image (a
tiny-shapes-sd sample of the caption, or a render of the scene with an object dropped,
recoloured or moved) and an AFTER image for the validator; each agent's real prompt recorded with
its target (trainers/shapes_agents.py). The tokenizer is a byte-level BPE trained on those
prompts and answers (the agents' prompts are ~2.7k tokens in the stdlib-trained tiny one, ~1.2k
in this). Training is next-token cross-entropy on the answer tokens only. The system message is
the same in every call, so each step runs it once and shares its keys and values with the
batch's rows (gradients flow back through the shared copy): a step costs about what the rows'
own tokens cost.
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

from artloop.trainers.common import help_field
from artloop.world.scenes import render, sample_scenes

if TYPE_CHECKING:  # the agents (langchain) are imported where they run: the CLI starts without
    from artloop.trainers.shapes_agents import Example

MODEL_ID = "tiny-shapes-qwen2vl"
# Qwen2-VL's architecture, grown from the random tiny one (hidden 128, 2 layers): head dim 32
# (vLLM's CPU attention wants it). Images: 64 px upscaled to 112 px = 8 x 8 patches of 14 px
# -> 16 merged tokens (at the tiny default's 56 px minimum, 4 tokens: too coarse for boxes).
ARCH = {
    "family": "qwen2-vl",
    "vocab_size": 4096,
    "text": {
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
    },
    "vision": {"depth": 2, "embed_dim": 64, "num_heads": 2},
    "min_pixels": 112 * 112,
    "max_pixels": 112 * 112,
    "max_positions": 8192,
}


@dataclass
class ShapesVLMTraining:
    """Train tiny-shapes-qwen2vl from scratch on the five agents' prompts (CPU: ~1 h on 2 cores)."""

    output_dir: str = help_field("tiny-shapes-qwen2vl", help="Where the model directory goes")
    seed: int = help_field(0, help="Seed of the weights, the episodes and their order")
    episodes: int = help_field(2000, help="Loop iterations recorded (five agent calls each)")
    sd_model: str = help_field(
        "tiny-shapes-sd", help="Diffusion model whose samples are half the BEFORE images"
    )
    sd_share: float = help_field(0.5, help="Share of BEFORE images sampled (the rest rendered)")
    steps: int = help_field(1500, help="Training steps")
    batch_size: int = help_field(16, help="Agent calls per step")
    lr: float = help_field(1e-3, help="Peak learning rate (AdamW), warm-up then cosine decay")
    warmup: int = help_field(100, help="Linear warm-up steps")
    max_grad_norm: float = help_field(1.0, help="Gradient clipping norm")
    eval_scenes: int = help_field(50, help="Held-out scenes evaluated after training (0: none)")

    def check(self) -> None:
        """ValueError naming the first field out of its range."""
        for name in ("episodes", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not 0 <= self.sd_share <= 1:
            raise ValueError(f"sd_share must be in [0, 1], not {self.sd_share}")
        if self.warmup < 0 or self.eval_scenes < 0:
            raise ValueError("warmup and eval_scenes must not be negative")


# --- the data: episodes of the loop, each agent's prompt recorded with its target ------------
def episodes(cfg: ShapesVLMTraining, split: str, n: int, seed: int, log=print) -> list[Example]:
    """`n` recorded loop iterations on scenes of `split`: five examples each."""
    from artloop.trainers.shapes_agents import Recorder, perturb, record_episode

    scenes = sample_scenes(split, n, seed=seed)
    rng = random.Random(seed)
    captions = [s.caption(rng) for s in scenes]
    sampled = _samples(cfg, captions, seed) if cfg.sd_share > 0 else [None] * n
    recorder = Recorder()
    out: list[Example] = []
    for k, (scene, caption, image) in enumerate(zip(scenes, captions, sampled, strict=True)):
        use_sd = image is not None and rng.random() < cfg.sd_share
        before = image if use_sd else render(perturb(scene, rng))
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


def corpus(examples: list[Example], limit: int = 2000) -> list[str]:
    """The tokenizer's training text: the calls' texts as often as training sees them (the
    shared system message most of all), and their answers."""
    texts = []
    for e in examples[:limit]:
        texts.append(e.chat[0]["content"])
        texts += [p["text"] for p in e.chat[1]["content"] if p.get("type") == "text"]
        texts.append(e.answer)
    return texts


def new_model(examples: list[Example], seed: int):
    """The untrained model and its processor (tokenizer trained on `examples`)."""
    from artloop.models.tiny.vlm import new_vlm

    return new_vlm({**ARCH, "seed": seed}, corpus(examples))


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


def train(model, processor, examples: list[Example], cfg: ShapesVLMTraining, log=print) -> list:
    """AdamW with warm-up and cosine decay, gradient clipping; the losses, one per step."""
    import torch
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
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[order.pop()] for _ in range(cfg.batch_size)]
        loss = batch_loss(model, processor, batch, prefix)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 50 == 0 or step == cfg.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(
                f"step {step + 1}/{cfg.steps} loss {recent:.4f} ({time.perf_counter() - start:.0f}s)"
            )
    model.eval()
    return losses


def train_shapes_vlm(cfg: ShapesVLMTraining, log: Callable[[str], None] = print) -> dict:
    """Record the episodes, train, save (safetensors, float32: 20 MB) with a model card; the
    held-out figures when `eval_scenes` > 0."""
    from artloop.models.tiny.vlm import save_vlm
    from artloop.trainers.shapes_eval import evaluate_agents, model_card

    cfg.check()
    start = time.perf_counter()
    examples = episodes(cfg, "train", cfg.episodes, cfg.seed, log)
    log(f"recorded {len(examples)} agent calls in {time.perf_counter() - start:.0f}s")
    model, processor = new_model(examples, cfg.seed)
    lengths = [
        len(processor.tokenizer(_prompt_text(processor, e))["input_ids"]) for e in examples[:5]
    ]
    log(f"prompt tokens of one episode's calls: {lengths}")
    losses = train(model, processor, examples, cfg, log)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_vlm(model, processor, out)
    summary = {
        "model": MODEL_ID,
        "config": asdict(cfg),
        "arch": ARCH,
        "examples": len(examples),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "seconds": round(time.perf_counter() - start),
    }
    if cfg.eval_scenes:
        summary["heldout"] = evaluate_agents(out, "heldout", cfg.eval_scenes, seed=cfg.seed)
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    (out / "README.md").write_text(model_card(summary))
    log(f"saved {out} in {summary['seconds']}s")
    return summary
