"""Prompt enhancer: a terse prompt -> a detailed prompt and a negative prompt. No image, but
the same system message as the other agents (their common prefix)."""

from __future__ import annotations

from artloop.agents.base import ask
from artloop.agents.schemas import EnhancedPrompt
from artloop.models.structured import CallPolicy, Structured
from langchain_core.language_models.chat_models import BaseChatModel


def enhance(
    model: BaseChatModel,
    prompt: str,
    *,
    previous_prompt: str | None = None,
    feedback: list[str] | None = None,
    history: list[dict] | None = None,
    policy: CallPolicy = CallPolicy(),
) -> Structured[EnhancedPrompt]:
    """First iteration: expand `prompt`. Later ones: rework `previous_prompt` (the last edit
    plan's revised prompt) so that it addresses the validator's `feedback`, or, given the
    `history` of every earlier attempt (prompt, score, verdict, reasons; `loop.memory =
    "history"`), what all of them taught."""
    return ask(
        model,
        agent="enhance",
        schema=EnhancedPrompt,
        policy=policy,
        prompt=prompt,
        previous_prompt=previous_prompt,
        feedback=feedback or [],
        history=history or [],
    )
