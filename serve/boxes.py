"""The agents' boxes on the image: Data-CoT's objects, Concept-CoT's artifacts and Thesis-CoT's
box edits, and the person's own box edits, each layer in its own colour with a short label.
Boxes are [x1, y1, x2, y2] on a 0-1000 grid, top-left origin.

The image and its boxes are HTML (`canvas_html`): the stored image scaled by the browser
(pixelated, so the 64 px shapes world stays crisp) under one absolutely placed box per finding,
so a label reads at any size and the stored image is never changed. `CANVAS_JS` makes it
interactive: drag on the image to draw a box, drag one of your boxes to move it, its corner to
resize it, its x to delete it (each sent to the server as an `op`, applied by `apply_op`);
hovering a finding in the cards (an element with `data-box`) highlights its box, and hovering a
box highlights its finding. Every key is `i{iteration}-{layer}-{index}` (the index in the
agent's own list), so a card lights only the boxes of the image it describes.
"""

from __future__ import annotations

from html import escape
from typing import Any

# layer: (colour, label prefix, what it is)
LAYERS: dict[str, tuple[tuple[int, int, int], str, str]] = {
    "objects": ((0, 170, 60), "obj", "Data-CoT's objects"),
    "artifacts": ((220, 0, 220), "art", "Concept-CoT's artifacts"),
    "edits": ((255, 140, 0), "edit", "Thesis-CoT's box edits"),
    "yours": (
        (230, 30, 30),
        "yours",
        "your box edits (drag to move, corner to resize, x to delete)",
    ),
}
AGENT_LAYERS = ["objects", "artifacts", "edits"]  # the toggles; "yours" is always drawn
MIN_BOX = 10  # a dragged box smaller than this (per mille) on a side is a slip, not a box


def box_key(iteration: int, layer: str, index: int) -> str:
    return f"i{iteration}-{layer}-{index}"


def agent_boxes(agents: dict, iteration: int = 0) -> list[dict]:
    """The boxes of one iteration's agents ({"data_cot": facts, "concept_cot": critique,
    "thesis_cot": plan}) as {"layer", "box", "label", "key"}; a missing or null box (the whole
    image) is skipped, its index kept so keys match the cards."""
    plan = agents.get("thesis_cot") or {}
    sources = [
        ("objects", (agents.get("data_cot") or {}).get("objects"), "label"),
        ("artifacts", (agents.get("concept_cot") or {}).get("artifacts"), "kind"),
        ("edits", plan.get("regional_edits") or plan.get("regions"), "prompt"),
    ]
    return [
        {
            "layer": layer,
            "box": [float(c) for c in item["box"]],
            "label": str(item.get(name) or ""),
            "key": box_key(iteration, layer, i),
        }
        for layer, items, name in sources
        for i, item in enumerate(items or [])
        if isinstance(item.get("box"), list | tuple) and len(item["box"]) == 4
    ]


def region_boxes(rows: list[list]) -> list[dict]:
    """The person's box edits (the regions table's rows) as the "yours" layer; a row being typed
    in is skipped, its index kept (the index is the row's: moves and deletes name it)."""
    out = []
    for i, r in enumerate(rows):
        try:
            box = [float(c) for c in r[:4]]
        except (ValueError, TypeError, IndexError):
            continue
        if len(box) == 4:
            out.append({"layer": "yours", "box": box, "label": str(r[4]), "key": f"yours-{i}"})
    return out


def _clip(box: list[float]) -> tuple[float, float, float, float]:
    x1, x2 = sorted(min(max(c, 0.0), 1000.0) for c in (box[0], box[2]))
    y1, y2 = sorted(min(max(c, 0.0), 1000.0) for c in (box[1], box[3]))
    return x1, y1, x2, y2


def _place(x1: float, y1: float, x2: float, y2: float, inset: int = 0) -> str:
    """CSS placing a box over the image, `inset` pixels inward on every side."""
    return (
        f"left:calc({x1 / 10:.2f}% + {inset}px);top:calc({y1 / 10:.2f}% + {inset}px);"
        f"width:calc({(x2 - x1) / 10:.2f}% - {2 * inset}px);"
        f"height:calc({(y2 - y1) / 10:.2f}% - {2 * inset}px);"
    )


def _box_div(b: dict, nest: int) -> str:
    colour, prefix, _ = LAYERS[b["layer"]]
    x1, y1, x2, y2 = _clip(b["box"])
    label = f"{prefix}: {b['label']}" if b.get("label") else prefix
    rgb = "rgb({},{},{})".format(*colour)
    attrs, handles = "", ""
    if b["layer"] == "yours":  # the person's: movable, resizable, deletable
        attrs = f' data-index="{b["key"].split("-")[1]}" data-coords="{escape(str(b["box"]))}"'
        handles = '<b class="del" title="delete this box">x</b><i class="grip" title="resize"></i>'
    # Each layer nests a little inward and its label a row lower, so equal boxes stay visible.
    return (
        f'<div class="bx bx-{b["layer"]}" data-key="{escape(b["key"])}"{attrs}'
        f' style="{_place(x1, y1, x2, y2, nest * 3)}border-color:{rgb}">'
        f'<span class="tag" style="background:{rgb};top:{nest * 1.3:.1f}em">'
        f"{escape(label[:40])}</span>{handles}</div>"
    )


def canvas_html(
    src: str | None,
    boxes: list[dict],
    layers: list[str] | None = None,
    pending: list[int] | None = None,
) -> str:
    """The image at URL `src` with the boxes of `layers` (None: all; "yours" always) over it, and
    the box being named (`pending`, dashed)."""
    if not src:
        return '<div class="al-empty">No image yet: start a session.</div>'
    order = list(LAYERS)
    shown = [
        _box_div(b, order.index(b["layer"]))
        for b in boxes
        if b["layer"] in LAYERS and (layers is None or b["layer"] in (*layers, "yours"))
    ]
    if pending:
        x1, y1, x2, y2 = _clip([float(c) for c in pending])
        shown.append(f'<div class="bx bx-pending" style="{_place(x1, y1, x2, y2)}"></div>')
    return (
        f'<div class="al-canvas"><img src="{escape(src)}" alt="the image" draggable="false">'
        + "".join(shown)
        + "</div>"
    )


def apply_op(rows: list[list], op: dict, strength: float = 0.6) -> tuple[list[list], list | None]:
    """A box drawn, moved, resized or deleted on the image, applied to the regions table's rows:
    (new rows, the box to name: a drawn one waits for its local prompt). Bad ops raise
    ValueError with one line."""
    kind, rows = op.get("op"), [list(r) for r in rows]
    if kind == "delete" or kind == "move":
        index = op.get("index")
        if not isinstance(index, int) or not 0 <= index < len(rows):
            raise ValueError(f"there is no box edit {index!r} to {kind}")
        if kind == "delete":
            return rows[:index] + rows[index + 1 :], None
    if kind not in ("add", "move"):
        raise ValueError(f"unknown box operation {kind!r}")
    try:
        box = [round(float(c)) for c in op["box"]]
    except (KeyError, TypeError, ValueError):
        box = []
    if len(box) != 4:
        raise ValueError(f"a box is four numbers x1, y1, x2, y2 (0-1000), not {op.get('box')!r}")
    x1, y1, x2, y2 = (round(c) for c in _clip(box))
    if x2 - x1 < MIN_BOX or y2 - y1 < MIN_BOX:
        raise ValueError(f"the box {box} is too small: drag over the region to change")
    if kind == "add":
        return rows, [x1, y1, x2, y2]
    rows[op["index"]][:4] = [x1, y1, x2, y2]
    return rows, None


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


def iteration_agents(v: Any, digest: str | None, live: dict | None = None) -> tuple[int, dict]:
    """(iteration, agents) of the image `digest`: at a pause, the step under way (`live`; a
    plan pause's proposed box edits are the person's table, the "yours" layer, not drawn twice),
    else the finished step that made it."""
    if v.pause:
        agents = dict(live or {})
        if v.pause.get("pause") == "plan":
            agents.pop("thesis_cot", None)
        return v.iteration, agents
    for step in reversed(v.steps):
        if digest and digest in (step.get("image"), step.get("edited_image")):
            return step.get("iteration", 0), step.get("agents") or {}
    return 0, {}


CANVAS_CSS = """
.al-canvas { position: relative; display: inline-block; width: 100%; max-width: 560px;
  user-select: none; touch-action: none; cursor: crosshair; }
.al-canvas img { display: block; width: 100%; height: auto; image-rendering: pixelated; }
.bx { position: absolute; box-sizing: border-box; border: 3px solid; }
.bx .tag { position: absolute; left: 0; color: #fff; font: 12px/1.3 sans-serif;
  padding: 0 3px; white-space: nowrap; max-width: 100%; overflow: hidden; }
.bx-yours { pointer-events: auto; cursor: move; border-style: solid; }
.bx-yours .del { position: absolute; right: 0; top: 0; background: #e61e1e; color: #fff;
  font: bold 12px/1 sans-serif; padding: 2px 5px; cursor: pointer; }
.bx-yours .grip { position: absolute; right: -5px; bottom: -5px; width: 10px; height: 10px;
  background: #e61e1e; cursor: nwse-resize; }
.bx-pending, .bx-ghost { border: 3px dashed #e61e1e; }
.al-empty { padding: 3em; color: #6b7280; }
"""

# Runs once in the browser when the canvas mounts (Gradio's js_on_load: `element` is the
# component, `trigger(event, data)` calls its Python listener). Listeners sit on `element` and
# `document`, so they survive every re-render of the canvas.
CANVAS_JS = """
const at = (e) => {
  const r = element.querySelector('.al-canvas').getBoundingClientRect();
  const c = (v, size) => Math.max(0, Math.min(1000, Math.round(v * 1000 / size)));
  return [c(e.clientX - r.left, r.width), c(e.clientY - r.top, r.height)];
};
const place = (el, b) => {
  el.style.left = b[0] / 10 + '%'; el.style.top = b[1] / 10 + '%';
  el.style.width = (b[2] - b[0]) / 10 + '%'; el.style.height = (b[3] - b[1]) / 10 + '%';
};
let drag = null;
element.addEventListener('pointerdown', (e) => {
  const canvas = element.querySelector('.al-canvas');
  if (!canvas || e.button !== 0) return;
  const bx = e.target.closest('.bx-yours');
  if (e.target.closest('.del')) {
    trigger('submit', {op: 'delete', index: Number(bx.dataset.index)});
    e.preventDefault();
    return;
  }
  const [x, y] = at(e);
  if (bx) {
    const mode = e.target.closest('.grip') ? 'resize' : 'move';
    drag = {mode, el: bx, start: [x, y], box: JSON.parse(bx.dataset.coords),
            index: Number(bx.dataset.index)};
  } else {
    const ghost = document.createElement('div');
    ghost.className = 'bx bx-ghost';
    canvas.appendChild(ghost);
    drag = {mode: 'draw', el: ghost, start: [x, y]};
  }
  canvas.setPointerCapture(e.pointerId);
  e.preventDefault();
});
element.addEventListener('pointermove', (e) => {
  if (!drag) return;
  const [x, y] = at(e), [sx, sy] = drag.start;
  let b;
  if (drag.mode === 'draw') {
    b = [Math.min(sx, x), Math.min(sy, y), Math.max(sx, x), Math.max(sy, y)];
  } else if (drag.mode === 'move') {
    const [x1, y1, x2, y2] = drag.box;
    const dx = Math.max(-x1, Math.min(1000 - x2, x - sx));
    const dy = Math.max(-y1, Math.min(1000 - y2, y - sy));
    b = [x1 + dx, y1 + dy, x2 + dx, y2 + dy];
  } else {
    b = [drag.box[0], drag.box[1], Math.max(drag.box[0] + 10, x), Math.max(drag.box[1] + 10, y)];
  }
  drag.now = b.map(Math.round);
  place(drag.el, drag.now);
});
element.addEventListener('pointerup', () => {
  if (!drag) return;
  const d = drag;
  drag = null;
  if (d.mode === 'draw') d.el.remove();
  if (!d.now) return;
  if (d.mode === 'draw') {
    if (d.now[2] - d.now[0] >= 10 && d.now[3] - d.now[1] >= 10) {
      trigger('submit', {op: 'add', box: d.now});
    }
  } else {
    trigger('submit', {op: 'move', index: d.index, box: d.now});
  }
});
const light = (key, on) => {
  if (!key) return;
  document.querySelectorAll(`[data-key="${key}"], [data-box-key="${key}"]`).forEach((n) => {
    n.style.boxShadow = on ? '0 0 0 3px #2563eb' : '';
    n.style.background = on ? 'rgba(37, 99, 235, 0.15)' : '';
  });
};
const keyOf = (t) => {
  const n = t.closest && t.closest('[data-box-key], .bx[data-key]');
  return n ? (n.dataset.boxKey || n.dataset.key) : null;
};
document.addEventListener('mouseover', (e) => light(keyOf(e.target), true));
document.addEventListener('mouseout', (e) => light(keyOf(e.target), false));
"""
