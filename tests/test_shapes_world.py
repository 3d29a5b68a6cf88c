"""The shapes world: captions that parse back to their spec, splits by combination, the detector
and the `shapes` scorer on constructed images whose answers are known."""

from __future__ import annotations

from itertools import combinations
from random import Random

import numpy as np
import pytest
from artloop.rewards import get_reward, judge_reward, reward_entry
from artloop.world import (
    COLOURS,
    SHAPES,
    SPLITS,
    Obj,
    Phrase,
    Spec,
    detect,
    parse,
    render,
    sample_scenes,
    score_image,
    split_of,
)
from artloop.world.scenes import pair_split
from PIL import Image, ImageFilter


def obj(shape, colour, x, y, size="small"):
    return Obj(shape, colour, size, x, y, 0.21 if size == "small" else 0.36)


def unmet(image, prompt):
    return [(r.kind, r.asked) for r in score_image(image, prompt).unmet()]


# --- the language ---------------------------------------------------------------------------------
def test_every_caption_parses_back_to_its_spec_and_its_render_scores_one():
    """300 scenes of each split, captions with synonyms and prefixes: the parse is the spec the
    caption was written from, and the scene's own rendering meets every requirement."""
    n = 0
    for split in SPLITS:
        for scene in sample_scenes(split, 300, seed=7):
            caption = scene.caption(Random(n))
            n += 1
            assert parse(caption) == scene.spec, caption
            report = score_image(render(scene), caption)
            assert report.score == 1.0, (caption, report.unmet(), report.detections)


def test_parse_reads_the_caption_inside_an_enhanced_prompt():
    spec = parse(
        "A flat illustration: the big red circle to the left of two blue squares, "
        "plain grey background, sharp edges"
    )
    assert spec == Spec(
        (Phrase("circle", "red", 1, "large"), Phrase("square", "blue", 2)),
        ((0, "left of", 1),),
    )
    assert parse("a green triangle at the bottom").positions == ((0, "bottom"),)
    assert parse("three yellow squares and a circle").phrases == (
        Phrase("square", "yellow", 3),
        Phrase("circle", None, 1),
    )


def test_a_prompt_with_no_shape_is_refused_in_one_line():
    with pytest.raises(ValueError, match="names no shape of the shapes world") as e:
        parse("a cat on a sofa, golden hour")
    assert "\n" not in str(e.value)


# --- splits ---------------------------------------------------------------------------------------
def test_held_out_pairs_never_appear_together_in_training():
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    heldout = {frozenset(p) for p in combinations(kinds, 2) if pair_split(*p) == "heldout"}
    assert 0.08 < len(heldout) / len(list(combinations(kinds, 2))) < 0.25
    train = sample_scenes("train", 400, seed=1)
    held = sample_scenes("heldout", 100, seed=1)
    pairs = lambda s: {frozenset(p) for p in combinations({o.kind for o in s.objects}, 2)}  # noqa: E731
    assert not any(pairs(s) & heldout for s in train)
    assert all(pairs(s) & heldout for s in held)
    assert all(split_of(s.objects) == "heldout" for s in held)
    # Every kind alone is in training: only the combinations are new.
    assert {o.kind for s in train for o in s.objects} == set(kinds)


def test_scenes_are_the_same_for_the_same_seed():
    assert sample_scenes("val", 20, seed=3) == sample_scenes("val", 20, seed=3)
    assert sample_scenes("val", 20, seed=3) != sample_scenes("val", 20, seed=4)


# --- the detector and the score on images with known answers --------------------------------------
def test_the_detector_finds_each_shape_its_colour_size_and_box():
    objects = [
        obj("circle", "red", 0.25, 0.25),
        obj("square", "blue", 0.7, 0.3, "large"),
        obj("triangle", "yellow", 0.3, 0.75),
        obj("square", "purple", 0.75, 0.78),
    ]
    found = detect(render(objects))
    assert sorted((d.shape, d.colour, d.size) for d in found) == sorted(
        (o.shape, o.colour, o.size) for o in objects
    )
    for o in objects:
        d = next(d for d in found if d.colour == o.colour)
        # Within 2 px: a triangle's tip, a pixel wide, is lost to the opening.
        assert np.allclose(d.box, o.box(), atol=2 / 64), (d.box, o.box())
    assert detect(Image.new("RGB", (64, 64), (238, 238, 238))) == []


@pytest.mark.parametrize(
    ("objects", "prompt", "expected"),
    [
        # The circle drawn right of the square: both objects there, the relation not.
        (
            [obj("circle", "red", 0.75, 0.5), obj("square", "blue", 0.25, 0.5)],
            "a red circle to the left of a blue square",
            [("relation", "a red circle left of a blue square")],
        ),
        # A green circle where a red one is asked: that object, and its relation, fail.
        (
            [obj("circle", "green", 0.25, 0.5), obj("square", "blue", 0.75, 0.5)],
            "a red circle to the left of a blue square",
            [("object", "a red circle"), ("relation", "a red circle left of a blue square")],
        ),
        # Three red circles for two: present, miscounted.
        (
            [obj("circle", "red", x, 0.5) for x in (0.2, 0.5, 0.8)],
            "two red circles",
            [("count", "two red circles")],
        ),
        # A small square where a large one is asked.
        (
            [obj("square", "blue", 0.5, 0.5)],
            "a large blue square",
            [("size", "a large blue square")],
        ),
        # On the right where the left is asked.
        (
            [obj("triangle", "orange", 0.8, 0.5)],
            "an orange triangle on the left",
            [("position", "an orange triangle at the left")],
        ),
        # Above, as asked, and a square for the triangle asked below it.
        (
            [obj("circle", "purple", 0.5, 0.25), obj("square", "yellow", 0.5, 0.75)],
            "a purple circle above a yellow triangle",
            [
                ("object", "a yellow triangle"),
                ("relation", "a purple circle above a yellow triangle"),
            ],
        ),
    ],
)
def test_the_score_names_each_unmet_requirement(objects, prompt, expected):
    image = render(objects)
    assert unmet(image, prompt) == expected
    report = score_image(image, prompt)
    assert report.score == pytest.approx(1 - len(expected) / len(report.requirements))


def test_blank_and_noise_images_score_low():
    prompt = "a red circle to the left of a blue square"
    assert score_image(Image.new("RGB", (64, 64), (238, 238, 238)), prompt).score == 0.0
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert score_image(Image.fromarray(noise), prompt).score < 0.5


def test_the_score_survives_a_slight_blur_and_a_larger_image():
    """What a trained model's samples look like: softer edges, any resolution."""
    for scene in sample_scenes("val", 40, seed=5):
        assert (
            score_image(render(scene).filter(ImageFilter.GaussianBlur(0.7)), scene.caption()).score
            == 1.0
        )
        assert score_image(render(scene, size=160), scene.caption()).score == 1.0


# --- the scorer in the registry -------------------------------------------------------------------
def test_the_shapes_scorer_is_registered_with_its_range_and_reports():
    entry = reward_entry("shapes")
    assert entry.range == (0.0, 1.0) and entry.higher_is_better
    assert entry.identity()["model"]["id"] == "artloop-shapes-detector"
    assert judge_reward("shapes") is entry
    good = render([obj("circle", "red", 0.25, 0.5), obj("square", "blue", 0.75, 0.5)])
    bad = render([obj("circle", "red", 0.75, 0.5), obj("square", "blue", 0.25, 0.5)])
    prompt = "a red circle to the left of a blue square"
    scores, info = get_reward("shapes")([good, bad], [prompt, prompt], [{}, {}])
    assert scores.tolist() == [1.0, pytest.approx(2 / 3)]
    assert [r["met"] for r in info["reports"][1]["requirements"]] == [True, True, False]
    # metadata's caption is the one scored (the loop's revised prompt is not the ground truth).
    scores, _ = get_reward("shapes")([bad], ["a red circle, vivid"], [{"caption": prompt}])
    assert scores.tolist() == [pytest.approx(2 / 3)]
