"""What the web UI shows of a session and what it sends back, without Gradio: the status line,
the image to look at, the box edits table, the before/after of an iteration, and the person's
answer at a pause. serve/ui.py wires these to the page; the tests call them directly.
"""

from __future__ import annotations

from typing import Any

from artloop.graphs.human import HumanActionError

REGION_COLUMNS = ["x1", "y1", "x2", "y2", "prompt", "strength"]


def status_line(v: Any) -> str:
    if v.pause:
        return (
            f"**{v.run_id}**: paused at **{v.pause['pause']}** (iteration {v.iteration + 1}) "
            f"- your turn"
        )
    if v.status == "interrupted":  # stopped, or a fork not run yet
        return (
            f"**{v.run_id}**: ready to go on from iteration {v.iteration + 1} "
            f"({len(v.steps)} done): press Resume"
        )
    best = f", best score {v.best_score}" if v.best_score is not None else ""
    return f"**{v.run_id}**: {v.status} after {len(v.steps)} iteration(s){best}"


def focus_digest(v: Any) -> str | None:
    """The image to look at (and draw boxes on): the pause's, else the best so far."""
    digest = None
    if v.pause:
        digest = v.pause.get("edited_image") or v.pause.get("image")
    last = v.steps[-1] if v.steps else {}
    return digest or v.best_image or last.get("edited_image") or last.get("image")


def rows_of(regions: Any) -> list[list]:
    """The regions table's rows (a DataFrame, a list or None), blank rows dropped."""
    rows = regions.values.tolist() if hasattr(regions, "values") else list(regions or [])
    return [list(r) for r in rows if any(str(c).strip() for c in r)]


def regions_from_proposal(v: Any) -> list[list]:
    """A plan pause's box edits, as the person's table to keep, move, resize or delete."""
    if not v.pause or v.pause["pause"] != "plan":
        return []
    return [[*r["box"], r["prompt"], r["strength"]] for r in v.pause["proposal"]["regional_edits"]]


def compared(v: Any, iteration: int | None) -> tuple[str, str] | None:
    """(before, after) image hashes of `iteration` (None: the latest with an edit; at a
    pause past the finished ones, the pause's own edit); None when it made no edit."""
    pairs = {
        s["iteration"]: (s["image"], s["edited_image"]) for s in v.steps if s.get("edited_image")
    }
    if v.pause and v.pause.get("edited_image") and v.iteration not in pairs:
        pairs[v.iteration] = (v.pause["image"], v.pause["edited_image"])
    if iteration is None:
        return pairs[max(pairs)] if pairs else None
    return pairs.get(iteration)


def answer_from(
    action: str,
    point: str,
    prompt: str,
    negative: str,
    seed: Any,
    steps: Any,
    guidance: Any,
    regions: Any,
) -> dict:
    """The HumanAction fields from the pause panel's inputs (checked by the graph's rules)."""
    if action != "edit":
        return {"action": action}
    if point == "prompt":
        params = {
            k: v
            for k, v in (
                ("seed", seed),
                ("num_inference_steps", steps),
                ("guidance_scale", guidance),
            )
            if v not in (None, "")
        }
        params = {k: (float(v) if k == "guidance_scale" else int(v)) for k, v in params.items()}
        return {"action": "edit", "prompt": prompt, "negative_prompt": negative, "params": params}
    try:
        boxes = [
            {
                "box": [int(float(c)) for c in r[:4]],
                "prompt": str(r[4]),
                "strength": float(r[5] or 0.6),
            }
            for r in rows_of(regions)
        ]
    except (ValueError, IndexError) as e:
        raise HumanActionError(
            f"a box edit row is not x1, y1, x2, y2, prompt, strength: {e}"
        ) from None
    return {"action": "edit", "prompt": prompt, "negative_prompt": negative, "regions": boxes}
