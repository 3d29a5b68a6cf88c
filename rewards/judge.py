"""A measured judge in the validator's place: a registered reward's scores compared before and
after, mapped onto the validator's 0-10 verdict (`loop.judge = "darkness"`, say)."""

from __future__ import annotations

import time

from artloop.agents.schemas import Verdict
from artloop.models.structured import Structured
from artloop.rewards.registry import judge_reward
from PIL import Image


def judge_by_reward(
    before: Image.Image, after: Image.Image, prompt: str, reward: str, accept_score: float
) -> Structured[Verdict]:
    """A measured judge in the validator's place: the score is the image kept's `reward` (a name
    from the registry with a declared range or normaliser) mapped onto 0-10, 10 the best
    end; it accepts a better image that reaches `accept_score` and rejects a worse one. For
    preferences a metric states exactly, e.g. "dark, subdued images" = darkness, and for loops
    that must not depend on a VLM's taste. A reward with no scale is refused (ValueError): its
    score could not be compared with `accept_score`."""
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


def verdict_alone(
    score: float, reasons: list[str], accept_score: float, reference: float | None
) -> Verdict:
    """The verdict on an image judged alone (a loop with no edit: there is no BEFORE): accept
    from `accept_score`, else revise (no edit to reject); better than before when it beats
    `reference`, the best score so far (None: nothing yet)."""
    return Verdict(
        reasons=reasons,
        better_than_before=reference is None or score > reference,
        score=score,
        verdict="accept" if score >= accept_score else "revise",
    )


def judge_alone_by_reward(
    image: Image.Image, prompt: str, reward: str, accept_score: float, reference: float | None
) -> Structured[Verdict]:
    """`judge_by_reward` for a loop with no edit: the image's `reward` score mapped onto 0-10,
    its verdict by `verdict_alone`."""
    entry = judge_reward(reward)
    start = time.perf_counter()
    (value,), _ = entry.fn([image], [prompt], [{}])
    score = round(10.0 * entry.unit(float(value)), 1)
    out = verdict_alone(score, [f"{reward} {float(value):.3f}"], accept_score, reference)
    return Structured(
        output=out, backend=f"reward:{reward}", failures=0, seconds=time.perf_counter() - start
    )
