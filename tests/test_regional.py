"""Regional prompting (tools/regional.py, DiffusionTool.regional) on real tiny pipelines: the
shapes-world SD (fitted, so a local prompt draws something) and the random-weight tiny FLUX,
by both techniques (masked attention, every family's default, and prediction blending); and
the refine loop's `regional` edit mode. Thresholds come from measurement (see each test)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from artloop.config import ConfigError, LoopConfig, load_config
from artloop.graphs.runner import run_session
from artloop.tools.diffusion import BoxError, DiffusionError, DiffusionTool, GenParams, on_step
from artloop.tools.images import ImageStore
from artloop.tools.regional import (
    TECHNIQUE,
    Job,
    Region,
    cross_attention_bias,
    generate,
    joint_attention_mask,
)
from conftest import make_ctx, verdict
from fakes import DEFAULTS, ScriptedChat

PROMPT = "a red circle to the left of a blue square"
BOX = (250, 0, 750, 500)  # the top middle
LOCAL = "a large purple square"
# tiny-shapes-sd draws at 64 px; 10 steps keep each call ~0.25 s on one thread.
STEPS = {"tiny-shapes-sd": 10, "tiny-flux": 4}


@pytest.fixture(scope="module", params=["tiny-shapes-sd", "tiny-flux"])
def tool(request, tmp_path_factory):
    tool = DiffusionTool(model=request.param, store=ImageStore(tmp_path_factory.mktemp("img")))
    tool.setup()
    yield tool
    tool.close()


def params(tool: DiffusionTool, seed: int = 0) -> GenParams:
    return GenParams(64, 64, STEPS[tool.model], 5.0, seed)


def pixels(tool: DiffusionTool, digest: str) -> np.ndarray:
    return np.asarray(tool.store.get(digest), dtype=np.float64)


def inside(box, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    x1, y1, x2, y2 = (round(v * size / 1000) for v in box)
    mask[y1:y2, x1:x2] = True
    return mask


@pytest.mark.parametrize("technique", ["attention", "blend"])
def test_a_local_prompt_changes_its_box_far_more_than_the_rest(tool, technique):
    """Mean abs change (vs the same call without the region) inside the box over outside,
    summed over seeds 0-2. Measured, attention / blend: tiny-shapes-sd 6.0 / 8.6 (per seed
    2.4-13.3 / 5.5-16.5; other boxes and prompts 2.4-4.3 / 3.1-3.4: its denoiser draws the
    whole scene, so the rest re-arranges a little); tiny-flux 228 / > 1000 (other boxes 10-32
    / 12-24; its random transformer barely couples tokens)."""
    box, changed, kept = inside(BOX), 0.0, 0.0
    for seed in range(3):
        p = params(tool, seed)
        plain = pixels(tool, tool.regional(None, PROMPT, "", [], p))
        local = tool.regional(None, PROMPT, "", [(BOX, LOCAL, 1.0)], p, technique=technique)
        diff = np.abs(pixels(tool, local) - plain).mean(axis=-1)
        changed, kept = changed + diff[box].mean(), kept + diff[~box].mean()
    assert changed > {"tiny-shapes-sd": 3.0, "tiny-flux": 20.0}[tool.model] * kept


def test_no_region_is_text_to_image_and_a_seed_replays(tool):
    """Without regions the regional loop is the pipeline's own text-to-image, pixel for
    pixel, by either technique; the same seed gives the same image, another seed another; the
    techniques draw different images; the attention technique's processors are the call's
    only: the UNet's own are back after it, and a plain call draws what it drew before."""
    p = params(tool)
    regions = [(BOX, LOCAL, 0.7), ((0, 500, 400, 1000), "a small green circle", 1.0)]
    plain = tool.text_to_image(PROMPT, "", p)
    net = getattr(tool.pipeline, "unet", None) or tool.pipeline.transformer
    processors = net.attn_processors
    images = {}
    for technique in ("attention", "blend"):
        assert tool.regional(None, PROMPT, "", [], p, technique=technique) == plain
        first = tool.regional(None, PROMPT, "", regions, p, technique=technique)
        assert tool.regional(None, PROMPT, "", regions, p, technique=technique) == first
        assert tool.regional(None, PROMPT, "", regions, params(tool, 1), technique=technique) != (
            first
        )
        images[technique] = first
    assert images["attention"] != images["blend"]
    assert tool.regional(None, PROMPT, "", regions, p) == images[TECHNIQUE[tool.family]]
    after = net.attn_processors
    assert after.keys() == processors.keys()
    assert all(after[name] is processors[name] for name in processors)
    assert tool.text_to_image(PROMPT, "", p) == plain


@pytest.mark.parametrize(
    ("model", "true_cfg"), [("tiny-sdxl", 1.0), ("tiny-flux", 2.0), ("tiny-sd", 1.0)]
)
def test_each_familys_conditioning_matches_its_pipeline(model, true_cfg, tmp_path):
    """SDXL's pooled embedding and size ids, FLUX's true CFG and SD's negative prompt: without
    regions the regional loop draws the pipeline's image (a fresh tool: its first call)."""
    tool = DiffusionTool(model=model, store=ImageStore(tmp_path))
    p = GenParams(64, 64, 2, 5.0, 3, true_cfg_scale=true_cfg)
    assert tool.regional(None, PROMPT, "blur", [], p) == tool.text_to_image(PROMPT, "blur", p)


@pytest.mark.parametrize("technique", ["attention", "blend"])
def test_batched_calls_equal_unbatched_ones(tool, technique):
    """Two concurrent calls share one denoiser pass per step (the tool's batching) and get
    the images each would get alone (attention: each row its own boxes' mask); each caller is
    told of every step."""
    regions = [[(BOX, LOCAL, 1.0)], [((0, 0, 500, 1000), "a large green triangle", 0.8)]]
    alone = [
        pixels(tool, tool.regional(None, PROMPT, "", r, params(tool, i), technique=technique))
        for i, r in enumerate(regions)
    ]
    tool.set_batching(500)
    together: list = [None, None]
    steps: list[list] = [[], []]

    def call(i: int) -> None:
        on_step.set(lambda s, n: steps[i].append((s, n)))
        together[i] = tool.regional(
            None, PROMPT, "", regions[i], params(tool, i), technique=technique
        )

    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert tool.batch_sizes == [2]
    finally:
        tool.set_batching(0)
    n = STEPS[tool.model]
    assert steps == [[(s, n) for s in range(1, n + 1)]] * 2
    for a, b in zip(alone, together, strict=True):
        assert np.abs(a - pixels(tool, b)).max() <= 2  # float batching noise, in 0-255


def test_attention_weights_a_region_by_its_strength(tool):
    """The attention technique's log(strength) bias on the local tokens: a weaker region
    changes its box less. Mean abs change inside the box, seeds 0-2, measured at strengths
    0.1 / 0.3 / 0.6 / 1: tiny-shapes-sd 3.1 / 6.8 / 9.4 / 11.4, tiny-flux 0.10 / 0.20 / 0.36
    / 0.53."""
    box, change = inside(BOX), {0.1: 0.0, 1.0: 0.0}
    for seed in range(3):
        p = params(tool, seed)
        plain = pixels(tool, tool.regional(None, PROMPT, "", [], p))
        for strength in change:
            out = tool.regional(None, PROMPT, "", [(BOX, LOCAL, strength)], p)
            change[strength] += np.abs(pixels(tool, out) - plain).mean(axis=-1)[box].mean()
    assert change[1.0] > 2.0 * change[0.1] > 0


@pytest.mark.parametrize(
    ("model", "true_cfg"), [("tiny-sdxl", 1.0), ("tiny-flux", 2.0), ("tiny-sd", 1.0)]
)
def test_attention_runs_for_each_family_with_its_guidance(model, true_cfg, tmp_path):
    """SDXL (pooled embedding and size ids), FLUX with true CFG and SD, each with a negative
    prompt (the uncond row's text padded and masked to the joint text's length), at an odd,
    non-square size (latents 9 x 13: the UNet's coarser levels 5 x 7 and 3 x 4, rounded up):
    the regions change the image, a seed replays, the UNet's processors are back after it."""
    tool = DiffusionTool(model=model, store=ImageStore(tmp_path))
    p = GenParams(72, 104, 2, 5.0, 3, true_cfg_scale=true_cfg)
    net = getattr(tool.pipeline, "unet", None) or tool.pipeline.transformer
    processors = net.attn_processors
    plain = tool.text_to_image(PROMPT, "blur", p)
    regions = [(BOX, LOCAL, 1.0), ((0, 400, 600, 1000), "a small green circle", 0.5)]
    for k in (1, 2):
        out = tool.regional(None, PROMPT, "blur", regions[:k], p, technique="attention")
        assert out != plain
        assert tool.regional(None, PROMPT, "blur", regions[:k], p) == out
        assert np.isfinite(pixels(tool, out)).all()
    assert all(net.attn_processors[name] is processors[name] for name in processors)
    assert tool.text_to_image(PROMPT, "blur", p) == plain


def test_the_attention_masks():
    """A job with a box over the grid's top-left 2 x 2 cells of 4 x 4 and strength 0.5, one
    with a box over the right half: spans 3 (global) and 2 (local). UNet cross-attention: the
    global tokens open to every query, the local ones to the box's queries at log(0.5). FLUX joint attention (text, then 16 image tokens):
    local text sees itself and its box, the global text itself and the image, never each
    other."""
    import torch

    jobs = [
        Job("g", None, 0, (Region((0, 0, 500, 500), "l", 0.5),)),
        Job("g", None, 0, (Region((500, 0, 1000, 1000), "l", 1.0),)),
    ]
    like = torch.empty(0)
    bias = cross_attention_bias(jobs, [3, 2], 4, 4, like)
    assert bias.shape == (2, 1, 16, 5)
    box = torch.zeros(4, 4, dtype=torch.bool)
    box[:2, :2] = True
    box = box.flatten()
    cond = bias[0, 0]
    assert (cond[:, :3] == 0).all()
    assert torch.allclose(cond[box, 3:], torch.tensor(np.log(0.5), dtype=torch.float32))
    assert torch.isneginf(cond[~box, 3:]).all()
    right = torch.zeros(4, 4, dtype=torch.bool)
    right[:, 2:] = True
    assert (bias[1, 0, right.flatten(), 3:] == 0).all()
    assert torch.isneginf(bias[1, 0, ~right.flatten(), 3:]).all()

    mask = joint_attention_mask(jobs, [3, 2], 4, 4, False, like)[0, 0]  # (21, 21)
    seen = ~torch.isneginf(mask)
    image = slice(5, 21)
    assert seen[:3, :3].all() and seen[:3, image].all() and not seen[:3, 3:5].any()
    assert seen[3:5, 3:5].all() and not seen[3:5, :3].any()
    assert (seen[3:5, image] == box).all()
    assert seen[image, :3].all() and seen[image, image].all()
    assert (seen[image, 3:5] == box[:, None]).all()
    assert torch.allclose(mask[image][box, 3:5], torch.tensor(np.log(0.5), dtype=torch.float32))


@pytest.mark.parametrize("technique", ["attention", "blend"])
def test_img2img_redraws_the_boxes_and_keeps_the_rest(tool, technique):
    """From an image: the boxes change, the rest is the init's. The loop itself (before the
    tool pastes the init back outside the boxes) holds the cells outside at the init's
    latents: away from the box, its image is the init through the VAE and back."""
    p = params(tool)
    init = tool.text_to_image(PROMPT, "", p)
    box = inside(BOX)
    out = tool.regional(init, PROMPT, "", [(BOX, LOCAL, 0.8)], p, 0.8, technique=technique)
    out = pixels(tool, out)
    diff = np.abs(out - pixels(tool, init)).mean(axis=-1)
    assert diff[box].mean() > 1.0
    assert diff[~inside((200, 0, 800, 550))].max() == 0  # beyond the paste's soft edge
    job = Job(PROMPT, None, 0, (Region(BOX, LOCAL, 0.8),), tool.store.get(init))
    raw = generate(
        tool.pipeline,
        tool.family,
        [job],
        width=64,
        height=64,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=5.0,
        strength=0.8,
        max_sequence_length=tool.max_sequence_length,
        technique=technique,
    )[0]
    # The decoder spreads the box's latents ~20 px around it: away from the box the change is
    # small (measured mean: tiny-shapes-sd 1.1/255 against 25/255 inside, tiny-flux ~0).
    diff = np.abs(raw - round_trip(tool, init)).max(axis=-1)
    assert diff[~inside((100, 0, 900, 750))].mean() < 0.15 * diff[box].mean()


def round_trip(tool: DiffusionTool, digest: str) -> np.ndarray:
    """The stored image through the VAE and back: what latents held at the init decode to."""
    import torch

    vae, processor = tool.pipeline.vae, tool.pipeline.image_processor
    with torch.no_grad():
        x = processor.preprocess(tool.store.get(digest), 64, 64)
        out = vae.decode(vae.encode(x).latent_dist.mean).sample
    return processor.postprocess(out, output_type="np")[0]


def test_bad_regions_are_one_line_errors(tool):
    p = params(tool)
    init = tool.text_to_image(PROMPT, "", p)
    cases = [
        ([((0, 0, 1200, 500), LOCAL, 1.0)], BoxError, "outside 0-1000"),
        ([(BOX, " ", 1.0)], DiffusionError, "local prompt is empty"),
        ([(BOX, LOCAL, 0.0)], DiffusionError, "outside (0, 1]"),
        ([BOX], DiffusionError, "a region is (box, prompt, strength)"),
    ]
    for regions, error, message in cases:
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            tool.regional(None, PROMPT, "", regions, p)
        assert "\n" not in str(e.value)
    with pytest.raises(DiffusionError, match="regional technique 'paint' is not one of"):
        tool.regional(None, PROMPT, "", [(BOX, LOCAL, 1.0)], p, technique="paint")
    with pytest.raises(DiffusionError, match="needs at least one region"):
        tool.regional(init, PROMPT, "", [], p, 0.5)
    with pytest.raises(DiffusionError, match="leaves no denoising step"):
        tool.regional(init, PROMPT, "", [(BOX, LOCAL, 1.0)], GenParams(64, 64, 2), 0.3)


# --- the loop: edit_modes = ["regional"] ----------------------------------------------------


def test_regional_is_an_edit_mode_alternative_to_inpaint():
    assert LoopConfig(edit_modes=["tone", "regional", "img2img"]).edit_modes == [
        "img2img",
        "regional",
        "tone",
    ]
    assert "regional" not in LoopConfig().edit_modes  # the default stays inpaint
    with pytest.raises(ConfigError, match="inpaint and regional both apply") as e:
        load_config(overrides={"loop.edit_modes": ["regional", "inpaint"]})
    assert "\n" not in str(e.value)


def plan(*regions: tuple) -> dict:
    edits = [{"box": list(b), "prompt": p, "strength": s} for b, p, s in regions]
    return {**DEFAULTS["EditPlan"], "regional_edits": edits}


def test_the_edit_node_applies_all_box_edits_in_one_regional_call(store, sd_tool):
    """Several box edits: one regional op, no inpainting. The regions accumulate: iteration
    1 keeps iteration 0's regions but one, which a new box overlapping it (IoU > 0.5)
    replaces; iteration 1 is rejected, so iteration 2 applies iteration 0's again, with its
    own."""
    a, b = ((0, 0, 400, 400), "a red circle", 0.6), ((600, 600, 1000, 1000), "a blue square", 0.8)
    a2, c = ((0, 0, 420, 400), "a green circle", 0.5), ((0, 600, 300, 1000), "a triangle", 0.4)
    chat = ScriptedChat(
        scripts={
            "EditPlan": [plan(a, b), plan(a2), plan(c)],
            "Verdict": [verdict("revise", 4.0), verdict("reject", 3.0), verdict("revise", 5.0)],
        }
    )
    inpaint = sd_tool.inpaint
    sd_tool.inpaint = None  # never called in this mode
    try:
        ctx = make_ctx(
            store, sd_tool, chat, max_iters=3, plateau_patience=5, edit_modes=["regional", "tone"]
        )
        steps = store.get_run(run_session(ctx, prompt="a fox").run_id)["steps"]
    finally:
        sd_tool.inpaint = inpaint
    ops = [[e for e in s["edits"] if e["op"] != "tone"] for s in steps]
    assert all(len(o) == 1 and o[0]["op"] == "regional" for o in ops)

    def boxes(op: dict) -> list:
        return [(r["box"], r["iteration"]) for r in op["regions"]]

    assert boxes(ops[0][0]) == [(list(a[0]), 0), (list(b[0]), 0)]
    assert ops[0][0]["strength"] == 0.8 and ops[0][0]["image"] == steps[0]["edited_image"]
    assert boxes(ops[1][0]) == [(list(b[0]), 0), (list(a2[0]), 1)]
    assert boxes(ops[2][0]) == [(list(a[0]), 0), (list(b[0]), 0), (list(c[0]), 2)]
    assert ops[2][0]["steps"] == 3  # enough that the weakest region (0.4) gets a step
