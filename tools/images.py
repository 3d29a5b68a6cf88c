"""Content-addressed image store: PNG files named by the sha256 of their bytes.

Graph state and trajectories hold these hashes, never pixels (DESIGN.md, Data).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from PIL import Image

# A decompression bomb is refused before it is decoded (PIL raises past 2x this many pixels).
MAX_PIXELS = 64 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageStoreError(ValueError):
    """An image could not be stored or read back (bad bytes, unknown hash, corrupt file)."""


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG deterministically, so that the same pixels give the same hash."""
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ImageStore:
    """PNG files under `root/ab/abcdef...png`, keyed by sha256 of the PNG bytes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ImageStoreError(f"not an image hash: {digest!r}")
        return self.root / digest[:2] / f"{digest}.png"

    def put(self, image: Image.Image) -> str:
        """Store an image and return its hash; storing the same pixels twice is a no-op."""
        data = png_bytes(image)
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if not path.exists():
            try:
                atomic_write(path, data)
            except OSError as e:  # disk full, read-only, gone: nothing half-written stays
                raise ImageStoreError(
                    f"cannot store an image in {self.root}: {e.strerror or e}"
                ) from e
        return digest

    def put_bytes(self, data: bytes) -> str:
        """Decode untrusted image bytes (bounded in pixels), then store them as PNG."""
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Image.DecompressionBombError as e:
            raise ImageStoreError(f"image too large: {e}") from e
        except Exception as e:  # PIL raises many types for bad bytes
            raise ImageStoreError(f"not a readable image: {e}") from e
        return self.put(image.convert("RGB"))

    def get(self, digest: str) -> Image.Image:
        path = self.path(digest)
        if not path.exists():
            raise ImageStoreError(f"no image {digest[:12]} in {self.root}")
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")

    def __contains__(self, digest: str) -> bool:
        return self.path(digest).exists()


def adjust_tone(
    image: Image.Image,
    exposure: float | None = None,
    contrast: float | None = None,
    saturation: float | None = None,
) -> Image.Image:
    """Global tone factors (1 = unchanged, None = skip), in the order a photo editor applies
    them: exposure (brightness), then contrast, then saturation."""
    from PIL import ImageEnhance

    image = image.convert("RGB")
    for factor, enhancer in ((exposure, ImageEnhance.Brightness),
                             (contrast, ImageEnhance.Contrast),
                             (saturation, ImageEnhance.Color)):  # fmt: skip
        if factor is not None and factor != 1.0:
            image = enhancer(image).enhance(factor)
    return image
