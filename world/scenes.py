"""Scenes of the shapes world: 1-4 flat shapes on a plain background, their scene graph, a
caption that states it (language.py), a rendering, and the split a scene belongs to.

Splits are by combination (`split_of`): every pair of (colour, shape) kinds is assigned to
train, validation or held-out by a hash of the pair, and a scene belongs to the hardest split
of its pairs. So no training scene ever shows the two kinds of a held-out pair together, while
every kind alone is in training: a held-out prompt combines attributes the models never saw
together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import combinations
from random import Random
from typing import Literal

from artloop.world.language import COLOURS, SHAPES, Phrase, Spec
from PIL import Image, ImageDraw

Split = Literal["train", "val", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "val", "heldout")

# sRGB of each colour: hues far apart (0, 27, 55, 130, 222, 285 degrees) and saturated, so that
# a hue threshold separates them even in a blurry sample.
RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 120, 20),
    "yellow": (240, 220, 20),
    "green": (30, 160, 60),
    "blue": (35, 80, 215),
    "purple": (150, 50, 190),
}
BACKGROUND = (238, 238, 238)
# Object extents (the side of its box) as a share of the image side, per size.
EXTENT = {"small": (0.18, 0.24), "large": (0.32, 0.40)}
SIZE_THRESHOLD = 0.28  # between the two ranges: the detector's small/large boundary
_GAP = 0.04  # the least space between two objects' boxes
_MARGIN = 0.03  # and between a box and the image's edge
RELATION_MARGIN = 0.15  # a caption states a relation only when the centres are this far apart
_HELDOUT_PAIRS = 15  # per cent of kind pairs held out, and in validation
_VAL_PAIRS = 10


@dataclass(frozen=True)
class Obj:
    """One shape: its kind, its size class, its centre and its extent (box side), both as a
    share of the image side (x to the right, y down)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    extent: float

    @property
    def kind(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def box(self) -> tuple[float, float, float, float]:
        h = self.extent / 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)


@dataclass(frozen=True)
class Scene:
    """A scene graph: its objects (the relations between them follow from their centres) and
    the caption's spec (`spec`), which states what the caption asks of an image."""

    objects: tuple[Obj, ...]
    spec: Spec

    def caption(self, rng: Random | None = None) -> str:
        return self.spec.text(rng)


def relation(a: Obj, b: Obj, margin: float = RELATION_MARGIN) -> str | None:
    """The relation a caption may state of a to b: along the axis they differ most on, when
    their centres are at least `margin` apart on it."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy) and abs(dx) >= margin:
        return "left of" if dx > 0 else "right of"
    if abs(dy) > abs(dx) and abs(dy) >= margin:
        return "above" if dy > 0 else "below"
    return None


def position(o: Obj) -> str | None:
    """Where a lone object clearly is (its centre in the outer 35% along an axis), if anywhere."""
    if o.x < 0.35 or o.x > 0.65:
        return "left" if o.x < 0.35 else "right"
    if o.y < 0.35 or o.y > 0.65:
        return "top" if o.y < 0.35 else "bottom"
    return None


# --- splits ---------------------------------------------------------------------------------------
def pair_split(a: tuple[str, str], b: tuple[str, str]) -> Split:
    """The split of a pair of kinds, fixed by a hash of the pair (order does not matter)."""
    key = "|".join(sorted(("-".join(a), "-".join(b)))).encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % 100
    if bucket < _HELDOUT_PAIRS:
        return "heldout"
    return "val" if bucket < _HELDOUT_PAIRS + _VAL_PAIRS else "train"


def split_of(objects: tuple[Obj, ...] | list[Obj]) -> Split:
    """The hardest split among the scene's pairs of distinct kinds (held-out > val > train)."""
    kinds = sorted({o.kind for o in objects})
    splits = {pair_split(a, b) for a, b in combinations(kinds, 2)}
    return next((s for s in ("heldout", "val") if s in splits), "train")  # type: ignore[return-value]


# --- sampling -------------------------------------------------------------------------------------
def _place(rng: Random, kinds: list[tuple[str, str]], sizes: list[str]) -> list[Obj] | None:
    """Objects of these kinds and sizes at random non-overlapping places; None if they did not fit."""
    placed: list[Obj] = []
    for (colour, shape), size in zip(kinds, sizes, strict=True):
        extent = rng.uniform(*EXTENT[size])
        lo, hi = extent / 2 + _MARGIN, 1 - extent / 2 - _MARGIN
        for _ in range(60):
            o = Obj(shape, colour, size, rng.uniform(lo, hi), rng.uniform(lo, hi), extent)
            if all(_apart(o, p) for p in placed):
                placed.append(o)
                break
        else:
            return None
    return placed


def _apart(a: Obj, b: Obj) -> bool:
    ax1, ay1, ax2, ay2 = a.box()
    bx1, by1, bx2, by2 = b.box()
    return ax2 + _GAP <= bx1 or bx2 + _GAP <= ax1 or ay2 + _GAP <= by1 or by2 + _GAP <= ay1


def describe(objects: list[Obj], rng: Random) -> Spec:
    """A spec the objects satisfy: one phrase per kind (with its count), sizes sometimes, a
    relation between consecutive lone kinds where one clearly holds, and a position for a
    lone object sometimes."""
    kinds = list(dict.fromkeys(o.kind for o in objects))
    groups = [[o for o in objects if o.kind == k] for k in kinds]
    phrases = []
    for (colour, shape), group in zip(kinds, groups, strict=True):
        sizes = {o.size for o in group}
        size = sizes.pop() if len(sizes) == 1 and rng.random() < 0.35 else None
        phrases.append(Phrase(shape, colour, len(group), size))
    relations: list[tuple[int, str, int]] = []
    i = 0
    while i + 1 < len(groups):
        a, b = groups[i], groups[i + 1]
        rel = relation(a[0], b[0]) if len(a) == len(b) == 1 else None
        if rel is not None and rng.random() < 0.8:
            relations.append((i, rel, i + 1))
            i += 2
        else:
            i += 1
    positions = []
    if len(objects) == 1 and (where := position(objects[0])) and rng.random() < 0.5:
        positions.append((0, where))
    return Spec(tuple(phrases), tuple(relations), tuple(positions))


def sample_scene(rng: Random, split: Split | None = None, n_objects: int | None = None) -> Scene:
    """A random scene (of `split` when given: drawn until its pairs fall in it)."""
    while True:
        n = n_objects or rng.choices((1, 2, 3, 4), weights=(3, 4, 2, 1))[0]
        kinds: list[tuple[str, str]] = []
        for _ in range(n):
            if kinds and rng.random() < 0.25:  # a repeat: counts are part of the world
                kinds.append(rng.choice(kinds))
            else:
                kinds.append((rng.choice(COLOURS), rng.choice(SHAPES)))
        large = 0.45 if n <= 2 else 0.15
        sizes = ["large" if rng.random() < large else "small" for _ in kinds]
        objects = _place(rng, kinds, sizes)
        if objects is None or (split is not None and split_of(objects) != split):
            continue
        return Scene(tuple(objects), describe(objects, rng))


def sample_scenes(split: Split, n: int, seed: int = 0, n_objects: int | None = None) -> list[Scene]:
    """`n` scenes of `split`, the same ones for the same seed."""
    rng = Random(f"{split}:{seed}")
    return [sample_scene(rng, split, n_objects) for _ in range(n)]


# --- rendering ------------------------------------------------------------------------------------
def render(scene: Scene | list[Obj] | tuple[Obj, ...], size: int = 64, supersample: int = 4):
    """The scene as an RGB image of `size` x `size` (drawn `supersample` times larger and
    downscaled, for anti-aliased edges)."""
    objects = scene.objects if isinstance(scene, Scene) else scene
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        x1, y1, x2, y2 = (v * big for v in o.box())
        if o.shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=RGB[o.colour])
        elif o.shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=RGB[o.colour])
        else:  # an upright triangle filling its box
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=RGB[o.colour])
    return image.resize((size, size), Image.Resampling.BOX)
