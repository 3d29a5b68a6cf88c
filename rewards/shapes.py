"""The `shapes` scorer: the shapes world's exact judge (world/check.py). It detects the shapes in
each image by colour segmentation (no learned model) and scores the image against the prompt's
scene graph: the share of its requirements met (each object with its colour, its count and
size, each relation and position), 0-1. `info["reports"]` holds each image's requirements, met
or not, with what the image shows instead, and its detections.

The prompt read is `metadata[i]["caption"]` when given (an experiment scores each image against
the original caption, not the loop's revised prompt), else `prompts[i]`; a prompt that names no
shape of the world is refused (ValueError, one line).
"""

from __future__ import annotations

import numpy as np
from artloop.rewards.registry import reward
from artloop.world.check import score_image

DETECTOR = {"id": "artloop-shapes-detector", "version": "1"}  # no weights: the rules' version


@reward("shapes", range=(0.0, 1.0), model=lambda: dict(DETECTOR))
def shapes_score(images, prompts, metadata):
    """Each image's share of its prompt's requirements met, with the per-requirement reports."""
    metadata = metadata or [{} for _ in images]
    reports = [
        score_image(image, (meta or {}).get("caption") or prompt)
        for image, prompt, meta in zip(images, prompts, metadata, strict=True)
    ]
    scores = np.array([r.score for r in reports], dtype=np.float64)
    return scores, {"reports": [r.to_dict() for r in reports]}
