"""What a competent agent answers in the shapes world, and the agents' real prompts for it.

The targets come from the caption's scene graph and the detector (world/): Data-CoT lists what
the detector found (labels, boxes), Concept-CoT names the requirements the image misses,
Thesis-CoT repaints a box for each missing or wrong object with a local prompt, the validator
scores AFTER by the share of requirements met. The prompts are not written here: each target is
recorded by calling the real agent function (agents/) with a `Recorder`, a chat model of the
in-process backend that answers with the target, so that the model trained on them sees exactly
the prompt, field guide and image that the in-process and vLLM paths send.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from random import Random
from typing import Any

from artloop import agents
from artloop.agents.schemas import ASPECT_IDS, Critique, EditPlan, ImageFacts
from artloop.config import LoopConfig
from artloop.models.inprocess import ChatQwen2VLLocal, to_qwen_messages
from artloop.tools.image_facts import measure
from artloop.world.check import Report, Requirement, check, matches
from artloop.world.detect import Detection, detect
from artloop.world.language import COLOURS, Phrase, Spec, parse
from artloop.world.scenes import Obj, Scene
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image
from pydantic import PrivateAttr

# The loop's default accept score (7 of 10), as a share of requirements met.
ACCEPT = LoopConfig.model_fields["accept_score"].default / 10
# Where a missing object is drawn when its phrase says nothing about where: candidate centres.
_SPOTS = [(x, y) for y in (0.25, 0.5, 0.75) for x in (0.25, 0.5, 0.75)]
_SIDE = {"left": (0.25, None), "right": (0.75, None), "top": (None, 0.25), "bottom": (None, 0.75)}
_EXTENT = {"small": 0.26, "large": 0.40, None: 0.34}  # the repainted box, a bit over the shape


def grid(box: tuple[float, float, float, float]) -> list[int]:
    """A box as shares of the image side -> artloop's 0-1000 grid."""
    return [min(1000, max(0, round(v * 1000))) for v in box]


def _label(d: Detection) -> str:
    return d.text()  # "small red circle": one to three words


def facts(detections: list[Detection]) -> dict:
    """Data-CoT: the detected shapes, largest first (at most 4)."""
    ds = sorted(detections, key=lambda d: -d.area)[:4]
    if not ds:
        return {
            "description": "a blank white picture, no shapes",
            "objects": [],
            "lighting": "flat, even light, no shadows",
            "palette": "white",
        }
    listing = ", ".join(_label(d) for d in ds)
    colours = list(dict.fromkeys(d.colour for d in ds))
    return {
        "description": f"{len(ds)} flat shape{'s' if len(ds) > 1 else ''} on white: {listing}"[
            :240
        ],
        "objects": [{"label": _label(d), "box": grid(d.box)} for d in ds],
        "lighting": "flat, even light, no shadows",
        "palette": f"{' and '.join(colours)} on white, saturated"[:80],
    }


def _line(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "."


def _artifact(r: Requirement, report: Report) -> dict:
    """An unmet requirement as SynArtifact's class: a wrong colour is a misbinding, a missing
    or extra object an omission or a duplication, a wrong place a position misbinding."""
    phrase = parse(r.asked).phrases[0]
    same_shape = [d for d in report.detections if d.shape == phrase.shape]
    box = grid(same_shape[0].box) if same_shape and r.kind in ("object", "size") else None
    kind = {
        "object": "color_misbinding" if same_shape else "omission",
        "count": "duplication" if len(same_shape) > phrase.count else "omission",
        "size": "object_distortion",
    }.get(r.kind, "position_misbinding")
    return {"note": _line(r.asked, 60), "kind": kind, "box": box, "severity": 2}


def short(r: Requirement) -> str:
    """A requirement in a few words: "red circle", "2 circles", "small square", "circle left
    of square" (colours only where both shapes are alike), "circle at right"."""
    spec = parse(r.asked)
    p = spec.phrases[0]
    match r.kind:
        case "object":
            return f"{p.colour} {p.shape}" if p.colour else p.shape
        case "count":
            return f"{p.count} {p.shape}s"
        case "size":
            return f"{p.size} {p.shape}"
        case "relation":
            i, rel, j = spec.relations[0]
            a, b = spec.phrases[i], spec.phrases[j]
            alike = a.shape == b.shape
            name = [f"{x.colour} {x.shape}" if alike and x.colour else x.shape for x in (a, b)]
            return f"{name[0]} {rel} {name[1]}"
    return f"{p.shape} at {spec.positions[0][1]}"


def checklist(report: Report, head: str = "", lines: int = 3, width: int = 80) -> list[str]:
    """Every requirement in the prompt's order, met or not ("red circle yes, 2 circles no"),
    wrapped into at most `lines` lines: the reasoning a judge spells out before its score, so
    that the score is a count of what it wrote (only the last lines are cut when too long)."""
    out, line = [], head
    for item in (f"{short(r)} {'yes' if r.met else 'no'}" for r in report.requirements):
        joined = f"{line}, {item}" if line and line != head else f"{line}{item}"
        if len(joined) <= width:
            line = joined
            continue
        out.append(line)
        line = item
    return [*out, line][:lines]


def critique(report: Report) -> dict:
    """Concept-CoT: the checklist of what the prompt asks, met or not; then the unmet
    requirements as missing objects and artifacts, and the alignment as the share met."""
    unmet = report.unmet()
    observations = checklist(report)
    aspects = {a: {"note": "flat shapes on white", "rating": 7} for a in ASPECT_IDS}
    # A clean flat picture: only the composition (what is where) can be wrong.
    aspects["composition"] = {
        "note": "not as asked" if unmet else "as asked",
        "rating": round(4 + 5 * report.score),
    }
    return {
        "observations": observations,
        "missing": [_line(r.asked, 40) for r in unmet if r.kind == "object"][:3],
        "artifacts": [_artifact(r, report) for r in unmet[:3]],
        "aesthetics": aspects,
        "prompt_alignment": round(10 * report.score),
        "summary": _line(f"fix: {unmet[0].asked}" if unmet else "", 120),
    }


_OFFSET = {"left of": (-0.35, 0), "right of": (0.35, 0), "above": (0, -0.35), "below": (0, 0.35)}


def _related(spec: Spec, i: int, report: Report) -> tuple[float, float] | None:
    """Where phrase i belongs by a relation to a shape that is drawn: beside it."""
    for a, rel, b in spec.relations:
        other, sign = (b, 1) if a == i else (a, -1) if b == i else (None, 0)
        if other is None:
            continue
        drawn = [d for d in report.detections if matches(spec.phrases[other], d)]
        if drawn:
            dx, dy = _OFFSET[rel]
            return drawn[0].x + sign * dx, drawn[0].y + sign * dy
    return None


def _spot(phrase: Phrase, where: str | None, taken: list[Detection]) -> tuple[float, float]:
    """A centre for a missing object: on its side when the caption says so, else the free
    candidate farthest from every shape drawn."""
    fx, fy = _SIDE.get(where or "", (None, None))
    spots = [(x, y) for x, y in _SPOTS if (fx is None or x == fx) and (fy is None or y == fy)]
    if not taken:
        return spots[len(spots) // 2]
    return max(spots, key=lambda s: min((s[0] - d.x) ** 2 + (s[1] - d.y) ** 2 for d in taken))


def _region(phrase: Phrase, centre: tuple[float, float]) -> list[int]:
    half = _EXTENT[phrase.size] / 2
    x, y = (min(1 - half, max(half, c)) for c in centre)
    return grid((x - half, y - half, x + half, y + half))


def plan(spec: Spec, report: Report, prompt: str) -> dict:
    """Thesis-CoT: one regional repaint per phrase whose object is missing, in a free spot (or
    on the wrong-coloured shape of its kind, which it replaces); the prompt kept."""
    edits = []
    placed = dict(spec.positions)
    for i, phrase in enumerate(spec.phrases):
        missing = any(
            r.kind == "object" and not r.met and r.asked == phrase.text()
            for r in report.requirements
        )
        if not missing or len(edits) == 3:
            continue
        wrong = [d for d in report.detections if d.shape == phrase.shape]
        if wrong:
            box = grid(wrong[0].box)
        else:
            centre = _related(spec, i, report) or _spot(
                phrase, placed.get(i), list(report.detections)
            )
            box = _region(phrase, centre)
        local = Phrase(phrase.shape, phrase.colour, 1, phrase.size).text()
        edits.append({"box": box, "prompt": local, "strength": 0.9})
    if edits:
        rationale = "repaint what is missing: " + ", ".join(e["prompt"] for e in edits)
    elif report.unmet():
        rationale = "the layout is off; redraw with the prompt as it is"
    else:
        rationale = "nothing to fix"
    return {
        "rationale": _line(rationale, 120),
        "revised_prompt": prompt,
        "negative_prompt": "",
        "regional_edits": edits,
        "params": {
            "guidance_scale": None,
            "num_inference_steps": None,
            "strength": None,
            "exposure": None,
            "contrast": None,
            "saturation": None,
        },
    }


def verdict(before: Report, after: Report) -> dict:
    """The validator: BEFORE's and AFTER's checklists (BEFORE's as a count where both do not
    fit), then AFTER's share of requirements met as its score; better when it meets more than
    BEFORE; accepted at the loop's accept score, rejected when worse."""
    first = checklist(before, "BEFORE ", lines=2)
    then = checklist(after, "AFTER ", lines=2)
    if len(first) + len(then) > 3:
        met = sum(r.met for r in before.requirements)
        first = [f"BEFORE {met} of {len(before.requirements)} met"]
    reasons = [*first, *then]
    better = after.score > before.score
    if after.score < before.score:
        decision = "reject"
    elif after.score >= ACCEPT:
        decision = "accept"
    else:
        decision = "revise"
    return {
        "reasons": reasons[:3],
        "better_than_before": better,
        "score": round(10 * after.score, 1),
        "verdict": decision,
    }


def perturb(scene: Scene, rng: Random) -> list[Obj]:
    """The scene with one thing wrong (an object dropped, recoloured or mirrored), or as is."""
    objects = list(scene.objects)
    i = rng.randrange(len(objects))
    match rng.choice(("drop", "recolour", "mirror", "none")):
        case "drop" if len(objects) > 1:
            del objects[i]
        case "recolour":
            colour = rng.choice([c for c in COLOURS if c != objects[i].colour])
            objects[i] = Obj(**{**asdict(objects[i]), "colour": colour})
        case "mirror":
            objects = [Obj(**{**asdict(o), "x": 1 - o.x}) for o in objects]
    return objects


class Recorder(ChatQwen2VLLocal):
    """An in-process chat model that loads nothing: it answers each call with the `answer`
    set before it and keeps the conversation it was sent (so the prompt is the backend's own:
    the field guide, not the JSON schema)."""

    answer: str = ""
    _calls: list[tuple[list, str, dict]] = PrivateAttr(default_factory=list)

    def _generate(self, messages, stop=None, run_manager=None, json_schema=None, **kw):
        self._calls.append((messages, self.answer, json_schema))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=self.answer))])


@dataclass
class Example:
    """One agent call: its conversation (Qwen chat messages), images and target answer."""

    agent: str
    chat: list[dict]
    images: list[Image.Image]
    answer: str
    schema: dict = field(repr=False, default_factory=dict)


def answer_text(target: dict) -> str:
    """A target as the grammar writes it (xgrammar, no free whitespace): json.dumps' spacing."""
    return json.dumps(target, ensure_ascii=False)


def record_episode(
    recorder: Recorder,
    prompt: str,
    spec: Spec,
    before: Image.Image,
    after: Image.Image,
    params: dict[str, Any],
    rng: Random,
) -> list[Example]:
    """The five agents' calls of one loop iteration (enhance, data_cot, concept_cot, thesis_cot,
    validate) on `before` (and `after`, the edited image), each answered with its target."""
    start = len(recorder._calls)
    report_before = check(spec, detect(before))
    report_after = check(spec, detect(after))
    stats_before, stats_after = measure(before), measure(after)
    revision = rng.random() < 0.5  # a later round: the last prompt and the judge's feedback

    def ask(target: dict, fn, *args, **kwargs):
        recorder.answer = answer_text(target)
        return fn(recorder, *args, **kwargs).output

    verdict_target = verdict(report_before, report_after)
    ask(
        {"prompt": prompt, "negative_prompt": ""},
        agents.enhance,
        prompt,
        previous_prompt=prompt if revision else None,
        feedback=verdict_target["reasons"] if revision else None,
    )
    seen = ask(facts(list(report_before.detections)), agents.data_cot, before, prompt, stats_before)
    said = ask(critique(report_before), agents.concept_cot, before, prompt, seen, stats_before)
    assert isinstance(seen, ImageFacts) and isinstance(said, Critique)
    planned = ask(
        plan(spec, report_before, prompt), agents.thesis_cot, before, prompt, prompt, params, said
    )
    assert isinstance(planned, EditPlan)
    ask(
        verdict_target,
        agents.validate,
        before,
        after,
        prompt,
        planned,
        stats_before,
        stats_after,
    )
    names = ("enhance", "data_cot", "concept_cot", "thesis_cot", "validate")
    out = []
    for name, (messages, answer, schema) in zip(names, recorder._calls[start:], strict=True):
        chat, images = to_qwen_messages(messages)
        out.append(Example(name, chat, images, answer, schema))
    del recorder._calls[start:]
    return out
