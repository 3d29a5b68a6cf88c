"""The one pixel limit (tools/images.MAX_PIXELS = 4096 x 4096): checked per call from the
header, before anything is decoded; PIL's process-wide limit is left alone."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import pytest
from artloop.tools.images import (
    MAX_PIXELS,
    ImageStoreError,
    ImageTooLarge,
    check_pixels,
    open_image,
)
from PIL import Image

PIL_DEFAULT = int(1024 * 1024 * 1024 // 4 // 3)  # PIL's own MAX_IMAGE_PIXELS


@functools.cache
def blank_png(width: int, height: int) -> bytes:
    """A valid greyscale PNG of zeros, compressed row block by row block: a 20000 x 20000 one
    (400 M pixels, about 400 KB) costs no 400 MB buffer."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    z, row, left, idat = zlib.compressobj(9), bytes(width + 1), height, []
    while left:
        n = min(left, max(1, 2**24 // len(row)))
        idat.append(z.compress(row * n))
        left -= n
    idat.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"".join(idat))
        + chunk(b"IEND", b"")
    )


def test_pil_global_limit_is_left_alone():
    import artloop.serve.ui  # noqa: F401  (both set it process-wide once, to two values)
    import artloop.tools.images  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS == PIL_DEFAULT


@pytest.mark.parametrize(
    ("size", "ok"),
    [
        ((4096, 4096), True),
        ((4097, 4096), False),
        ((5000, 5000), False),
        ((20000, 20000), False),
    ],
)
def test_the_limit_is_4096_squared_per_call(size, ok):
    data = io.BytesIO(blank_png(*size))
    if ok:
        assert check_pixels(data) == size and MAX_PIXELS == 4096 * 4096
        return
    with pytest.raises(ImageTooLarge, match=r"image too large: .*the limit is 4096x4096"):
        check_pixels(data)
    with pytest.raises(ImageTooLarge, match="4096x4096"):
        open_image(io.BytesIO(blank_png(*size)))


def test_the_store_refuses_an_image_over_the_limit(store):
    # 25 M pixels: under PIL's own bomb check (89 M, raising only past 179 M) but over ours.
    with pytest.raises(ImageTooLarge, match="5000x5000 = 25000000 pixels; the limit is 4096x4096"):
        store.images.put_bytes(blank_png(5000, 5000))
    assert not list(store.images.root.rglob("*.png"))
    with pytest.raises(ImageStoreError, match="not a readable image"):
        open_image(io.BytesIO(blank_png(64, 64)[:60]))  # the header, then nothing
    assert store.images.get(store.images.put_bytes(blank_png(64, 32))).size == (64, 32)
