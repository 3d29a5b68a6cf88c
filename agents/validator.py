"""Validator: compare before / after against the prompt; reasons, then a 0-10 score and a
verdict."""

from __future__ import annotations

from artloop.agents.base import ask
from artloop.agents.schemas import EditPlan, Verdict
from artloop.models.structured import CallPolicy, Structured
from artloop.tools.image_facts import read_stat
from langchain_core.language_models.chat_models import BaseChatModel
from PIL import Image


def compared_stats(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Each statistic BEFORE -> AFTER, in words: "brightness 0.8 (high: ...) -> 0.5 (normal)"."""
    return [
        f"{name} {read_stat(name, value)} -> {read_stat(name, after[name])}"
        for name, value in before.items()
        if name in after
    ]


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
    accept_score: float = 7.0,
) -> Structured[Verdict]:
    """Judge `after` (the edited image) against `prompt` and against `before`. BEFORE is sent
    first and encoded as the other agents get it (their prefix, shared); AFTER second (a server
    must allow two images a prompt: serve.max_images_per_prompt)."""
    return ask(
        model,
        agent="validate",
        schema=Verdict,
        image=before,
        more_images=[after.resize(before.size) if after.size != before.size else after],
        policy=policy,
        prompt=prompt,
        plan=plan,  # dumped by ask, boxes in the family's convention
        stats=compared_stats(stats_before, stats_after),
        accept_score=f"{accept_score:g}",
    )
