"""The agents' boxes on the image (serve/boxes.py), without a browser: each layer in its own
colour inside its scaled box and nowhere else, a layer toggled off not drawn, small images
upscaled, whole-image artifacts skipped."""

from __future__ import annotations

import numpy as np
from artloop.serve.boxes import LAYERS, agent_boxes, draw_boxes, iteration_agents, render
from artloop.serve.ui import box_from_clicks
from PIL import Image
from test_ui_cards import AGENTS, session, step

BOXES = {
    "objects": [100, 100, 500, 400],
    "artifacts": [550, 50, 950, 450],
    "edits": [200, 550, 800, 950],
}


def agents() -> dict:
    return {
        "data_cot": {"objects": [{"label": "red circle", "box": BOXES["objects"]}]},
        "concept_cot": {
            "artifacts": [
                {"kind": "omission", "box": BOXES["artifacts"], "severity": 2},
                {"kind": "blur", "box": None, "severity": 1},  # the whole image: not drawn
            ]
        },
        "thesis_cot": {"regional_edits": [{"box": BOXES["edits"], "prompt": "a blue square"}]},
    }


def mask(image: Image.Image, layer: str) -> np.ndarray:
    return (np.asarray(image) == np.array(LAYERS[layer][0], dtype=np.uint8)).all(axis=-1)


def inside(shape: tuple[int, int], box: list[int]) -> np.ndarray:
    h, w = shape
    x1, y1, x2, y2 = box
    m = np.zeros(shape, dtype=bool)
    m[round(y1 * h / 1000) : round(y2 * h / 1000), round(x1 * w / 1000) : round(x2 * w / 1000)] = (
        True
    )
    return m


def test_agent_boxes_reads_every_layer_and_skips_whole_image_ones():
    found = agent_boxes(agents())
    assert [(b["layer"], b["label"]) for b in found] == [
        ("objects", "red circle"),
        ("artifacts", "omission"),
        ("edits", "a blue square"),
    ]
    assert agent_boxes({}) == [] and len(agent_boxes(AGENTS)) == 3  # the cards' fixture


def test_each_layer_in_its_colour_inside_its_box_only():
    white = Image.new("RGB", (64, 48), (255, 255, 255))  # the shapes world is this small
    out = render(white, agent_boxes(agents()))
    assert out.size == (384, 288)  # upscaled by a whole factor, nearest neighbour
    for layer, box in BOXES.items():
        m = mask(out, layer)
        assert m.sum() > 200, layer  # the outline and its label
        assert not (m & ~inside(m.shape, box)).any(), layer  # nothing outside its box
        # the outline runs along the box's edges
        h, w = m.shape
        top, middle = round(box[1] * h / 1000), (box[0] + box[2]) * w // 2000
        assert m[top : top + 8, middle].any(), layer  # nested a line inward per layer
    # the labels are drawn (white text on the layer's colour), not just outlines
    bare = render(white, [{"layer": "objects", "box": BOXES["objects"], "label": ""}])
    assert mask(out, "objects").sum() > mask(bare, "objects").sum() + 200


def test_a_layer_toggled_off_is_not_drawn(tmp_path):
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    out = render(white, agent_boxes(agents()), layers=["objects", "edits"])
    assert mask(out, "objects").any() and mask(out, "edits").any()
    assert not mask(out, "artifacts").any()
    assert not any(mask(render(white, agent_boxes(agents()), layers=[]), k).any() for k in BOXES)
    # on disk: one file per choice of layers, the stored image untouched
    path = tmp_path / "a.png"
    white.save(path)
    all_on = draw_boxes(str(path), agent_boxes(agents()), tmp_path)
    some = draw_boxes(str(path), agent_boxes(agents()), tmp_path, ["objects"])
    assert all_on != some and Image.open(path).size == (64, 64)
    assert mask(Image.open(some), "objects").any() and not mask(Image.open(some), "edits").any()


def test_large_images_are_not_upscaled_and_clicks_map_back():
    out = render(Image.new("RGB", (1024, 512), (255, 255, 255)), [])
    assert out.size == (1024, 512)
    # a click on the shown (upscaled) image is normalised by the shown size
    assert box_from_clicks((96, 48), (288, 240), (384, 288)) == [250, 167, 750, 833]


def test_the_iteration_of_the_shown_image():
    done = step(0) | {"image": "aa", "edited_image": "bb"}
    v = session([done])
    assert iteration_agents(v, "bb") is done["agents"] and iteration_agents(v, "zz") == {}
    plan = {"regional_edits": [{"box": [1, 2, 300, 400], "prompt": "p"}]}
    paused = session([done], pause={"pause": "plan", "proposal": plan, "image": "cc"})
    live = {"data_cot": AGENTS["data_cot"]}
    assert iteration_agents(paused, "cc", live) == {
        "data_cot": AGENTS["data_cot"],
        "thesis_cot": plan,
    }
