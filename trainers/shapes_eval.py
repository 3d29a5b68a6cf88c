"""How well a VLM does the agents' work in the shapes world, measured against the detector.

On held-out scenes (BEFORE and AFTER: renders of the scene, each with one thing wrong or none),
through the real agent functions and the model's in-process backend:
- enhance: the share of prompts kept word for word (the diffusion model knows only the
  world's captions);
- Data-CoT: object F1 against the detector (a listed object is right when a detected shape has
  its colour and shape) and the mean box IoU of the matched ones;
- Concept-CoT: the rank correlation of its prompt alignment with the `shapes` score;
- validator: the rank correlation of its score with AFTER's `shapes` score, and its
  better-than-before agreement with the scores' order.
A call that gives no valid answer counts as a failure (and as wrong).
"""

from __future__ import annotations

import random
from pathlib import Path

from artloop import agents
from artloop.models.structured import StructuredOutputError
from artloop.tools.image_facts import measure
from artloop.trainers.shapes_agents import perturb
from artloop.world.check import check
from artloop.world.detect import detect
from artloop.world.language import parse
from artloop.world.scenes import render, sample_scenes


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _kind(label: str) -> tuple[str | None, str | None]:
    """(colour, shape) of a listed object's label, read as a caption's first noun phrase."""
    try:
        phrase = parse(label).phrases[0]
    except ValueError:  # names no shape: matches nothing
        return None, None
    return phrase.colour, phrase.shape


def object_match(objects: list[dict], detections) -> tuple[int, int, int, list[float]]:
    """(true positives, listed, detected, IoUs of the matches): each listed object matched to
    an unmatched detection of its colour and shape, the best-overlapping first."""
    free = list(detections)
    ious = []
    for o in objects:
        colour, shape = _kind(o["label"])
        box = [v / 1000 for v in o["box"]]
        same = [d for d in free if d.colour == colour and d.shape == shape]
        if same:
            best = max(same, key=lambda d: _iou(box, d.box))
            free.remove(best)
            ious.append(_iou(box, best.box))
    return len(ious), len(objects), len(detections), ious


def _spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def evaluate_agents(
    model_dir: Path | str, split: str = "heldout", n: int = 30, seed: int = 0, chat=None
) -> dict:
    """The figures above on `n` scenes of `split` (`chat`: the model to ask; default the
    in-process backend on `model_dir`)."""
    from artloop.models.inprocess import ChatQwen2VLLocal

    chat = chat or ChatQwen2VLLocal(model=str(model_dir), max_new_tokens=400)
    rng = random.Random(seed)
    scenes = sample_scenes(split, n, seed=seed + 70_000)  # not training's scenes
    kept = tp = listed = detected = failures = 0
    ious: list[float] = []
    alignment, truth, judged, after_truth, order_right = [], [], [], [], []
    for scene in scenes:
        caption = scene.caption(rng)
        before, after = render(perturb(scene, rng)), render(perturb(scene, rng))
        report, report_after = check(scene.spec, detect(before)), check(scene.spec, detect(after))
        stats, stats_after = measure(before), measure(after)
        try:
            kept += agents.enhance(chat, caption).output.prompt == caption
            facts = agents.data_cot(chat, before, caption, stats).output
            t, p, g, m = object_match([o.model_dump() for o in facts.objects], report.detections)
            tp, listed, detected, ious = tp + t, listed + p, detected + g, ious + m
            critique = agents.concept_cot(chat, before, caption, facts, stats).output
            alignment.append(critique.prompt_alignment)
            truth.append(report.score)
            plan = agents.thesis_cot(
                chat, before, caption, caption, {"guidance_scale": 5.0}, critique
            ).output
            verdict = agents.validate(chat, before, after, caption, plan, stats, stats_after).output
            judged.append(verdict.score)
            after_truth.append(report_after.score)
            if report_after.score != report.score:
                order_right.append(
                    verdict.better_than_before == (report_after.score > report.score)
                )
        except StructuredOutputError:
            failures += 1
    precision = tp / listed if listed else 0.0
    recall = tp / detected if detected else 0.0
    return {
        "split": split,
        "n": n,
        "seed": seed,
        "enhance_kept": kept / n,
        "objects_f1": 2 * precision * recall / (precision + recall) if tp else 0.0,
        "objects_precision": precision,
        "objects_recall": recall,
        "box_iou": sum(ious) / len(ious) if ious else 0.0,
        "alignment_spearman": _spearman(alignment, truth),
        "validator_spearman": _spearman(judged, after_truth),
        "validator_order": sum(order_right) / len(order_right) if order_right else None,
        "failures": failures,
    }


def _stage(summary: dict, number: int) -> list[str]:
    """One training run of the model: its data and steps."""
    cfg = summary["config"]
    went_on = f", going on from stage {number - 1}'s weights" if cfg.get("init_from") else ""
    commit = f" at artloop commit {summary['commit']}" if summary.get("commit") else ""
    lines = [
        f"### Stage {number}: `train-shapes-vlm`{commit}{went_on}",
        f"- data: {cfg['episodes']} loop iterations on training scenes (seed {cfg['seed']}), "
        f"five agent calls each ({summary['examples']} examples); BEFORE images: "
        f"{cfg['sd_share']:.0%} samples of {cfg['sd_model']}, the rest renders with one thing "
        "wrong; targets from the scene graph and the `shapes` detector "
        "(artloop/trainers/shapes_agents.py)",
    ]
    if cfg["copy_steps"] or cfg["see_steps"] or cfg["look_steps"]:
        lines.append(
            f"- warm-ups (artloop/trainers/shapes_warmups.py): {cfg['copy_steps']} copying steps "
            f"of {cfg['copy_batch']} word strings, then {cfg['see_steps']} seeing steps (the "
            f"vision tower alone: each cell's shape and box) and {cfg['look_steps']} looking "
            f"steps of {cfg['look_batch']} pictures (a picture -> its shapes with boxes), drawn "
            f"from {cfg['pictures']} renders and the BEFORE pictures"
        )
    lines.append(
        f"- {cfg['steps']} steps of {cfg['batch_size']} calls, each with {cfg['rehearse_copy']} "
        f"copying strings and {cfg['rehearse_look']} looking pictures rehearsed, AdamW lr "
        f"{cfg['lr']:g} (warm-up {cfg['warmup']}, cosine), clipping {cfg['max_grad_norm']:g}; "
        f"loss on the answer tokens, final {summary['final_loss']:.4f}; {summary['seconds']} s"
    )
    if summary.get("note"):
        lines.append(f"- {summary['note']}")
    return lines


def _figures(h: dict) -> list[str]:
    lines = [
        f"Measured on {h['n']} held-out scenes (artloop/trainers/shapes_eval.py, seed "
        f"{h.get('seed', 0)}):",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    for key, value in h.items():
        if key not in ("split", "n", "seed"):
            shown = (
                "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else value
            )
            lines.append(f"| {key} | {shown} |")
    return lines


def model_card(summary: dict) -> str:
    """The README.md of a trained tiny-shapes-qwen2vl: architecture, each training stage (a run
    that went on from another's weights lists that one first), the held-out figures."""
    arch = summary["arch"]
    text = arch["text"]
    stages = [summary]
    while "continued_from" in stages[0]:
        stages.insert(0, stages[0]["continued_from"])
    lines = [
        "# tiny-shapes-qwen2vl",
        "",
        "A Qwen2-VL (transformers' `Qwen2VLForConditionalGeneration`, the published Qwen2-VL-"
        "Instruct's chat template and special tokens) trained from scratch by "
        "`artloop models train-shapes-vlm` to be artloop's five agents (enhance, Data-CoT, "
        "Concept-CoT, Thesis-CoT, validator) in the shapes world (artloop.world). "
        "Random-weight models are for tests; this one is trained, and its figures are below.",
        "",
        "## Architecture",
        f"- text: hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, "
        f"{text['num_attention_heads']} heads ({text['num_key_value_heads']} KV), "
        f"MLP {text['intermediate_size']}; vocabulary {arch['vocab_size']} (byte-level BPE "
        "trained on the agents' prompts and answers)",
        f"- vision: depth {arch['vision']['depth']}, width {arch['vision']['embed_dim']}; "
        f"images resized to {int(arch['min_pixels'] ** 0.5)} px (16 merged tokens)",
        "",
        "## Training",
    ]
    for number, stage in enumerate(stages, 1):
        lines += ["", *_stage(stage, number)]
        if "heldout" in stage and stage is not summary:
            lines += ["", *_figures(stage["heldout"])]
    if "heldout" in summary:
        lines += ["", "## Figures", "", *_figures(summary["heldout"])]
    return "\n".join(lines) + "\n"
