"""Measured image statistics as rewards: brightness, darkness, contrast, saturation, sharpness,
colourfulness (tools/image_facts.py measures them)."""

from __future__ import annotations

import numpy as np
from artloop.rewards.registry import RewardFn, reward
from artloop.tools.image_facts import measure


def _statistic(key: str, sign: float = 1.0, offset: float = 0.0) -> RewardFn:
    def fn(images, prompts, metadata):
        values = np.array([measure(im)[key] for im in images], dtype=np.float64)
        return offset + sign * values, {key: values.tolist()}

    fn.__doc__ = (
        f"Reward the measured {key} of each image ({'higher' if sign > 0 else 'lower'} is better)."
    )
    return fn


# Ranges from tools/image_facts.py's definitions; sharpness (Laplacian variance) and
# colourfulness (Hasler-Suesstrunk M3) have no upper bound.
_RANGES: dict[str, tuple[float, float] | None] = {
    "brightness": (0.0, 1.0),
    "contrast": (0.0, 0.5),
    "saturation": (0.0, 1.0),
    "sharpness": None,
    "colourfulness": None,
}
for _key, _range in _RANGES.items():
    reward(_key, range=_range)(_statistic(_key))
reward("darkness", range=(0.0, 1.0))(_statistic("brightness", sign=-1.0, offset=1.0))
