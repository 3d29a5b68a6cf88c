"""The agents' boxes on the image (serve/boxes.py), without a browser: every layer's box placed
where its 0-1000 box says, a layer toggled off not drawn, the person's boxes always there and
editable, keys that match the cards, and the box operations the page sends applied to the
table (tests/test_ui.py drags them in a real browser)."""

from __future__ import annotations

import re

import pytest
from artloop.serve.boxes import (
    agent_boxes,
    apply_op,
    canvas_html,
    iteration_agents,
    region_boxes,
)
from test_ui_cards import AGENTS, session, step

BOXES = {
    "objects": [100, 100, 500, 400],
    "artifacts": [550, 50, 950, 450],
    "edits": [200, 550, 800, 950],
}


def agents() -> dict:
    return {
        "data_cot": {"objects": [{"label": "red <b>circle</b>", "box": BOXES["objects"]}]},
        "concept_cot": {
            "artifacts": [
                {"kind": "blur", "box": None, "severity": 1},  # the whole image: not drawn
                {"kind": "omission", "box": BOXES["artifacts"], "severity": 2},
            ]
        },
        "thesis_cot": {"regional_edits": [{"box": BOXES["edits"], "prompt": "a blue square"}]},
    }


def placed(html: str) -> dict[str, list[float]]:
    """Each drawn box's key and its (left, top, width, height) in per cent."""
    found = re.findall(
        r'data-key="([^"]+)"[^>]*style="left:calc\(([\d.]+)% \+ \d+px\);top:calc\(([\d.]+)% '
        r"\+ \d+px\);width:calc\(([\d.]+)% - \d+px\);height:calc\(([\d.]+)%",
        html,
    )
    return {key: [float(v) for v in rest] for key, *rest in found}


def test_agent_boxes_reads_every_layer_with_keys_the_cards_share():
    found = agent_boxes(agents(), iteration=2)
    assert [(b["layer"], b["label"], b["key"]) for b in found] == [
        ("objects", "red <b>circle</b>", "i2-objects-0"),
        ("artifacts", "omission", "i2-artifacts-1"),  # its index in the agent's own list
        ("edits", "a blue square", "i2-edits-0"),
    ]
    assert agent_boxes({}) == [] and len(agent_boxes(AGENTS)) == 3  # the cards' fixture


def test_each_box_is_placed_where_its_box_says_and_labels_are_escaped():
    html = canvas_html("gradio_api/file=/x.png", agent_boxes(agents()))
    assert placed(html) == {
        "i0-objects-0": [10.0, 10.0, 40.0, 30.0],
        "i0-artifacts-1": [55.0, 5.0, 40.0, 40.0],
        "i0-edits-0": [20.0, 55.0, 60.0, 40.0],
    }
    assert 'src="gradio_api/file=/x.png"' in html
    assert "red &lt;b&gt;circle" in html and "<b>circle" not in html
    assert "No image yet" in canvas_html(None, agent_boxes(agents()))


def test_a_layer_toggled_off_is_not_drawn_and_yours_always_is():
    rows = [[10, 20, 300, 400, "a hat", 0.6], ["", "", "", "", "typing", ""]]
    boxes = agent_boxes(agents()) + region_boxes(rows)
    some = placed(canvas_html("a.png", boxes, ["objects", "edits"]))
    assert set(some) == {"i0-objects-0", "i0-edits-0", "yours-0"}
    assert set(placed(canvas_html("a.png", boxes, []))) == {"yours-0"}
    html = canvas_html("a.png", boxes, [])
    assert 'data-index="0"' in html and 'class="del"' in html and 'class="grip"' in html
    # a box being named is drawn dashed, clipped to the image
    pending = canvas_html("a.png", [], [], pending=[-50, 100, 300, 1200])
    assert "bx-pending" in pending and "left:calc(0.00% + 0px)" in pending


def test_box_operations_from_the_page():
    rows = [[10, 20, 300, 400, "a hat", 0.6], [500, 500, 900, 900, "a scarf", 0.5]]
    assert apply_op(rows, {"op": "add", "box": [300, 100, 50, 500]}) == (rows, [50, 100, 300, 500])
    moved, _ = apply_op(rows, {"op": "move", "index": 1, "box": [400, 400, 800, 800.4]})
    assert moved[1] == [400, 400, 800, 800, "a scarf", 0.5] and rows[1][0] == 500  # a copy
    assert apply_op(rows, {"op": "delete", "index": 0}) == ([rows[1]], None)
    for op, message in (
        ({"op": "delete", "index": 5}, "no box edit 5 to delete"),
        ({"op": "move", "index": None, "box": [1, 2, 3, 4]}, "no box edit None"),
        ({"op": "add", "box": [1, 2, 3]}, "four numbers"),
        ({"op": "add", "box": "a"}, "four numbers"),
        ({"op": "add", "box": [100, 100, 105, 400]}, "too small"),
        ({"op": "zoom"}, "unknown box operation 'zoom'"),
    ):
        with pytest.raises(ValueError, match=message):
            apply_op(rows, op)


def test_the_iteration_of_the_shown_image():
    done = step(0) | {"image": "aa", "edited_image": "bb"}
    v = session([done])
    assert iteration_agents(v, "bb") == (0, done["agents"]) and iteration_agents(v, "zz") == (0, {})
    plan = {"regional_edits": [{"box": [1, 2, 300, 400], "prompt": "p"}]}
    paused = session([done], pause={"pause": "plan", "proposal": plan, "image": "cc"}, iteration=1)
    live = {"data_cot": AGENTS["data_cot"], "thesis_cot": plan}
    # the plan's box edits are the person's table at a plan pause: not drawn twice
    assert iteration_agents(paused, "cc", live) == (1, {"data_cot": AGENTS["data_cot"]})
