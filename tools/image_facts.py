"""Cheap, deterministic image statistics: numbers an agent can cite next to what a VLM says.

numpy + PIL only (no OpenCV / torchvision). ~5 ms for a 512px image. Values are rounded to
4 decimals so that they compare and serialise stably.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Rec. 601 luma weights, the ones PIL's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
CLIP_LOW, CLIP_HIGH = 0.02, 0.98  # luma within 2% of black / white counts as clipped

METRICS = {
    "brightness": "mean luma, 0 (black) to 1 (white)",
    "contrast": "RMS contrast: standard deviation of luma (0-0.5)",
    "saturation": "mean HSV saturation, (max-min)/max per pixel, 0-1",
    "colourfulness": "Hasler & Suesstrunk M3 on 0-255 RGB (0 gray, ~33 moderate, >82 highly)",
    "sharpness": "variance of the 4-neighbour Laplacian of luma on 0-255 (higher = sharper)",
    "entropy": "Shannon entropy of the 256-bin luma histogram, bits (0-8)",
    "clipped_dark": "share of pixels with luma below 0.02 (crushed shadows)",
    "clipped_bright": "share of pixels with luma above 0.98 (blown highlights)",
}


def measure(image: Image.Image) -> dict[str, float]:
    """The METRICS of an image (any PIL mode; alpha is ignored)."""
    # One contiguous float plane per channel: much faster than reducing an H x W x 3 array.
    r, g, b = (np.asarray(c, dtype=np.float32) for c in image.convert("RGB").split())
    if r.size == 0:
        raise ValueError("empty image")
    luma255 = _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b
    luma = np.clip(luma255 / 255.0, 0.0, 1.0)

    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    saturation = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)

    rg, yb = r - g, 0.5 * (r + g) - b
    colourfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())

    # Interior only: no border convention to pick, and a 1-pixel-wide image has none.
    if luma255.shape[0] >= 3 and luma255.shape[1] >= 3:
        c = luma255
        lap = c[:-2, 1:-1] + c[2:, 1:-1] + c[1:-1, :-2] + c[1:-1, 2:] - 4.0 * c[1:-1, 1:-1]
        sharpness = float(lap.var(dtype=np.float64))
    else:
        sharpness = 0.0

    hist = np.bincount(np.clip(np.rint(luma255), 0, 255).astype(np.int64).ravel(), minlength=256)
    p = hist[hist > 0] / hist.sum()
    entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0

    facts = {
        "brightness": luma.mean(dtype=np.float64),
        "contrast": luma.std(dtype=np.float64),
        "saturation": saturation.mean(dtype=np.float64),
        "colourfulness": colourfulness,
        "sharpness": sharpness,
        "entropy": entropy,
        "clipped_dark": (luma < CLIP_LOW).mean(),
        "clipped_bright": (luma > CLIP_HIGH).mean(),
    }
    return {k: round(float(v), 4) for k, v in facts.items()}
