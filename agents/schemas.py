"""The agents' output schemas. Every string, list and number is bounded (numbers on a grid:
`multiple_of`), so constrained decoding always terminates and an answer stays a sensible size.

Fields are in reasoning order: what the model observes comes before what it concludes (a
verdict, a score), because under constrained decoding it writes the fields in schema order and
cannot revise a score once written. Every field carries a `description`: the model's
instructions for it, shown in the prompt as the answer's field guide (agents/base.py).

Boxes are artloop's grid: [x1, y1, x2, y2] normalised to 0-1000, top-left origin. A model's
boxes are read in its family's convention (models/families.py; validation context `box_frame`),
converted to the grid, clipped and ordered on the way in; one with no area is rejected; dumped
with the same context, they are written back in the family's convention for a prompt. (One policy,
in tools/diffusion.py's check_box: model output is repaired, a person's input is rejected.)
"""

from __future__ import annotations

from typing import Annotated, Literal

from artloop.prompts import aesthetics_checklist, artifact_taxonomy
from artloop.tools.diffusion import check_box
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializationInfo,
    ValidationInfo,
    create_model,
)


def normalise_box(value: object, frame=None) -> list[int]:
    """A model's box, repaired: read in the call's convention (`frame`, a models/families.py
    BoxFrame: pixels of the model's input become 0-1000, and a pixel box outside that image is
    an error, not clipped), then clipped to 0-1000, rounded, corners ordered (see check_box)."""
    return check_box(value if frame is None else frame.to_grid(value), clip=True)


def _model_box(value: object, info: ValidationInfo) -> list[int]:
    # The frame travels in the validation context (models/structured.py's parse_output).
    return normalise_box(value, (info.context or {}).get("box_frame"))


def box_for_prompt(box: list[int], info: SerializationInfo) -> list[int]:
    """A box dumped for a prompt: in the serialisation context's `box_frame` (the model
    family's convention), else artloop's 0-1000 grid."""
    frame = (info.context or {}).get("box_frame")
    return box if frame is None else frame.from_grid(box)


Coord = Annotated[int, Field(ge=0, le=1000)]
Box = Annotated[
    list[Coord],
    Field(min_length=4, max_length=4),
    BeforeValidator(_model_box),
    PlainSerializer(box_for_prompt),
]
# A person's box (an answer at a pause): refused, not repaired, when out of range or inverted.
HumanBox = Annotated[list[Coord], Field(min_length=4, max_length=4), BeforeValidator(check_box)]
BOX_HELP = "[x1, y1, x2, y2], 0-1000 from the top-left corner"


def text(max_length: int, min_length: int = 0, description: str | None = None):
    return Field(min_length=min_length, max_length=max_length, description=description)


def Line(max_length: int) -> type[str]:  # noqa: N802 (a type, named like one)
    """A non-empty string of at most `max_length` characters (a list item)."""
    return Annotated[str, Field(min_length=1, max_length=max_length)]  # type: ignore[return-value]


def _distinct(items: list) -> list:
    # A repeated class says nothing more; the grammar cannot forbid it, so it is dropped.
    return list(dict.fromkeys(items))


ARTIFACT_IDS = tuple(a["id"] for a in artifact_taxonomy())
ASPECT_IDS = tuple(a["id"] for a in aesthetics_checklist())
ArtifactKind = Literal[ARTIFACT_IDS]  # type: ignore[valid-type]
Rating10 = Annotated[int, Field(ge=0, le=10)]
Score10 = Annotated[float, Field(ge=0.0, le=10.0, multiple_of=0.1)]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnhancedPrompt(_Out):
    """Prompt enhancer: a terse prompt made detailed."""

    prompt: str = text(
        300,
        1,
        "The detailed prompt: subject, setting, composition, lighting, colour, style, as one "
        "comma-separated description; everything the user asked for, no new subjects",
    )
    negative_prompt: str = text(
        160, 0, "What the image must not show, comma-separated (e.g. blur, extra fingers)"
    )


class GroundedObject(_Out):
    label: str = text(32, 1, "What the object is, in one to three words")
    box: Box = Field(description=f"Where it is: {BOX_HELP}")


class ImageFacts(_Out):
    """Data-CoT: what is in the image, before any judgement."""

    description: str = text(
        240, 1, "What the image shows, plainly: subject, setting, style; no judgement"
    )
    objects: list[GroundedObject] = Field(
        max_length=4, description="The main objects, largest or most important first (at most 4)"
    )
    lighting: str = text(80, 0, "Where the light comes from, how hard or soft, how bright")
    palette: str = text(80, 0, "The dominant colours and how saturated they are")


class ArtifactFinding(_Out):
    note: str = text(60, 0, "What looks wrong and where, in a few words")
    kind: ArtifactKind = Field(description="The artifact class id from the taxonomy")
    box: Box | None = Field(None, description=f"Where it is ({BOX_HELP}); null when global")
    severity: int = Field(ge=1, le=3, description="1 minor, 2 clearly visible, 3 ruins the image")


class AspectRating(_Out):
    note: str = text(40, 0, "What you see for this aspect, in a few words")
    rating: Rating10 = Field(description="0-10 on the rubric's anchors for this aspect")


# One field per checklist aspect, each required: no aspect repeated, none missing.
Aesthetics = create_model(
    "Aesthetics",
    __base__=_Out,
    __doc__="The aesthetics checklist: one rating per aspect.",
    **{a["id"]: (AspectRating, Field(description=a["question"])) for a in aesthetics_checklist()},
)


class Critique(_Out):
    """Concept-CoT: the facts reasoned against the prompt, the checklist and the taxonomy."""

    observations: list[Line(80)] = Field(  # type: ignore[valid-type]
        min_length=1,
        max_length=3,
        description="What you notice comparing the image with the prompt, before any rating: "
        "what matches, what differs, what looks wrong",
    )
    missing: list[Line(40)] = Field(  # type: ignore[valid-type]
        max_length=3, description="Elements the prompt asks for that the image lacks; [] if none"
    )
    artifacts: list[ArtifactFinding] = Field(
        max_length=3, description="Artifacts you see, the worst first; [] if none"
    )
    aesthetics: Aesthetics = Field(  # type: ignore[valid-type]
        description="Every checklist aspect rated, each with a note first"
    )
    prompt_alignment: Rating10 = Field(
        description="0-10: how fully the image shows what the prompt asks (10 = all of it)"
    )
    summary: str = text(120, 0, "The most important problem to fix next, in one sentence")


class RegionalEdit(_Out):
    box: Box = Field(description=f"The region to repaint: {BOX_HELP}")
    prompt: str = text(80, 1, "What the region should show after the edit")
    strength: float = Field(
        ge=0.1,
        le=1.0,
        multiple_of=0.05,
        description="How much to repaint: 0.3 touch up, 0.6 redraw, 1.0 replace entirely",
    )


class ParamChanges(_Out):
    """Generation parameters to change; null keeps the current value."""

    guidance_scale: float | None = Field(
        None,
        ge=1.0,
        le=20.0,
        multiple_of=0.5,
        description="Prompt adherence (typical 4-9; higher follows the prompt more literally); "
        "null keeps it",
    )
    num_inference_steps: int | None = Field(
        None, ge=1, le=100, description="Denoising steps (more = finer detail, slower); null keeps"
    )
    strength: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        multiple_of=0.05,
        description="Global img2img strength over the whole image (0 = none, 0.3 light, 0.7 "
        "heavy); null: none unless there are no regional edits",
    )
    exposure: float | None = Field(
        None,
        ge=0.5,
        le=1.5,
        multiple_of=0.05,
        description="Brightness factor applied last (1 = unchanged, 0.8 darker, 1.2 brighter)",
    )
    contrast: float | None = Field(
        None, ge=0.5, le=1.5, multiple_of=0.05, description="Contrast factor (1 = unchanged)"
    )
    saturation: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        multiple_of=0.05,
        description="Colour saturation factor (1 = unchanged, 0 = greyscale)",
    )


class EditPlan(_Out):
    """Thesis-CoT: the concrete edit plan."""

    rationale: str = text(
        120, 0, "Which problems of the critique this plan fixes, and how, in one sentence"
    )
    revised_prompt: str = text(
        300, 1, "The prompt for the next image: the current prompt with the fixes written in"
    )
    negative_prompt: str = text(160, 0, "What the image must not show, comma-separated")
    regional_edits: list[RegionalEdit] = Field(
        max_length=3, description="Local repaints for local problems (at most 3); [] if none"
    )
    params: ParamChanges = Field(description="Parameter changes; null keeps each current value")


class CriticAnswer(_Out):
    """The merged critic: Data-CoT's facts, Concept-CoT's critique and Thesis-CoT's plan in one
    answer, in that order (each part reads the ones before it)."""

    facts: ImageFacts = Field(description="First: what the picture shows, before any judgement")
    critique: Critique = Field(
        description="Then: the picture judged against the prompt, the checklist and the taxonomy"
    )
    plan: EditPlan = Field(description="Last: the edit plan that fixes what the critique found")


class Verdict(_Out):
    """Validator: the AFTER image judged against the prompt and against BEFORE."""

    reasons: list[Line(80)] = Field(  # type: ignore[valid-type]
        min_length=1,
        max_length=3,
        description="What you see in AFTER against the prompt and against BEFORE, before "
        "judging: what improved, what got worse, what is still wrong",
    )
    better_than_before: bool = Field(description="true when AFTER is better than BEFORE")
    score: Score10 = Field(description="AFTER's score, 0-10 on the rubric's anchors")
    verdict: Literal["accept", "revise", "reject"] = Field(
        description='"accept": AFTER fulfils the prompt well; "revise": it needs another '
        'round; "reject": the edit made the image worse'
    )


class Rating(_Out):
    """Rater: one image scored against its prompt (a reward for DDPO with AI feedback)."""

    reasons: list[Line(80)] = Field(  # type: ignore[valid-type]
        min_length=1,
        max_length=3,
        description="What you see against the prompt, before scoring: strengths and flaws",
    )
    score: Score10 = Field(description="0-10 on the rubric's anchors")


class ArtifactAnswer(_Out):
    """SynArtifact's question: which artifact classes does the image show (none: [])."""

    notes: str = text(120, 0, "What looks wrong in the image, in a few words; empty if nothing")
    artifacts: Annotated[list[ArtifactKind], AfterValidator(_distinct)] = Field(
        max_length=len(ARTIFACT_IDS),
        description="The ids of the artifact classes the image shows; [] when it shows none",
    )

    @property
    def as_text(self) -> str:
        """The answer as SynArtifact's VLM writes it: the class names, or "No artifacts"."""
        return ", ".join(k.replace("_", " ") for k in self.artifacts) or NO_ARTIFACTS


NO_ARTIFACTS = "No artifacts"
