"""Thesis-CoT: conclude with an edit plan (revised prompt, regional box edits, parameters)."""

from __future__ import annotations

from typing import Any

from artloop.agents.base import ask
from artloop.agents.schemas import Critique, EditPlan
from artloop.models.structured import CallPolicy, Structured
from langchain_core.language_models.chat_models import BaseChatModel
from PIL import Image


def thesis_cot(
    model: BaseChatModel,
    image: Image.Image,
    prompt: str,
    current_prompt: str,
    params: dict[str, Any],
    critique: Critique,
    *,
    policy: CallPolicy = CallPolicy(),
) -> Structured[EditPlan]:
    """Turn `critique` into concrete edits of `image`."""
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
    )
