"""Validator: compare before / after against the prompt; a verdict, a 0-10 score, reasons."""

from __future__ import annotations

from dataclasses import replace

from artloop.agents.base import ask
from artloop.agents.schemas import EditPlan, Verdict
from artloop.models.structured import CallPolicy, Structured
from langchain_core.language_models.chat_models import BaseChatModel
from PIL import Image


def side_by_side(before: Image.Image, after: Image.Image) -> Image.Image:
    """BEFORE | AFTER in one image: one image per request fits every server's limits."""
    after = after.resize(before.size) if after.size != before.size else after
    w, h = before.size
    canvas = Image.new("RGB", (2 * w, h))
    canvas.paste(before, (0, 0))
    canvas.paste(after, (w, 0))
    return canvas


def validate(
    model: BaseChatModel,
    before: Image.Image,
    after: Image.Image,
    prompt: str,
    plan: EditPlan,
    stats_before: dict[str, float],
    stats_after: dict[str, float],
    *,
    policy: CallPolicy = CallPolicy(),
) -> Structured[Verdict]:
    """Judge `after` (the edited image) against `prompt` and against `before`."""
    return ask(
        model,
        agent="validate",
        role="the validator",
        schema=Verdict,
        image=side_by_side(before, after),
        prompt=prompt,
        plan=plan.model_dump(),
        # Two images side by side: twice the width keeps each at the usual resolution.
        policy=replace(policy, image_max_side=2 * policy.image_max_side),
        stats_before=stats_before,
        stats_after=stats_after,
    )
