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


# What each statistic means to someone reading it (an agent's prompt renders this table): its
# scale, the range a well-made photograph or illustration usually falls in, and what a value
# below or above that range suggests. A range is a guide, not a rule: a night scene is dark.
# Sharpness has no upper bound and depends on resolution (measured on the image as generated);
# noise scores in the tens of thousands, a heavy blur below 50.
STAT_GUIDE: dict[str, dict] = {
    "brightness": {
        "measures": "mean brightness",
        "scale": "0 (black) to 1 (white)",
        "normal": (0.3, 0.7),
        "low": "dark",
        "high": "bright, washed out",
    },
    "contrast": {
        "measures": "spread of brightness (standard deviation)",
        "scale": "0 (one flat tone) to 0.5",
        "normal": (0.15, 0.3),
        "low": "flat, hazy",
        "high": "harsh",
    },
    "saturation": {
        "measures": "mean colour saturation",
        "scale": "0 (grey) to 1 (pure colour)",
        "normal": (0.2, 0.6),
        "low": "washed-out colour",
        "high": "oversaturated",
    },
    "colourfulness": {
        "measures": "colourfulness (Hasler & Suesstrunk)",
        "scale": "0 (grey), 33 moderate, 82 high, 110+ extreme",
        "normal": (20, 85),
        "low": "dull colour",
        "high": "garish colour",
    },
    "sharpness": {
        "measures": "edge strength (variance of the Laplacian)",
        "scale": "0 upward; crisp detail is in the hundreds to thousands",
        "normal": (150, 5000),
        "low": "soft or blurred",
        "high": "grainy or noisy",
    },
    "entropy": {
        "measures": "tonal variety (histogram entropy)",
        "scale": "bits, 0 (one tone) to 8 (every tone)",
        "normal": (6.0, 8.0),
        "low": "few tones: flat areas or posterised",
        "high": "",
    },
    "clipped_dark": {
        "measures": "pixels crushed to black",
        "scale": "share of pixels, 0 to 1",
        "normal": (0.0, 0.05),
        "low": "",
        "high": "crushed shadows",
    },
    "clipped_bright": {
        "measures": "pixels blown to white",
        "scale": "share of pixels, 0 to 1",
        "normal": (0.0, 0.05),
        "low": "",
        "high": "blown highlights",
    },
}


def _shown(value: float) -> str:
    # Three significant digits below 100 (0.421, 33.4), whole numbers above (2345).
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def read_stat(name: str, value: float) -> str:
    """`value` of statistic `name` in words: "0.421 (normal)", "84.2 (low: soft or blurred)";
    a statistic without a guide is its value alone."""
    guide = STAT_GUIDE.get(name)
    if guide is None:
        return _shown(value)
    lo, hi = guide["normal"]
    where = "low" if value < lo else "high" if value > hi else None
    return f"{_shown(value)} ({f'{where}: {guide[where]}' if where else 'normal'})"


def stat_table() -> list[dict[str, str]]:
    """STAT_GUIDE as rows of text: name, what it measures, scale, normal range, low, high."""
    return [
        {
            "name": name,
            "measures": g["measures"],
            "scale": g["scale"],
            "normal": f"{_shown(g['normal'][0])}-{_shown(g['normal'][1])}",
            "low": g["low"] or "-",
            "high": g["high"] or "-",
        }
        for name, g in STAT_GUIDE.items()
    ]


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
