"""Thesis-CoT: conclude with an edit plan (revised prompt, regional box edits, parameters)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from artloop.agents.base import ask
from artloop.agents.schemas import Critique, EditPlan, ImageFacts
from artloop.config import EDIT_MODES
from artloop.models.structured import CallPolicy, Structured
from langchain_core.language_models.chat_models import BaseChatModel
from PIL import Image

# The plan's parts each edit mode applies, as the planner is told of those a run leaves out.
EDIT_PARTS = {
    "img2img": "a global img2img strength",
    "inpaint": "regional edits",
    "tone": "the tone factors (exposure, contrast, saturation)",
}


def unapplied(edit_modes: Collection[str]) -> list[str]:
    """The plan's parts that a run with `edit_modes` does not apply (loop.edit_modes); the
    regional mode applies the box edits as inpaint does (in one regional-prompting pass)."""
    applied = set(edit_modes) | ({"inpaint"} if "regional" in edit_modes else set())
    return [EDIT_PARTS[mode] for mode in EDIT_MODES if mode not in applied]


def thesis_cot(
    model: BaseChatModel,
    image: Image.Image,
    prompt: str,
    current_prompt: str,
    params: dict[str, Any],
    critique: Critique | None,
    *,
    policy: CallPolicy = CallPolicy(),
    facts: ImageFacts | None = None,
    edit_modes: Collection[str] = EDIT_MODES,
) -> Structured[EditPlan]:
    """Turn `critique` into concrete edits of `image`. Without one (no Concept-CoT in this
    loop) the plan is made from the image itself, and Data-CoT's `facts` when it ran.
    `edit_modes`: the edits this run applies (the plan is told of the others)."""
    return ask(
        model,
        agent="thesis_cot",
        schema=EditPlan,
        image=image,
        policy=policy,
        prompt=prompt,
        current_prompt=current_prompt,
        params=params,
        critique=critique,  # dumped by ask, boxes in the family's convention
        facts=facts if critique is None else None,  # a critique already read them
        unavailable=unapplied(edit_modes),
    )
