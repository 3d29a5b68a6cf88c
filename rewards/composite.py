"""Composite scores, AGFSync's way: a weighted sum of named scores, each first put on [0, 1] by its
declared range (or normaliser) with its direction (1 the best end), the weights normalised to sum
to 1. Named `composite:<preset>` (a preset below or in `scorers.composites`) or inline,
`composite:clip=0.6,aesthetic=0.4`. The parts are looked up when the composite is (lazily: a
preset may name scorers registered later), and a part that has no scale is refused, naming it.
A composite's own range is (0, 1), higher the better, so it can judge the loop.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

PREFIX = "composite:"

# AGFSync (An et al., arXiv 2403.13352, AAAI 2025), section 3.2 "Preference Pair Construction":
# each of N candidates gets a weighted sum of its VQA, CLIP and aesthetic scores, and the best
# and the worst by that sum form the DPO pair.
#
# `agfsync` is what the authors' released code does, read in github.com/Anjingkun/AGFSync at
# commit 70076195556295c7fcc259e7f9144cc6e3ea7779 ("init project", 2024-04-16; the one before it
# holds only the licence): build_dataset.py line 70 scores with CLIP 0.85 + aesthetic 0.15 and no
# VQA; lines 71 and 72, commented out, are VQA 0.9 + aesthetic 0.01 and aesthetic 0.3 + VQA 0.7
# (`agfsync-vqa` is the second). There the weights multiply the raw stored scores (line 63) and
# the pair is the argmax and argmin (lines 64-65): CLIP's logits_per_image (100 x cosine,
# scorer/clip_scorer.py line 25), the aesthetic predictor's output x 100 (dpo_dataset/
# aes_score.py line 29), the share of "yes" x 100 (dpo_dataset/prompt/vqa_score.py line 24).
# Here each part is first put on [0, 1] by its declared range, which the released code does not
# do, so the same weights do not rank candidates exactly as the released code did. Its VQA
# answerer was BLIP-2 FlanT5-XXL (dpo_dataset/blip2_vqa.py): `scorers.models.vqa` takes it.
#
# `agfsync-paper` (VQA 0.35, CLIP 0.55, aesthetic 0.10) is NOT confirmed: the numbers were
# recalled as the paper's, and no copy of the paper that could be read here reaches section 3.2
# (the stored copies stop after the introduction). Check them against the PDF before citing them.
AGFSYNC: dict[str, float] = {"clip": 0.85, "aesthetic": 0.15}
AGFSYNC_VQA: dict[str, float] = {"aesthetic": 0.3, "vqa": 0.7}
AGFSYNC_PAPER: dict[str, float] = {"vqa": 0.35, "clip": 0.55, "aesthetic": 0.10}
PRESETS: dict[str, dict[str, float]] = {
    "agfsync": AGFSYNC,
    "agfsync-vqa": AGFSYNC_VQA,
    "agfsync-paper": AGFSYNC_PAPER,
}


class Part(Protocol):
    """What a composite needs of a registry entry (rewards.registry.Reward)."""

    name: str
    fn: Callable[..., tuple[np.ndarray, dict[str, Any]]]
    range: tuple[float, float] | None
    normalise: Callable[[float], float] | None

    def judge_problem(self) -> str | None: ...
    def unit(self, score: float) -> float: ...
    def identity(self) -> dict[str, Any]: ...


def composite_weights(name: str, presets: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The weights `name` (composite:<preset> or composite:a=0.6,b=0.4) stands for, normalised to
    sum to 1. ValueError in one line naming the problem: an unknown preset, an entry that is not
    name=number, a weight that is negative or not finite, weights that do not sum to a positive
    number."""
    body = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if not body.strip():
        raise ValueError(f"composite {name!r} names no preset and no weights")
    if "=" in body:
        weights: dict[str, float] = {}
        for item in body.split(","):
            part, eq, value = item.strip().rpartition("=")
            part = part.strip()
            if not eq or not part:
                raise ValueError(f"composite {name!r}: {item.strip()!r} is not name=weight")
            if part in weights:
                raise ValueError(f"composite {name!r} names {part!r} twice")
            try:
                weights[part] = float(value)
            except ValueError:
                raise ValueError(
                    f"composite {name!r}: the weight of {part!r}, {value.strip()!r}, is not a number"
                ) from None
    elif body in presets:
        weights = {str(k): float(v) for k, v in presets[body].items()}
    else:
        raise ValueError(
            f"unknown composite preset {body!r}; choose from {', '.join(sorted(presets))} "
            f"(or weights: {PREFIX}a=0.6,b=0.4)"
        )
    if not weights:
        raise ValueError(f"composite {name!r} has no parts")
    for part, w in weights.items():
        if not math.isfinite(w):
            raise ValueError(f"composite {name!r}: the weight of {part!r} is {w}, not finite")
        if w < 0:
            raise ValueError(
                f"composite {name!r}: the weight of {part!r} is negative ({w:g}); a part that "
                "should pull the other way declares higher_is_better=False instead"
            )
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(
            f"composite {name!r}: its weights sum to {total:g}, not to a positive number"
        )
    return {part: w / total for part, w in weights.items()}


@dataclass(frozen=True)
class Composite:
    """The reward function of a composite: sum_i w_i * unit_i(score_i), w normalised; the info
    holds each part's raw scores, their units and the parts' own info."""

    name: str
    weights: dict[str, float]
    parts: dict[str, Part]

    def __call__(
        self, images: list, prompts: list[str], metadata: list[dict]
    ) -> tuple[np.ndarray, dict[str, Any]]:
        total = np.zeros(len(images), dtype=np.float64)
        raw: dict[str, list[float]] = {}
        units: dict[str, list[float]] = {}
        infos: dict[str, Any] = {}
        for part, w in self.weights.items():
            scores, info = self.parts[part].fn(images, prompts, metadata)
            scores = np.asarray(scores, dtype=np.float64).reshape(-1)
            if scores.shape != total.shape:
                raise ValueError(
                    f"composite {self.name!r}: part {part!r} returned {scores.size} scores "
                    f"for {total.size} images"
                )
            u = np.array([self.parts[part].unit(float(s)) for s in scores], dtype=np.float64)
            total += w * u
            raw[part], units[part], infos[part] = scores.tolist(), u.tolist(), info
        return total, {"weights": dict(self.weights), "scores": raw, "units": units, "parts": infos}

    def model(self) -> dict[str, Any]:
        """The composite's identity: its normalised weights and each part's identity."""
        return {
            "weights": dict(self.weights),
            "parts": {part: self.parts[part].identity() for part in self.weights},
        }


_resolving = threading.local()  # the composites being resolved on this thread (cycles)


def resolve_composite(
    name: str, presets: Mapping[str, Mapping[str, float]], lookup: Callable[[str], Part]
) -> Composite:
    """The composite `name`, its parts looked up now with `lookup` (the registry's
    reward_entry). ValueError in one line naming the problem: bad weights (composite_weights),
    a part unknown (lookup's KeyError) or failing to load, a part without a range or normaliser,
    a preset that includes itself."""
    weights = composite_weights(name, presets)
    stack: list[str] = getattr(_resolving, "stack", None) or []
    if name in stack:
        raise ValueError(f"composite {name!r} includes itself ({' -> '.join([*stack, name])})")
    _resolving.stack = [*stack, name]
    try:
        parts: dict[str, Part] = {}
        for part in weights:
            try:
                entry = lookup(part)
            except KeyError as e:  # unknown: the registry's message lists the choices
                raise ValueError(f"composite {name!r}: part {part!r}: {e}") from None
            except ValueError as e:
                raise ValueError(f"composite {name!r}: part {part!r}: {e}") from None
            if entry.range is None and entry.normalise is None:
                raise ValueError(
                    f"composite {name!r}: part {part!r} has no declared range (or normaliser) "
                    "to normalise its scores by"
                )
            if problem := entry.judge_problem():
                raise ValueError(f"composite {name!r}: part {part!r}: {problem}")
            parts[part] = entry
    finally:
        _resolving.stack = stack
    return Composite(name, weights, parts)
