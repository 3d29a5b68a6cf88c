"""Image statistics on images whose answers are known."""

from __future__ import annotations

import time

import numpy as np
import pytest
from artloop.tools.image_facts import METRICS, measure
from PIL import Image, ImageFilter


def solid(rgb: tuple[int, int, int], size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def noise(size: int = 128, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_all_metrics_present_and_documented():
    facts = measure(noise())
    assert set(facts) == set(METRICS)
    assert all(isinstance(v, float) for v in facts.values())
    assert all(round(v, 4) == v for v in facts.values())


def test_black_and_white():
    black, white = measure(solid((0, 0, 0))), measure(solid((255, 255, 255)))
    assert black["brightness"] == 0.0 and white["brightness"] == 1.0
    assert black["clipped_dark"] == 1.0 and black["clipped_bright"] == 0.0
    assert white["clipped_bright"] == 1.0 and white["clipped_dark"] == 0.0
    for facts in (black, white):
        assert facts["contrast"] == facts["sharpness"] == facts["entropy"] == 0.0


def test_gray_has_no_colour():
    facts = measure(solid((128, 128, 128)))
    assert facts["saturation"] == 0.0 and facts["colourfulness"] == 0.0
    assert facts["brightness"] == pytest.approx(128 / 255, abs=1e-4)


def test_pure_red_is_saturated_and_colourful():
    facts = measure(solid((255, 0, 0)))
    assert facts["saturation"] == 1.0
    assert facts["colourfulness"] > 80  # "highly colourful" on Hasler & Suesstrunk's scale
    assert facts["brightness"] == pytest.approx(0.299, abs=1e-4)


def test_noise_is_sharper_and_richer_than_its_blur():
    sharp = noise()
    blurred = sharp.filter(ImageFilter.GaussianBlur(2))
    a, b = measure(sharp), measure(blurred)
    assert a["sharpness"] > 10 * b["sharpness"]
    assert a["contrast"] > b["contrast"]
    assert a["entropy"] > b["entropy"]
    assert a["entropy"] > 7.0  # close to the 8-bit maximum


def test_half_black_half_white():
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, 32:] = 255
    facts = measure(Image.fromarray(arr))
    assert facts["brightness"] == 0.5 and facts["contrast"] == 0.5
    assert facts["entropy"] == 1.0
    assert facts["clipped_dark"] == facts["clipped_bright"] == 0.5


def test_modes_and_tiny_images():
    assert measure(Image.new("L", (8, 8), 255))["brightness"] == 1.0
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    assert measure(rgba)["saturation"] == 1.0
    assert measure(Image.new("RGB", (1, 1)))["sharpness"] == 0.0


def test_deterministic_and_fast():
    image = noise(512, seed=1)
    assert measure(image) == measure(image.copy())
    measure(image)
    start = time.perf_counter()
    for _ in range(5):
        measure(image)
    # ~10-20 ms on 2 CPU cores; generous bound for a loaded machine.
    assert (time.perf_counter() - start) / 5 < 0.2
