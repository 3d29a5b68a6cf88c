"""The merged critic: Data-CoT, Concept-CoT and Thesis-CoT as one call, the image sent once
(`loop.critics = "merged"`): facts -> critique -> plan in one ordered schema."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from artloop.agents.base import ask, stat_lines
from artloop.agents.schemas import CriticAnswer
from artloop.agents.thesis_cot import unapplied
from artloop.config import CRITICS, EDIT_MODES
from artloop.models.structured import CallPolicy, Structured
from langchain_core.language_models.chat_models import BaseChatModel
from PIL import Image


def critic(
    model: BaseChatModel,
    image: Image.Image,
    prompt: str,
    current_prompt: str,
    params: dict[str, Any],
    stats: dict[str, float],
    *,
    policy: CallPolicy = CallPolicy(),
    scores: dict[str, dict] | None = None,
    edit_modes: Collection[str] = EDIT_MODES,
) -> Structured[CriticAnswer]:
    """Describe `image` (drawn from `current_prompt` with `params`), judge it against the
    user's `prompt`, and plan its edits, in one answer. `scores`: the fact scorers'
    measurements; `edit_modes`: the edits this run applies (the plan is told of the others).
    The answer may be as long as the three critics' together (three times the token limit)."""
    return ask(
        model,
        agent="critic",
        schema=CriticAnswer,
        image=image,
        policy=policy,
        token_budget=len(CRITICS),
        prompt=prompt,
        current_prompt=current_prompt,
        params=params,
        stats=stat_lines(stats),
        scores=scores or {},
        unavailable=unapplied(edit_modes),
    )
