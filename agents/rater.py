"""Rater and artifact spotter: single-image judgements used as rewards (rewards/)."""

from __future__ import annotations

from artloop.agents.base import ask
from artloop.agents.schemas import ArtifactAnswer, Rating
from artloop.models.structured import CallPolicy, Structured
from langchain_core.language_models.chat_models import BaseChatModel
from PIL import Image


def rate(
    model: BaseChatModel, image: Image.Image, prompt: str, *, policy: CallPolicy = CallPolicy()
) -> Structured[Rating]:
    """A 0-10 score of `image` as a picture of `prompt`, with reasons."""
    return ask(
        model,
        agent="rate",
        schema=Rating,
        image=image,
        policy=policy,
        prompt=prompt,
    )


def spot_artifacts(
    model: BaseChatModel, image: Image.Image, prompt: str, *, policy: CallPolicy = CallPolicy()
) -> Structured[ArtifactAnswer]:
    """SynArtifact's question: the artifact classes `image` shows (ids; [] = none)."""
    return ask(
        model,
        agent="artifacts",
        schema=ArtifactAnswer,
        image=image,
        policy=policy,
        prompt=prompt,  # the taxonomy is in the system message
    )
