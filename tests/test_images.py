"""Images in chat messages: bounded in size, in the configured format, never fetched."""

from __future__ import annotations

import base64
import io

import pytest
from artloop.models.images import from_data_url, image_part, to_data_url
from PIL import Image


def decoded(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_large_images_are_downscaled_keeping_the_aspect():
    big = Image.new("RGB", (2000, 1000), (10, 200, 30))
    image = decoded(to_data_url(big, max_side=768))
    assert image.size == (768, 384) and image.format == "PNG"


def test_small_images_are_sent_as_they_are():
    small = Image.new("RGB", (64, 48), (1, 2, 3))
    assert from_data_url(to_data_url(small)).getpixel((5, 5)) == (1, 2, 3)


def test_jpeg_is_smaller_and_labelled():
    noisy = Image.effect_noise((512, 512), 64).convert("RGB")
    png, jpeg = to_data_url(noisy, fmt="PNG"), to_data_url(noisy, fmt="JPEG")
    assert jpeg.startswith("data:image/jpeg;base64,") and len(jpeg) < len(png)
    part = image_part(noisy, 256, "JPEG")
    assert part["type"] == "image_url" and decoded(part["image_url"]["url"]).size == (256, 256)


def test_remote_urls_are_refused():
    with pytest.raises(ValueError, match="only base64 data URLs"):
        from_data_url("http://example.com/cat.png")
