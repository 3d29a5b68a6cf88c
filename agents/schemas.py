"""The agents' output schemas. Every string, list and number is bounded (numbers on a grid:
`multiple_of`), so constrained decoding always terminates and an answer stays a sensible size.

Boxes follow Qwen2-VL's convention: [x1, y1, x2, y2] normalised to 0-1000, top-left origin.
A model's boxes are clipped and ordered on the way in; one with no area is rejected. (One policy,
in tools/diffusion.py's check_box: model output is repaired, a person's input is rejected.)
"""

from __future__ import annotations

from typing import Annotated, Literal

from artloop.prompts import aesthetics_checklist, artifact_taxonomy
from artloop.tools.diffusion import check_box
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def normalise_box(value: object) -> list[int]:
    """A model's box, repaired: clipped to 0-1000, rounded, corners ordered (see check_box)."""
    return check_box(value, clip=True)


Coord = Annotated[int, Field(ge=0, le=1000)]
Box = Annotated[list[Coord], Field(min_length=4, max_length=4), BeforeValidator(normalise_box)]
# A person's box (an answer at a pause): refused, not repaired, when out of range or inverted.
HumanBox = Annotated[list[Coord], Field(min_length=4, max_length=4), BeforeValidator(check_box)]


def text(max_length: int, min_length: int = 0):
    return Field(min_length=min_length, max_length=max_length)


ArtifactKind = Literal[tuple(a["id"] for a in artifact_taxonomy())]  # type: ignore[valid-type]
Aspect = Literal[tuple(a["id"] for a in aesthetics_checklist())]  # type: ignore[valid-type]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnhancedPrompt(_Out):
    """Prompt enhancer: a terse prompt made detailed."""

    prompt: str = text(300, 1)
    negative_prompt: str = text(160)


class GroundedObject(_Out):
    label: str = text(32, 1)
    box: Box


class ImageFacts(_Out):
    """Data-CoT: what is in the image, before any judgement."""

    description: str = text(240, 1)
    objects: list[GroundedObject] = Field(max_length=4)
    lighting: str = text(80)
    palette: str = text(80)


class ArtifactFinding(_Out):
    kind: ArtifactKind
    severity: int = Field(ge=1, le=3)
    box: Box | None = None
    note: str = text(60)


class AestheticRating(_Out):
    aspect: Aspect
    rating: int = Field(ge=0, le=10)
    note: str = text(48)


class Critique(_Out):
    """Concept-CoT: the facts reasoned against the prompt, the checklist and the taxonomy."""

    artifacts: list[ArtifactFinding] = Field(max_length=3)
    aesthetics: list[AestheticRating] = Field(max_length=6)
    prompt_alignment: int = Field(ge=0, le=10)
    missing: list[Annotated[str, text(40, 1)]] = Field(max_length=3)
    summary: str = text(120)


class RegionalEdit(_Out):
    box: Box
    prompt: str = text(80, 1)
    strength: float = Field(ge=0.1, le=1.0, multiple_of=0.05)


class ParamChanges(_Out):
    """Generation parameters to change; null keeps the current value."""

    guidance_scale: float | None = Field(None, ge=1.0, le=20.0, multiple_of=0.5)
    num_inference_steps: int | None = Field(None, ge=1, le=100)
    # global img2img strength; 0 = none
    strength: float | None = Field(None, ge=0.0, le=1.0, multiple_of=0.05)
    # global tone factors applied after the other edits; 1 = unchanged
    exposure: float | None = Field(None, ge=0.5, le=1.5, multiple_of=0.05)
    contrast: float | None = Field(None, ge=0.5, le=1.5, multiple_of=0.05)
    saturation: float | None = Field(None, ge=0.0, le=2.0, multiple_of=0.05)


class EditPlan(_Out):
    """Thesis-CoT: the concrete edit plan."""

    revised_prompt: str = text(300, 1)
    negative_prompt: str = text(160)
    regional_edits: list[RegionalEdit] = Field(max_length=3)
    params: ParamChanges
    rationale: str = text(120)


class Verdict(_Out):
    """Validator: the AFTER image judged against the prompt and against BEFORE."""

    verdict: Literal["accept", "revise", "reject"]
    score: float = Field(ge=0.0, le=10.0, multiple_of=0.1)
    better_than_before: bool
    reasons: list[Annotated[str, text(80, 1)]] = Field(min_length=1, max_length=3)


class Rating(_Out):
    """Rater: one image scored against its prompt (a reward for DDPO with AI feedback)."""

    score: float = Field(ge=0.0, le=10.0, multiple_of=0.1)
    reasons: list[Annotated[str, text(80, 1)]] = Field(min_length=1, max_length=3)


class ArtifactAnswer(_Out):
    """SynArtifact's question: which artifacts does the image show ("No artifacts" if none)."""

    answer: str = text(200, 1)
