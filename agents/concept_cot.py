"""Concept-CoT: reason over the facts against the prompt, the aesthetics checklist and the
SynArtifact taxonomy (both in the common system message)."""

from __future__ import annotations

from artloop.agents.base import ask, stat_lines
from artloop.agents.schemas import Critique, ImageFacts
from artloop.models.structured import CallPolicy, Structured
from langchain_core.language_models.chat_models import BaseChatModel
from PIL import Image


def concept_cot(
    model: BaseChatModel,
    image: Image.Image,
    prompt: str,
    facts: ImageFacts | None,
    stats: dict[str, float],
    *,
    policy: CallPolicy = CallPolicy(),
) -> Structured[Critique]:
    """What is wrong with `image`, how badly and where. `facts`: Data-CoT's description, None
    where this loop runs no Data-CoT (the image alone is judged)."""
    return ask(
        model,
        agent="concept_cot",
        schema=Critique,
        image=image,
        policy=policy,
        prompt=prompt,
        facts=facts,  # dumped by ask, boxes in the family's convention
        stats=stat_lines(stats),  # the checklist and the taxonomy are in the system message
    )
