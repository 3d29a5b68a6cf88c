"""Qwen-VL model families: the class that loads a checkpoint, how the model writes boxes, its
image limits and chat-template quirks; `chat.family` picks one (or `auto` detects it).

Box conventions. artloop's own grid is [x1, y1, x2, y2] normalised to 0-1000, top-left origin,
everywhere: the schemas, the store, the UI, the edit tools. The families ground differently:

- qwen2-vl, qwen3-vl: the same 0-1000 grid; nothing is converted.
- qwen2.5-vl: absolute pixels of the model's resized input: the image as sent (after
  `chat.image_max_side`'s downscale) resized by the processor's `smart_resize` (each side a
  multiple of patch size x merge size, the area within [min_pixels, max_pixels]); W x H below.

On the way in (a model's answer) a pixel box becomes x * 1000 / W, y * 1000 / H (rounded), then
is clipped and ordered like any model box (agents/schemas.py). A coordinate outside [0, W] x
[0, H] is an invalid answer, not clipped: it is most likely a box in the wrong convention (0-1000
given where pixels were due), and the repair retry tells the model so. On the way out (boxes put
in a prompt: the facts' objects, the critique's findings, the plan's edits) 0-1000 becomes
x * W / 1000, y * H / 1000 (rounded). The grammar's bounds follow: x in [0, W], y in [0, H].
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Literal

from artloop.config import ChatConfig, ConfigError
from artloop.models.tiny.vlm import MODEL_TYPES, TINY_CONFIGS, TINY_FAMILIES

FAMILY_NAMES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.json's model_type
    model_class: str  # the transformers class that loads it in-process
    boxes: Literal["grid", "pixels"]  # grid: 0-1000; pixels: of the resized input
    patch_size: int
    merge_size: int
    # The image processor's area bounds (the published checkpoints' values unless the model's
    # own processor config says otherwise): at most max_pixels / (patch * merge)^2 image tokens.
    min_pixels: int
    max_pixels: int
    # Chat-template quirk: the template adds "You are a helpful assistant." when a conversation
    # has no system message (Qwen2-VL, Qwen2.5-VL), or adds nothing (Qwen3-VL).
    default_system: bool

    @property
    def max_image_tokens(self) -> int:
        return self.max_pixels // (self.patch_size * self.merge_size) ** 2

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(W, H) of the model's input for an image sent at width x height."""
        h, w = smart_resize(
            height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )
        return w, h

    def frame(self, width: int, height: int) -> BoxFrame:
        """How boxes are written about an image sent at width x height."""
        if self.boxes == "grid":
            return GRID
        return BoxFrame(True, *self.input_size(width, height))


FAMILIES = {
    "qwen2-vl": Family(
        "qwen2-vl",
        "qwen2_vl",
        "Qwen2VLForConditionalGeneration",
        "grid",
        14,
        2,
        56 * 56,
        28 * 28 * 16384,
        default_system=True,
    ),
    "qwen2.5-vl": Family(
        "qwen2.5-vl",
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        "pixels",
        14,
        2,
        56 * 56,
        28 * 28 * 16384,
        default_system=True,
    ),
    "qwen3-vl": Family(
        "qwen3-vl",
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        "grid",
        16,
        2,
        65536,
        16777216,
        default_system=False,
    ),
}
assert set(FAMILIES) == set(FAMILY_NAMES) == set(MODEL_TYPES.values())


@dataclass(frozen=True)
class BoxFrame:
    """The box convention for one image as sent: artloop's 0-1000 grid, or pixels of a
    width x height model input."""

    pixels: bool
    width: int = 1000
    height: int = 1000

    def to_grid(self, box: object) -> object:
        """A model's box in this convention -> artloop's 0-1000 grid. ValueError when a pixel
        coordinate lies outside the input image (validation reports it; not clipped)."""
        if not self.pixels or not isinstance(box, (list, tuple)) or len(box) != 4:
            return box  # the grid, or not a box: validation says what is wrong
        try:
            coords = [float(v) for v in box]
        except (TypeError, ValueError):
            return box
        sides = (self.width, self.height) * 2
        if any(not 0 <= v <= side for v, side in zip(coords, sides, strict=True)):
            raise ValueError(
                f"box {list(box)} is outside the {self.width}x{self.height} image: boxes are "
                f"absolute pixels of the model's input, x in 0-{self.width}, y in 0-{self.height}"
            )
        return [round(v * 1000 / side) for v, side in zip(coords, sides, strict=True)]

    def from_grid(self, box: list[int]) -> list[int]:
        """A box in artloop's 0-1000 grid -> this convention (for prompts)."""
        if not self.pixels:
            return list(box)
        sides = (self.width, self.height) * 2
        return [round(v * side / 1000) for v, side in zip(box, sides, strict=True)]

    def bounds(self) -> tuple[int, int]:
        """The largest x and y a box may have."""
        return self.width, self.height

    def describe(self) -> str:
        """The convention in words, for prompts."""
        if not self.pixels:
            return "[x1, y1, x2, y2] in coordinates normalised to 0-1000 (top-left origin)"
        return (
            f"[x1, y1, x2, y2] in absolute pixels of the {self.width}x{self.height} image "
            f"(top-left origin)"
        )


GRID = BoxFrame(False)


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(h, w) of the Qwen-VL processors' resize: each a multiple of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as closely as it can be (transformers'
    qwen2_vl.image_processing_qwen2_vl.smart_resize, without importing transformers)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {width}x{height} is over 200: not accepted")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def get_family(name: str) -> Family:
    """The family by name; ValueError listing the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


_ID_PATTERNS = (  # most specific first: "qwen2.5-vl" also contains "vl"
    ("qwen2.5-vl", re.compile(r"qwen2[._-]?5[._-]?vl")),
    ("qwen3-vl", re.compile(r"qwen3[._-]?vl")),
    ("qwen2-vl", re.compile(r"qwen2[._-]?vl")),
)


def detect_family(model: str) -> tuple[str | None, str]:
    """(family, where it was read) for a model name: a tiny model's own, a local directory's
    config.json model_type, else the model id's text; (None, why) when none says."""
    if model in TINY_FAMILIES:
        return TINY_FAMILIES[model], f"tiny model {model}"
    path = Path(model).expanduser()
    config = path / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type in MODEL_TYPES:
            return MODEL_TYPES[model_type], f"{config} (model_type {model_type!r})"
        return None, f"{config} has model_type {model_type!r}, not a Qwen-VL family's"
    for name, pattern in _ID_PATTERNS:
        if pattern.search(model.lower()):
            return name, f"the model id {model!r}"
    return None, f"the model id {model!r} names no family"


def chat_family(cfg: ChatConfig) -> Family | None:
    """The configured chat model's family (None for the scripted and custom backends, whose
    model name says nothing: artloop's own grid)."""
    if cfg.backend not in ("inprocess", "openai"):
        return None
    return resolve_family(cfg.family, cfg.model)


@cache
def resolve_family(requested: str, model: str) -> Family:
    """The family for `chat.family` and `chat.model`, with the model's own image settings where
    it has them. `auto`: the detected family, else qwen2-vl (artloop's own 0-1000 grid: set
    chat.family when a served name hides a Qwen2.5-VL). ConfigError, one line, for an unknown
    family or one that contradicts what the model says it is."""
    detected, source = detect_family(model)
    if requested == "auto":
        name = detected or "qwen2-vl"
    else:
        try:
            get_family(requested)
        except ValueError as e:
            raise ConfigError(f"chat.family: {e}") from None
        if detected is not None and detected != requested:
            raise ConfigError(
                f"chat.family: {requested!r} contradicts the model {model!r}, a {detected} "
                f"by {source}; set chat.family = {detected!r} or 'auto'"
            )
        name = requested
    return with_model_settings(FAMILIES[name], model)


def with_model_settings(family: Family, model: str) -> Family:
    """The family with the model's own image-processor settings: a tiny model's config, a local
    directory's processor config; the published defaults otherwise."""
    if model in TINY_CONFIGS:
        cfg = TINY_CONFIGS[model]
        return replace(family, min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(model).expanduser() / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg = cfg.get("image_processor", cfg)
            size = cfg.get("size") or {}
            return replace(
                family,
                patch_size=int(cfg.get("patch_size", family.patch_size)),
                merge_size=int(cfg.get("merge_size", family.merge_size)),
                min_pixels=int(
                    cfg.get("min_pixels") or size.get("shortest_edge") or family.min_pixels
                ),
                max_pixels=int(
                    cfg.get("max_pixels") or size.get("longest_edge") or family.max_pixels
                ),
            )
    return family
