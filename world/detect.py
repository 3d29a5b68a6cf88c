"""The shapes world's exact detector: colour segmentation and region properties (scikit-image),
no learned model.

Each pixel that is saturated enough to be paint (not the grey background) is given the colour
of the nearest hue; each colour's mask is opened, split into connected regions, and each region
large enough becomes a detection. Its shape is read from two region properties: how its area
splits between the top and bottom halves of its box (`top`: an upright triangle holds a quarter
above the middle, a circle and a square half) and how much of its box it fills (`fill`: a
circle pi/4, a square all of it). The split survives the opening that blunts a small
triangle's tip, which lifts its fill towards a circle's.
"""

from __future__ import annotations

# Deliberately lazy: scikit-image is imported inside `detect`, so that importing the shapes
# world (the config, the CLI) does not load it.
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
from artloop.world.scenes import RGB, SIZE_THRESHOLD
from PIL import Image

MIN_SATURATION = 0.35  # the background is grey (saturation 0); the paints are above 0.75
MIN_VALUE = 0.2
MIN_AREA = 0.004  # of the image: a third of the smallest object's area
_TRIANGLE_TOP = 0.375  # midway between a triangle's top share (0.25) and the others' (0.5)
# Rendered at 64 px, circles fill <= 0.876 and squares >= 0.967; a VAE rounds the corners.
_SQUARE_FILL = 0.885


@dataclass(frozen=True)
class Detection:
    """A shape found in an image: kind, size class, box centre and box as shares of the image side
    (x to the right, y down), its extent (the box's longer side), area and fill."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    box: tuple[float, float, float, float]
    extent: float
    area: float
    fill: float
    top: float

    def text(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def _hues() -> np.ndarray:
    """Each colour's hue (0-1), in RGB's order: computed once, not per image."""
    from skimage.color import rgb2hsv

    return rgb2hsv(np.array([list(RGB.values())], dtype=np.float64) / 255.0)[0, :, 0]


def _shape(fill: float, top: float) -> str:
    if top < _TRIANGLE_TOP:
        return "triangle"
    return "square" if fill > _SQUARE_FILL else "circle"


def _top_share(mask: np.ndarray) -> float:
    """The share of a region's area above the middle row of its box (the middle row excluded)."""
    h = mask.shape[0]
    top, bottom = mask[: h // 2].sum(), mask[(h + 1) // 2 :].sum()
    return float(top / max(1, top + bottom))


def detect(image: Image.Image) -> list[Detection]:
    """The shapes in `image`, top to bottom then left to right."""
    from scipy.ndimage import binary_fill_holes
    from skimage.color import rgb2hsv
    from skimage.filters.rank import majority
    from skimage.measure import label, regionprops
    from skimage.morphology import disk, opening

    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    height, width = rgb.shape[:2]
    hsv = rgb2hsv(rgb)
    paint = (hsv[..., 1] >= MIN_SATURATION) & (hsv[..., 2] >= MIN_VALUE)
    names = list(RGB)
    hues = _hues()
    # Circular distance from each pixel's hue to each colour's: the nearest names the pixel.
    d = np.abs(hsv[..., 0][..., None] - hues)
    nearest = np.argmin(np.minimum(d, 1.0 - d), axis=-1)
    # Each pixel takes its neighbourhood's most common label (0: background), so that a stray
    # hue or a faint pixel does not notch a shape's edge.
    labels = majority(np.where(paint, nearest + 1, 0).astype(np.uint8), disk(1))
    found: list[Detection] = []
    side = float(max(height, width))
    for k, name in enumerate(names):
        # Holes first (a noisy pixel whose hue strays inside a shape), then specks and spurs.
        mask = opening(binary_fill_holes(labels == k + 1), disk(1))
        for region in regionprops(label(mask)):
            if region.area < MIN_AREA * height * width:
                continue
            r1, c1, r2, c2 = region.bbox
            extent = max(r2 - r1, c2 - c1) / side
            fill = float(region.area / ((r2 - r1) * (c2 - c1)))
            top = _top_share(region.image)
            found.append(
                Detection(
                    shape=_shape(fill, top),
                    colour=name,
                    size="small" if extent < SIZE_THRESHOLD else "large",
                    # The box's centre, as the scene graph's (a triangle's centroid is lower).
                    x=(c1 + c2) / 2 / width,
                    y=(r1 + r2) / 2 / height,
                    box=(c1 / width, r1 / height, c2 / width, r2 / height),
                    extent=extent,
                    area=float(region.area) / (height * width),
                    fill=fill,
                    top=top,
                )
            )
    return sorted(found, key=lambda d: (round(d.y, 1), d.x))
