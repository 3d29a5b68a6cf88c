"""Content-addressed image store: PNG files named by the sha256 of their bytes.

Graph state and trajectories hold these hashes, never pixels (docs/architecture.md, section 2).
Images from outside pass a pixel limit read from the header; `import_image` brings in a
person's own image (a session's start) within byte and pixel limits, at the generation size.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from PIL import Image, ImageEnhance, ImageOps

# The one pixel limit for images from outside (the store, the UI's uploads): checked per call,
# from the header, before a pixel is decoded. PIL's global MAX_IMAGE_PIXELS is left alone (its
# own check only raises past twice its limit).
MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE
# A person's own image file (`import_image`: `artloop run --image`, the UI's upload), read
# before anything is decoded: a 4096 x 4096 photo as PNG fits (uncompressed RGB is 48 MiB).
MAX_IMAGE_BYTES = 64 * 2**20
# The formats a person's image may come in: PIL's EPS plugin, say, would run Ghostscript on it.
IMPORT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageStoreError(ValueError):
    """An image could not be stored or read back (bad bytes, unknown hash, corrupt file)."""


class ImageTooLarge(ImageStoreError):
    """An image has more pixels than the limit; the message names both."""


def _limit(max_pixels: int) -> str:
    side = round(max_pixels**0.5)
    return f"{side}x{side}" if side * side == max_pixels else f"{max_pixels} pixels"


@contextmanager
def _opened(
    source: str | Path | IO[bytes], max_pixels: int, formats: tuple[str, ...] | None = None
) -> Iterator[Image.Image]:
    """The image opened lazily (its header read, nothing decoded), refused when too large
    (`formats`: the ones accepted; None: any PIL reads)."""
    try:
        with warnings.catch_warnings():  # PIL warns past its own limit; ours is the one that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=formats) as im:
                if (pixels := im.width * im.height) > max_pixels:
                    raise ImageTooLarge(
                        f"image too large: {im.width}x{im.height} = {pixels} "
                        f"pixels; the limit is {_limit(max_pixels)}"
                    )
                yield im
    except Image.DecompressionBombError:  # past twice PIL's limit: larger than ours anyway
        raise ImageTooLarge(
            f"image too large: over {2 * Image.MAX_IMAGE_PIXELS} pixels; "
            f"the limit is {_limit(max_pixels)}"
        ) from None
    except ImageStoreError:
        raise
    except Image.UnidentifiedImageError:  # its message names the buffer object, not the cause
        kinds = ", ".join(formats or ("PNG", "JPEG", "WEBP", "..."))
        raise ImageStoreError(f"not a readable image: not in a known format ({kinds})") from None
    except Exception as e:  # PIL raises many types for bad bytes
        raise ImageStoreError(f"not a readable image: {e}") from e


def check_pixels(source: str | Path | IO[bytes], max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """An image's (width, height) from its header; ImageTooLarge (naming the limit) when it
    has more than `max_pixels`, ImageStoreError when it is not an image. Nothing is decoded."""
    with _opened(source, max_pixels) as im:
        return im.size


def open_image(source: str | Path | IO[bytes], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image from outside as RGB, once its header has passed `check_pixels`."""
    with _opened(source, max_pixels) as im:
        im.load()
        return im.convert("RGB")


def _read_bounded(source: str | Path | bytes, max_bytes: int) -> bytes:
    """A file's bytes (or the bytes given), refused past `max_bytes`: a file is never read
    further than that."""
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
        size = len(data)
    else:
        try:
            with open(source, "rb") as f:
                size = os.fstat(f.fileno()).st_size  # 0 for a pipe: then what is read tells
                data = b"" if size > max_bytes else f.read(max_bytes + 1)
        except OSError as e:
            raise ImageStoreError(f"cannot read {source}: {e.strerror or e}") from None
    if size > max_bytes or len(data) > max_bytes:
        said = f"{size} bytes" if size > max_bytes else f"over {max_bytes} bytes"
        limit = f"{max_bytes // 2**20} MiB" if max_bytes % 2**20 == 0 else f"{max_bytes} bytes"
        raise ImageTooLarge(f"image file too large: {said}; the limit is {limit}")
    return data


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
        return self.put(open_image(io.BytesIO(data)))

    def get(self, digest: str) -> Image.Image:
        path = self.path(digest)
        if not path.exists():
            raise ImageStoreError(f"no image {digest[:12]} in {self.root}")
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")

    def __contains__(self, digest: str) -> bool:
        return self.path(digest).exists()


def import_image(
    images: ImageStore,
    source: str | Path | bytes,
    size: tuple[int, int],
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> str:
    """A person's own image (a file's path, or its bytes) stored as a session's first image at
    `size`, the (width, height) the model generates at; its hash. Refused, the limit named,
    when it is not an image (in IMPORT_FORMATS), has more than `max_bytes` or more than
    `max_pixels` (read from the header: a decompression bomb is never decoded); a refused
    image stores nothing."""
    data = _read_bounded(source, max_bytes)
    with _opened(io.BytesIO(data), max_pixels, IMPORT_FORMATS) as im:
        im.load()
        picture = ImageOps.exif_transpose(im)  # a phone's photo the way up it was taken
        if picture.has_transparency_data:  # what shows through is white, not the hidden colours
            white = Image.new("RGBA", picture.size, "white")
            picture = Image.alpha_composite(white, picture.convert("RGBA"))
        picture = picture.convert("RGB")
    if picture.size != size:
        # Scaled to cover the size, then centre-cropped: the picture keeps its proportions
        # (squashed, its subject would look malformed to the critics, which would spend the
        # loop on it) and loses only its margins; padding instead would add bars they judge.
        picture = ImageOps.fit(picture, size, Image.Resampling.LANCZOS)
    return images.put(picture)


def adjust_tone(
    image: Image.Image,
    exposure: float | None = None,
    contrast: float | None = None,
    saturation: float | None = None,
) -> Image.Image:
    """Global tone factors (1 = unchanged, None = skip), in the order a photo editor applies
    them: exposure (brightness), then contrast, then saturation."""
    image = image.convert("RGB")
    for factor, enhancer in (
        (exposure, ImageEnhance.Brightness),
        (contrast, ImageEnhance.Contrast),
        (saturation, ImageEnhance.Color),
    ):
        if factor is not None and factor != 1.0:
            image = enhancer(image).enhance(factor)
    return image
