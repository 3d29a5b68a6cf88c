"""Images inside chat messages: PIL <-> data URLs, with a bounded size."""

from __future__ import annotations

import base64
import io

from PIL import Image


def fit_image(image: Image.Image, max_side: int = 768) -> Image.Image:
    """The image as it is sent: RGB, downscaled so that its longer side is <= max_side."""
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def to_data_url(image: Image.Image, max_side: int = 768, fmt: str = "PNG") -> str:
    """Encode an image as a data URL, downscaled so that its longer side is <= max_side."""
    image = fit_image(image, max_side)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt.upper() == "JPEG" else {}))
    mime = "image/jpeg" if fmt.upper() == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def from_data_url(url: str) -> Image.Image:
    """Decode a base64 data URL (remote URLs are refused: nothing is fetched from the network)."""
    if not url.startswith("data:") or ";base64," not in url:
        raise ValueError("only base64 data URLs are accepted as images, got " + url[:40])
    data = base64.b64decode(url.split(";base64,", 1)[1])
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def image_part(image: Image.Image, max_side: int = 768, fmt: str = "PNG") -> dict:
    """An OpenAI-style image content part, understood by vLLM and by the in-process backend."""
    return {"type": "image_url", "image_url": {"url": to_data_url(image, max_side, fmt)}}
