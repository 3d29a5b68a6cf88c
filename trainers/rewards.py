"""Rewards by name, one signature (ddpo-pytorch's): fn(images, prompts, metadata) -> (scores, info).

Measured image statistics are rewards out of the box ("brightness", "darkness", "contrast",
"saturation", "sharpness", "colourfulness"); register more with `@reward("name")`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from artloop.tools.image_facts import measure
from PIL import Image

RewardFn = Callable[[list[Image.Image], list[str], list[dict]], tuple[np.ndarray, dict[str, Any]]]
REWARDS: dict[str, RewardFn] = {}


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under `name`."""

    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return register


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; choose from {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def _statistic(key: str, sign: float = 1.0, offset: float = 0.0) -> RewardFn:
    def fn(images, prompts, metadata):
        values = np.array([measure(im)[key] for im in images], dtype=np.float64)
        return offset + sign * values, {key: values.tolist()}

    fn.__doc__ = (
        f"Reward the measured {key} of each image ({'higher' if sign > 0 else 'lower'} is better)."
    )
    return fn


for _key in ("brightness", "contrast", "saturation", "sharpness", "colourfulness"):
    reward(_key)(_statistic(_key))
reward("darkness")(_statistic("brightness", sign=-1.0, offset=1.0))
