"""Data-CoT: facts about the image (a grounded description), next to measured statistics."""

from __future__ import annotations

from artloop.agents.base import ask, stat_lines
from artloop.agents.schemas import ImageFacts
from artloop.models.structured import CallPolicy, Structured
from langchain_core.language_models.chat_models import BaseChatModel
from PIL import Image


def data_cot(
    model: BaseChatModel,
    image: Image.Image,
    prompt: str,
    stats: dict[str, float],
    *,
    policy: CallPolicy = CallPolicy(),
    scores: dict[str, dict] | None = None,
) -> Structured[ImageFacts]:
    """Describe `image` (generated from `prompt`) with grounded objects; no judgement yet.
    `scores`: the fact scorers' measurements of it (name -> score, range, direction), given as
    facts beside the statistics."""
    return ask(
        model,
        agent="data_cot",
        schema=ImageFacts,
        image=image,
        policy=policy,
        prompt=prompt,
        stats=stat_lines(stats),
        scores=scores or {},
    )
