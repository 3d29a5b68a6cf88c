"""The diffusion tool against the real tiny SD, SDXL and FLUX pipelines (random weights, CPU)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from artloop.tools.diffusion import DiffusionError, DiffusionTool, GenParams, box_mask
from artloop.tools.images import ImageStore

SMALL = GenParams(width=128, height=128, num_inference_steps=4, seed=1)
BASE = ("a red cat on a sofa", "blurry", SMALL)  # prompt, negative prompt, params
UNET_MODELS = {"tiny-sd": "sd", "tiny-sdxl": "sdxl"}  # model -> its tool fixture and family


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain little from a second thread, and with another busy process on this
    2-core machine two spinning torch threads ran these tests ~8x slower (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ImageStore:
    return ImageStore(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def sd(store) -> DiffusionTool:
    return DiffusionTool("tiny-sd", store)


@pytest.fixture(scope="module")
def sdxl(store) -> DiffusionTool:
    return DiffusionTool("tiny-sdxl", store)


@pytest.fixture(scope="module")
def flux(store) -> DiffusionTool:
    return DiffusionTool("tiny-flux", store)


@pytest.fixture(scope="module")
def base(sd) -> str:
    return sd.text_to_image(*BASE)


@pytest.fixture(scope="module", params=list(UNET_MODELS))
def unet(request) -> tuple[DiffusionTool, str]:
    """Each UNet family's tool (the `sd` / `sdxl` fixture) and its image of BASE."""
    tool = request.getfixturevalue(UNET_MODELS[request.param])
    return tool, tool.text_to_image(*BASE)


def pixels(store: ImageStore, digest: str) -> np.ndarray:
    return np.asarray(store.get(digest), dtype=np.int16)


@pytest.mark.parametrize(("model", "family"), UNET_MODELS.items())
def test_construction_loads_nothing(store, model, family):
    tool = DiffusionTool(model, store)
    assert tool._pipe is None
    ident = tool.identity  # reads model_index.json only
    assert ident["model"] == model and ident["family"] == family and ident["dtype"] == "float32"
    assert tool._pipe is None
    json.dumps(ident)


def test_params_are_json_serialisable():
    assert json.loads(json.dumps(asdict(SMALL)))["width"] == 128


def test_text_to_image_size_and_determinism(unet, store):
    tool, base = unet
    assert len(base) == 64 and base in store
    assert store.get(base).size == (128, 128)
    assert tool._pipe is not None
    again = tool.text_to_image(*BASE)
    assert again == base
    other_seed = tool.text_to_image("a red cat on a sofa", "blurry", GenParams(128, 128, seed=2))
    assert other_seed != base
    image = store.get(base)
    assert np.asarray(image).std() > 0


def test_size_is_rounded_to_the_latent_grid(sd, flux, store):
    h = sd.text_to_image("a house", "", GenParams(width=100, height=67, num_inference_steps=1))
    assert store.get(h).size == (104, 64)
    h = flux.text_to_image("a house", "", GenParams(width=100, height=90, num_inference_steps=1))
    assert store.get(h).size == (96, 96)


def test_image_to_image_changes_the_image(unet, store):
    tool, base = unet
    params = GenParams(width=128, height=128, seed=3)
    out = tool.image_to_image(base, "a blue dog", "", params, strength=0.75)
    assert out != base
    assert store.get(out).size == (128, 128)
    assert tool.image_to_image(base, "a blue dog", "", params, strength=0.75) == out
    # img2img and inpaint reuse the text-to-image weights, in the family's own pipelines
    assert tool._pipes["i2i"].unet is tool._pipe.unet
    xl = tool.family == "sdxl"
    assert type(tool._pipes["i2i"]).__name__.startswith("StableDiffusionXL") == xl


def test_inpaint_changes_only_the_box(unet, store):
    tool, base = unet
    box = (250, 250, 750, 750)  # the central 64x64 of 128x128
    out = tool.inpaint(base, box, "a green bird", "", GenParams(128, 128, seed=4), strength=1.0)
    assert out != base and store.get(out).size == (128, 128)
    before, after = pixels(store, base), pixels(store, out)
    changed = np.abs(before - after).sum(axis=2) > 0
    assert changed[40:88, 40:88].mean() > 0.9
    # Outside the box (beyond the soft edge) the original pixels are pasted back.
    outside = np.ones_like(changed)
    outside[24:104, 24:104] = False
    assert not changed[outside].any()


def test_flux_text_to_image(flux, store):
    assert flux.identity["family"] == "flux"
    params = GenParams(width=128, height=64, seed=5)
    h = flux.text_to_image("a lighthouse at dusk", "", params)
    assert store.get(h).size == (128, 64)
    assert flux.text_to_image("a lighthouse at dusk", "", params) == h
    # The negative prompt takes effect through true CFG only.
    ignored = flux.text_to_image("a lighthouse at dusk", "fog", params)
    assert ignored == h
    cfg = GenParams(width=128, height=64, seed=5, true_cfg_scale=4.0)
    assert flux.text_to_image("a lighthouse at dusk", "fog", cfg) != h


def test_flux_image_to_image_and_inpaint(flux, store):
    params = GenParams(width=128, height=128, seed=6)
    h = flux.text_to_image("a lighthouse", "", params)
    i2i = flux.image_to_image(h, "a tower", "", params, strength=0.8)
    inp = flux.inpaint(h, (0, 0, 500, 500), "a boat", "", params, strength=0.9)
    assert len({h, i2i, inp}) == 3
    assert store.get(inp).size == store.get(i2i).size == (128, 128)


@pytest.mark.parametrize(
    "box",
    [(0, 0, 1001, 500), (-1, 0, 10, 10), (500, 0, 400, 100), (0, 300, 100, 300), (1, 2, 3)],
)
def test_bad_box(sd, base, box):
    with pytest.raises(DiffusionError, match="box"):
        sd.inpaint(base, box, "x", "", SMALL, strength=0.5)


@pytest.mark.parametrize(("width", "height", "name"), [(32, 128, "width"), (128, 4096, "height")])
def test_bad_size(sd, width, height, name):
    with pytest.raises(DiffusionError, match=name):
        sd.text_to_image("x", "", GenParams(width=width, height=height))


def test_bad_strength(sd, base):
    with pytest.raises(DiffusionError, match="strength"):
        sd.image_to_image(base, "x", "", SMALL, strength=0.1)  # int(4 * 0.1) == 0 steps
    with pytest.raises(DiffusionError, match="strength"):
        sd.image_to_image(base, "x", "", SMALL, strength=1.5)


def test_unknown_image(sd):
    with pytest.raises(DiffusionError, match="input image"):
        sd.image_to_image("0" * 64, "x", "", SMALL, strength=0.5)
    with pytest.raises(DiffusionError, match="not an image hash"):
        sd.inpaint("nope", (0, 0, 10, 10), "x", "", SMALL, strength=0.5)


def test_unknown_model(store):
    tool = DiffusionTool("no-such-model", store)
    with pytest.raises(DiffusionError, match="no-such-model"):
        tool.text_to_image("x", "", SMALL)


def test_model_that_fails_to_load(store, tmp_path):
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline"})
    )
    tool = DiffusionTool(str(tmp_path), store)
    with pytest.raises(DiffusionError, match="cannot load diffusion model") as info:
        tool.setup()
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_unsupported_pipeline(store, tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(DiffusionError, match="KandinskyPipeline"):
        DiffusionTool(str(tmp_path), store).identity  # noqa: B018


def test_box_mask():
    mask = np.asarray(box_mask((0, 0, 500, 250), 200, 100))
    assert mask.shape == (100, 200)
    assert (mask[:25, :100] == 255).all()
    assert mask.sum() == 255 * 25 * 100
    assert np.asarray(box_mask((0, 0, 1000, 1000), 64, 64)).min() == 255
    with pytest.raises(DiffusionError, match="box"):
        box_mask((10, 10, 5, 20), 64, 64)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])
def test_tiny_vae_keeps_colours(model, store):
    """The hand-set tiny VAE is a faithful 8x autoencoder: an image made of 8x8 blocks of
    colour comes back to within 1e-4, and its brightness with it (a random VAE decoded every
    input to ~0.46 brightness, so no image statistic could be learnt)."""
    import torch

    vae = DiffusionTool(model, store=store).pipeline.vae
    blocks = torch.rand((2, 3, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    image = torch.nn.functional.interpolate(blocks, scale_factor=8)  # (2, 3, 64, 64)
    with torch.no_grad():
        back = vae.decode(vae.encode(image).latent_dist.sample()).sample
        dark = vae.decode(vae.encode(image * 0.5 - 0.5).latent_dist.mode()).sample
    assert torch.allclose(back, image, atol=1e-4)
    assert (dark.mean() - (image.mean() * 0.5 - 0.5)).abs() < 1e-4
