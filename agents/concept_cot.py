"""Concept-CoT: reason over the facts against the prompt, the aesthetics checklist and the
SynArtifact taxonomy."""

from __future__ import annotations

from artloop.agents.base import ask
from artloop.agents.schemas import Critique, ImageFacts
from artloop.models.structured import CallPolicy, Structured
from artloop.prompts import aesthetics_checklist, artifact_taxonomy
from langchain_core.language_models.chat_models import BaseChatModel
from PIL import Image


def concept_cot(
    model: BaseChatModel,
    image: Image.Image,
    prompt: str,
    facts: ImageFacts,
    stats: dict[str, float],
    *,
    policy: CallPolicy = CallPolicy(),
) -> Structured[Critique]:
    """What is wrong with `image`, how badly and where."""
    return ask(
        model,
        agent="concept_cot",
        role="Concept-CoT, the critic",
        schema=Critique,
        image=image,
        policy=policy,
        prompt=prompt,
        facts=facts.model_dump(),
        stats=stats,
        checklist=aesthetics_checklist(),
        taxonomy=artifact_taxonomy(),
    )
