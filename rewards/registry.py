"""The reward registry, one signature (ddpo-pytorch's): fn(images, prompts, metadata) -> (scores,
info). Register a reward with `@reward("name", range=(lo, hi))`; each entry (`Reward`) says what
its scores mean, and a reward judges the loop (`loop.judge`) only when its scores have a declared
range or a normaliser. The built-ins live beside it: metrics.py (image statistics) and vlm.py
(VLM judges); importing `artloop.rewards` registers them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

RewardFn = Callable[[list[Image.Image], list[str], list[dict]], tuple[np.ndarray, dict[str, Any]]]


@dataclass(frozen=True)
class Reward:
    """A registered reward and what its scores mean: `range` (lo, hi) bounds them (None: not
    bounded, or not known to be); `higher_is_better` is their direction; `normalise`, in place
    of a range, maps a score increasingly onto [0, 1] (e.g. x / (x + c) for an unbounded one)."""

    name: str
    fn: RewardFn
    range: tuple[float, float] | None = None
    higher_is_better: bool = True
    normalise: Callable[[float], float] | None = None

    def judge_problem(self) -> str | None:
        """Why this reward cannot judge (None when it can): a judge's 0-10 score needs a scale."""
        if self.normalise is not None:
            return None
        if self.range is None:
            return (
                f"reward {self.name!r} has no declared range (or normaliser) to put its "
                "scores on the 0-10 scale"
            )
        lo, hi = self.range
        if not lo < hi:
            return f"reward {self.name!r} declares an empty range {self.range}"
        return None

    def unit(self, score: float) -> float:
        """`score` on [0, 1], 1 the best end (the judge's score is 10 x this)."""
        if problem := self.judge_problem():
            raise ValueError(problem)
        if self.normalise is not None:
            u = self.normalise(score)
        else:
            lo, hi = self.range  # type: ignore[misc]  # checked by judge_problem
            u = (score - lo) / (hi - lo)
        u = min(1.0, max(0.0, float(u)))
        return u if self.higher_is_better else 1.0 - u

    def better(self, after: float, before: float) -> bool:
        return after > before if self.higher_is_better else after < before


REWARDS: dict[str, Reward] = {}


def reward(
    name: str,
    *,
    range: tuple[float, float] | None = None,
    higher_is_better: bool = True,
    normalise: Callable[[float], float] | None = None,
) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under `name`, with what its scores mean (see `Reward`)."""

    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = Reward(name, fn, range, higher_is_better, normalise)
        return fn

    return register


def reward_entry(name: str) -> Reward:
    """The registry entry of reward `name` (KeyError naming the choices when unknown)."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; choose from {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def get_reward(name: str) -> RewardFn:
    return reward_entry(name).fn


def judge_reward(name: str) -> Reward:
    """The entry of reward `name` if it can judge the loop; else ValueError saying why not.
    ("vlm" as `loop.judge` is the validator agent, not the rater's reward.)"""
    entry = REWARDS.get(name)
    problem = entry.judge_problem() if entry else f"unknown judge {name!r}"
    if problem:
        can = sorted(n for n, r in REWARDS.items() if n != "vlm" and r.judge_problem() is None)
        raise ValueError(f"{problem}; a judge is vlm or one of {', '.join(can)}")
    return entry
