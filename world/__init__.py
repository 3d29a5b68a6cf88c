"""The shapes world: compositional scenes of flat shapes (GenEval's objects, colours, counts and
positions in miniature), small enough for models trained on a laptop to be competent in.

language.py: what a prompt asks (`Spec`, `parse`, the caption templates); scenes.py: scene
graphs, sampling, splits by combination, rendering; detect.py: the exact detector (colour
segmentation, no learned model); check.py: an image scored against its prompt, requirement by
requirement (the `shapes` scorer, rewards/shapes.py).
"""

from artloop.world.check import Report, Requirement, check, score_image
from artloop.world.detect import Detection, detect
from artloop.world.language import COLOURS, RELATIONS, SHAPES, SIZES, Phrase, Spec, parse
from artloop.world.scenes import (
    SPLITS,
    Obj,
    Scene,
    render,
    sample_scene,
    sample_scenes,
    split_of,
)

__all__ = [
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Detection",
    "Obj",
    "Phrase",
    "Report",
    "Requirement",
    "Scene",
    "Spec",
    "check",
    "detect",
    "parse",
    "render",
    "sample_scene",
    "sample_scenes",
    "score_image",
    "split_of",
]
