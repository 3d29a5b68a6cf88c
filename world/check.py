"""Scoring an image against what its prompt asks (GenEval's object, count, colour and position
checks, on the detector's output): one requirement per thing asked, met or not, with what the
image shows instead. The score is the share of requirements met.

Requirements of a spec, in order: each phrase's object (at least one of its colour and shape),
its count (exactly that many, for "two ..." and up), its size (that many of the size asked);
then each relation (some object of the first phrase is on that side of some object of the
second, by at least `MARGIN` of the image side, centre to centre) and each position (some
object of the phrase has its centre in that 45% of the image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import product
from typing import Literal

from artloop.world.detect import Detection, detect
from artloop.world.language import Phrase, Spec, parse
from PIL import Image

MARGIN = 0.04  # below the captions' own 0.15: a drawn relation passes, a reversed one fails
_REGION = 0.45  # "on the left": the centre in the left 45%

Kind = Literal["object", "count", "size", "relation", "position"]


@dataclass(frozen=True)
class Requirement:
    kind: Kind
    asked: str  # "two red circles", "a red circle left of a blue square"
    met: bool
    found: str  # what the image shows for it


@dataclass(frozen=True)
class Report:
    requirements: tuple[Requirement, ...]
    detections: tuple[Detection, ...]

    @property
    def score(self) -> float:
        return sum(r.met for r in self.requirements) / len(self.requirements)

    def unmet(self) -> list[Requirement]:
        return [r for r in self.requirements if not r.met]

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "requirements": [asdict(r) for r in self.requirements],
            "detections": [d.to_dict() for d in self.detections],
        }


def matches(p: Phrase, d: Detection) -> bool:
    return d.shape == p.shape and (p.colour is None or d.colour == p.colour)


def _listing(ds: list[Detection]) -> str:
    return ", ".join(d.text() for d in ds) if ds else "none"


def holds(relation: str, a: Detection, b: Detection) -> bool:
    """Is a `relation` b, by at least MARGIN, centre to centre?"""
    dx, dy = b.x - a.x, b.y - a.y
    return {
        "left of": dx >= MARGIN,
        "right of": -dx >= MARGIN,
        "above": dy >= MARGIN,
        "below": -dy >= MARGIN,
    }[relation]


def _placed(where: str, d: Detection) -> bool:
    return {
        "left": d.x < _REGION,
        "right": d.x > 1 - _REGION,
        "top": d.y < _REGION,
        "bottom": d.y > 1 - _REGION,
    }[where]


def _phrase_requirements(p: Phrase, ds: list[Detection], all_ds: list[Detection]):
    asked = p.text()
    if ds:
        yield Requirement("object", asked, True, _listing(ds))
    else:
        near = [d for d in all_ds if d.shape == p.shape or d.colour == p.colour]
        yield Requirement("object", asked, False, f"no match; similar: {_listing(near)}")
    if p.count > 1:
        yield Requirement("count", asked, len(ds) == p.count, f"{len(ds)} found")
    if p.size is not None:
        sized = [d for d in ds if d.size == p.size]
        yield Requirement("size", asked, len(sized) >= p.count, _listing(ds))


def check(spec: Spec, detections: list[Detection]) -> Report:
    """Which of `spec`'s requirements the detections meet."""
    found = [[d for d in detections if matches(p, d)] for p in spec.phrases]
    reqs: list[Requirement] = []
    for p, ds in zip(spec.phrases, found, strict=True):
        reqs.extend(_phrase_requirements(p, ds, detections))
    for i, rel, j in spec.relations:
        asked = f"{spec.phrases[i].text()} {rel} {spec.phrases[j].text()}"
        pairs = [(a, b) for a, b in product(found[i], found[j]) if a is not b]
        met = any(holds(rel, a, b) for a, b in pairs)
        if not pairs:
            shown = "one of the two is missing"
        else:
            a, b = pairs[0]
            shown = f"centres dx={b.x - a.x:+.2f}, dy={b.y - a.y:+.2f}"
        reqs.append(Requirement("relation", asked, met, shown))
    for i, where in spec.positions:
        asked = f"{spec.phrases[i].text()} at the {where}"
        met = any(_placed(where, d) for d in found[i])
        shown = ", ".join(f"centre ({d.x:.2f}, {d.y:.2f})" for d in found[i]) or "missing"
        reqs.append(Requirement("position", asked, met, shown))
    return Report(tuple(reqs), tuple(detections))


def score_image(image: Image.Image, prompt: str | Spec) -> Report:
    """The report of `image` against `prompt` (a caption, parsed, or a spec)."""
    spec = parse(prompt) if isinstance(prompt, str) else prompt
    return check(spec, detect(image))
