"""The agents' boxes on the image: Data-CoT's objects, Concept-CoT's artifacts and Thesis-CoT's
box edits (and the person's own box edits), each layer in its own colour with a short label
inside its box. Boxes are [x1, y1, x2, y2] on a 0-1000 grid, top-left origin. A small image is
upscaled (nearest neighbour, by a whole factor) so the labels are readable; the stored image is
never changed. The legend is HTML (`legend_html`), beside the layer toggles, so the drawn image
keeps the image's geometry (clicks on it map back by `shown_size`).
"""

from __future__ import annotations

import hashlib
import json
from html import escape
from pathlib import Path
from typing import Any

from artloop.tools.images import open_image
from PIL import Image, ImageDraw, ImageFont

# layer: (colour, label prefix, what it is)
LAYERS: dict[str, tuple[tuple[int, int, int], str, str]] = {
    "objects": ((0, 170, 60), "obj", "Data-CoT's objects"),
    "artifacts": ((220, 0, 220), "art", "Concept-CoT's artifacts"),
    "edits": ((255, 140, 0), "edit", "Thesis-CoT's box edits"),
    "yours": ((230, 30, 30), "yours", "your box edits"),
}
AGENT_LAYERS = ["objects", "artifacts", "edits"]  # the toggles; "yours" is always drawn
MIN_SIDE = 384  # a smaller image is upscaled to at least this on its long side


def agent_boxes(agents: dict) -> list[dict]:
    """The boxes of one iteration's agents ({"data_cot": facts, "concept_cot": critique,
    "thesis_cot": plan}) as {"layer", "box", "label"}; a missing or null box (the whole
    image) is skipped."""
    found = [
        ("objects", o.get("box"), o.get("label"))
        for o in (agents.get("data_cot") or {}).get("objects") or []
    ]
    found += [
        ("artifacts", a.get("box"), a.get("kind"))
        for a in (agents.get("concept_cot") or {}).get("artifacts") or []
    ]
    plan = agents.get("thesis_cot") or {}
    found += [
        ("edits", r.get("box"), r.get("prompt"))
        for r in plan.get("regional_edits") or plan.get("regions") or []
    ]
    return [
        {"layer": layer, "box": [float(c) for c in box], "label": str(label or "")}
        for layer, box, label in found
        if isinstance(box, list | tuple) and len(box) == 4
    ]


def shown_scale(size: tuple[int, int], min_side: int = MIN_SIDE) -> int:
    """The whole factor an image of `size` is upscaled by to be shown."""
    return max(1, -(-min_side // max(1, max(size))))


def shown_size(size: tuple[int, int], min_side: int = MIN_SIDE) -> tuple[int, int]:
    scale = shown_scale(size, min_side)
    return size[0] * scale, size[1] * scale


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # no FreeType: the small bitmap font
        return ImageFont.load_default()


def _label(text: str, colour: tuple[int, int, int], font: Any, pad: int) -> Image.Image:
    """White text on the layer's colour."""
    left, top, right, bottom = font.getbbox(text)
    tag = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), colour)
    ImageDraw.Draw(tag).text((pad - left, pad - top), text, fill=(255, 255, 255), font=font)
    return tag


def render(
    image: Image.Image,
    boxes: list[dict],
    layers: list[str] | None = None,
    min_side: int = MIN_SIDE,
) -> Image.Image:
    """A copy of `image`, upscaled to `min_side`, with the boxes of `layers` (None: all) drawn:
    each a rectangle in its layer's colour, nested a line inward per layer so equal boxes stay
    visible, and its label ("obj: red circle") inside its top-left corner (a row lower per
    layer), cut to the box."""
    scale = shown_scale(image.size, min_side)
    out = image.convert("RGB").resize(
        (image.width * scale, image.height * scale), Image.Resampling.NEAREST
    )
    w, h = out.size
    line = max(2, max(w, h) // 192)
    font = _font(max(10, max(w, h) // 40))
    draw = ImageDraw.Draw(out)
    order = list(LAYERS)
    for b in boxes:
        if b["layer"] not in LAYERS or (layers is not None and b["layer"] not in layers):
            continue
        colour, prefix, _ = LAYERS[b["layer"]]
        x1, y1, x2, y2 = b["box"]
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        inset = order.index(b["layer"]) * line
        left = round(min(max(x1, 0), 1000) * w / 1000) + inset
        top = round(min(max(y1, 0), 1000) * h / 1000) + inset
        right = round(min(max(x2, 0), 1000) * w / 1000) - 1 - inset
        bottom = round(min(max(y2, 0), 1000) * h / 1000) - 1 - inset
        if right - left < 2 or bottom - top < 2:
            continue
        draw.rectangle((left, top, right, bottom), outline=colour, width=line)
        text = f"{prefix}: {b['label']}" if b.get("label") else prefix
        tag = _label(text[:40], colour, font, pad=max(1, line // 2))
        # each layer's label a row lower, so equal boxes' labels do not cover each other
        x, y = left + line, top + line + order.index(b["layer"]) * tag.height
        room = (right - line + 1 - x, bottom - line + 1 - y)  # inside the outline
        if room[0] > 0 and room[1] > 0:
            out.paste(tag.crop((0, 0, min(tag.width, room[0]), min(tag.height, room[1]))), (x, y))
    return out


def draw_boxes(path: str, boxes: list[dict], out_dir: Path, layers: list[str] | None = None) -> str:
    """`render` of the image at `path`, saved under `out_dir` (named by what is drawn)."""
    drawn = [b for b in boxes if layers is None or b["layer"] in layers]  # names the file
    key = json.dumps([str(path), drawn], sort_keys=True, default=str)
    out = out_dir / f"boxes-{hashlib.sha256(key.encode()).hexdigest()[:20]}.png"
    if not out.exists():
        render(open_image(path), drawn).save(out)
    return str(out)


def legend_html() -> str:
    """The layers' colours and what they are."""
    swatch = (
        '<span style="display:inline-block;width:0.9em;height:0.9em;border:2px solid '
        'rgb{colour};vertical-align:middle;margin:0 4px 0 10px"></span>'
    )
    return (
        '<div class="box-legend">'
        + "".join(
            swatch.format(colour=colour) + f"<b>{escape(prefix)}</b> {escape(what)}"
            for colour, prefix, what in LAYERS.values()
        )
        + "</div>"
    )


def iteration_agents(v: Any, digest: str | None, live: dict | None = None) -> dict:
    """The agents of the iteration the image `digest` belongs to: the step under way (`live`,
    with the plan a pause proposes) when paused, else the finished step that made it."""
    if v.pause:
        agents = dict(live or {})
        if v.pause.get("pause") == "plan" and v.pause.get("proposal"):
            agents["thesis_cot"] = v.pause["proposal"]
        return agents
    for step in reversed(v.steps):
        if digest and digest in (step.get("image"), step.get("edited_image")):
            return step.get("agents") or {}
    return {}
