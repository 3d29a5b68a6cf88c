"""Validator: compare before / after against the prompt; a verdict, a 0-10 score, reasons."""

from __future__ import annotations

import time
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


def judge_by_reward(
    before: Image.Image, after: Image.Image, prompt: str, reward: str, accept_score: float
) -> Structured[Verdict]:
    """A measured judge in the validator's place: the score is the image kept's `reward` (a name
    from tools/rewards.py with a declared range or normaliser) mapped onto 0-10, 10 the best
    end; it accepts a better image that reaches `accept_score` and rejects a worse one. For
    preferences a metric states exactly, e.g. "dark, subdued images" = darkness, and for loops
    that must not depend on a VLM's taste. A reward with no scale is refused (ValueError): its
    score could not be compared with `accept_score`."""
    from artloop.tools.rewards import judge_reward

    entry = judge_reward(reward)
    start = time.perf_counter()
    (b, a), _ = entry.fn([before, after], [prompt, prompt], [{}, {}])
    b, a = float(b), float(a)
    better = entry.better(a, b)
    # The score is that of the image the iteration keeps: a rejected edit keeps the one before.
    score = round(10.0 * entry.unit(a if better else b), 1)
    verdict = ("accept" if score >= accept_score else "revise") if better else "reject"
    reason = f"{reward} {b:.3f} -> {a:.3f} ({'better' if better else 'not better'})"
    out = Verdict(verdict=verdict, score=score, better_than_before=better, reasons=[reason])
    return Structured(
        output=out, backend=f"reward:{reward}", failures=0, seconds=time.perf_counter() - start
    )
