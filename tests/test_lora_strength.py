"""A LoRA trained at alpha != rank loads at the strength it was trained at (its adapter config
travels in the file's metadata), in each family, in `artloop eval`, as a preset and in the loop
(`diffusion.lora`); a LoRA saved before that (no metadata) still loads, at its trained strength
when its train_summary.json is beside it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from artloop.trainers import sft
from artloop.trainers.common import LORA_FILE, load_base
from artloop.trainers.evaluate import EvalConfig, evaluate
from artloop.trainers.sft import SFTConfig, train_sft
from safetensors import safe_open
from safetensors.torch import load_file, save_file

RANK, ALPHA = 4, 16.0  # scale 4: a power of two, so alpha-scaling and scaled weights agree exactly


def image(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe(
        "a red fox", num_inference_steps=2, height=64, width=64, generator=g, output_type="np"
    ).images[0]


def train(data, out, model="tiny-sd", **kw) -> SFTConfig:
    cfg = SFTConfig(
        data=str(data),
        output_dir=str(out),
        model=model,
        resolution=64,
        rank=RANK,
        lora_alpha=ALPHA,
        train_steps=3,
        learning_rate=1e-2,
        **kw,
    )
    train_sft(cfg, progress=False)
    return cfg


def without_metadata(lora, out, scale: float = 1.0, summary: bool = False):
    """The LoRA as the old code saved it (tensors, no adapter config), its up-projections times
    `scale`; with its train_summary.json beside it when `summary`."""
    out.mkdir()
    tensors = {
        k: v * scale if "lora_B" in k or "lora.up" in k else v
        for k, v in load_file(lora / LORA_FILE).items()
    }
    save_file(tensors, out / LORA_FILE)
    if summary:
        shutil.copy(lora / "train_summary.json", out)
    return out


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl", "tiny-flux"])
def test_loaded_lora_draws_what_the_trained_adapter_drew(model, sft_data, tmp_path, monkeypatch):
    trained = {}

    def keep(cfg):  # the real base, kept to draw with the adapter as training left it
        trained["family"] = load_base(cfg)
        return trained["family"]

    monkeypatch.setattr(sft, "load_base", keep)
    cfg = train(sft_data, tmp_path / "lora", model)
    family = trained["family"]
    family.denoiser.eval()
    expected = image(family.pipe)
    pipe = load_base(cfg).pipe  # a fresh base; diffusers' own loader puts the LoRA on it
    base = image(pipe)
    pipe.load_lora_weights(tmp_path / "lora")
    loaded = image(pipe)
    assert not np.allclose(base, expected, atol=1e-3)  # the LoRA changes what is drawn
    np.testing.assert_allclose(loaded, expected, atol=1e-5)
    with safe_open(tmp_path / "lora" / LORA_FILE, framework="pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    part = family.component  # unet or transformer: what the adapter config is filed under
    assert {k.split(".")[0] for k in config} == {part}
    assert (config[f"{part}.r"], config[f"{part}.lora_alpha"]) == (RANK, ALPHA)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, sft_data):
    """A LoRA trained at alpha = 4 x rank, and its equivalents as the old code saved them."""
    root = tmp_path_factory.mktemp("alpha")
    train(sft_data, root / "new")
    return {
        "new": root / "new",
        # alpha / rank folded into the weights: the same adapter at diffusers' alpha = rank
        "folded": without_metadata(root / "new", root / "folded", ALPHA / RANK),
        "old": without_metadata(root / "new", root / "old", summary=True),
        "bare": without_metadata(root / "new", root / "bare"),
    }


def test_eval_uses_the_trained_strength(loras, tmp_path):
    (tmp_path / "p.txt").write_text("a red fox\n")
    names = ["new", "folded", "old", "bare"]
    summary = evaluate(
        EvalConfig(
            prompts=str(tmp_path / "p.txt"),
            output_dir=str(tmp_path / "e"),
            lora=[str(loras[n]) for n in names],
            seeds=[0],
            width=64,
            height=64,
            steps=2,
            scorers=["darkness"],
        )
    )
    drawn = {n: summary["results"][str(loras[n])]["images"] for n in names}
    assert drawn["new"] == drawn["folded"] == drawn["old"]  # the same image (content hash)
    assert drawn["bare"] != drawn["new"]  # no config, no summary: it loads, at alpha = rank
    assert drawn["bare"] != summary["results"]["base"]["images"]


def test_preset_is_fused_at_its_trained_strength(loras, sft_data, tmp_path):
    first = {
        n: train_sft(
            SFTConfig(
                data=str(sft_data),
                output_dir=str(tmp_path / n),
                resolution=64,
                train_steps=1,
                preset_lora=str(loras[n]),
            ),
            progress=False,
        )["first_loss"]
        for n in ("new", "folded", "bare")
    }
    assert first["new"] == pytest.approx(first["folded"], abs=1e-6)
    assert first["new"] != pytest.approx(first["bare"], abs=1e-6)


def test_the_loop_draws_with_a_lora_at_its_trained_strength(loras, tmp_path):
    """`diffusion.lora`: the diffusion tool fuses the LoRA in at its trained strength (what
    `artloop eval` draws with it), at `scale` times it (0: the base), and records its sha256
    in the model identity; a missing or pickled LoRA is one line naming it."""
    import hashlib

    from artloop.config import ArtloopConfig
    from artloop.tools.diffusion import DiffusionError, DiffusionTool, GenParams
    from artloop.tools.images import ImageStore

    store = ImageStore(tmp_path / "images")
    params = GenParams(width=64, height=64, num_inference_steps=2, guidance_scale=5.0, seed=0)

    def draw(lora=None, scale=1.0) -> np.ndarray:
        tool = DiffusionTool("tiny-sd", store=store, lora=lora, lora_scale=scale)
        return np.asarray(store.get(tool.text_to_image("a red fox", "", params)), dtype=float)

    (tmp_path / "p.txt").write_text("a red fox\n")
    summary = evaluate(
        EvalConfig(
            prompts=str(tmp_path / "p.txt"),
            output_dir=str(tmp_path / "e"),
            lora=[str(loras["new"])],
            seeds=[0],
            width=64,
            height=64,
            steps=2,
            scorers=["darkness"],
        )
    )
    evaluated = np.asarray(summary_image(tmp_path / "e", summary, str(loras["new"])), dtype=float)
    fused = draw(loras["new"])
    base = draw()
    # Measured: the LoRA moves pixels by up to 66 of 255; fused or switched on as `eval` does,
    # the same image; the old LoRA too (alpha / rank from its summary); the bare one, at
    # alpha = rank, is 61 away.
    assert np.abs(fused - base).max() > 8
    assert np.abs(fused - evaluated).max() <= 2
    assert np.abs(draw(loras["old"]) - fused).max() <= 2
    assert np.abs(draw(loras["bare"]) - fused).max() > 8
    assert np.array_equal(draw(loras["new"], scale=0.0), base)

    tool = DiffusionTool("tiny-sd", store=store, lora=loras["new"] / LORA_FILE)
    digest = hashlib.sha256((loras["new"] / LORA_FILE).read_bytes()).hexdigest()
    assert tool.identity["lora"] == {
        "path": str(loras["new"] / LORA_FILE),
        "sha256": digest,
        "scale": 1.0,
    }
    cfg = ArtloopConfig(home=tmp_path / "home", diffusion={"lora": str(loras["new"])})
    assert (cfg.diffusion.lora.path, cfg.diffusion.lora.scale) == (loras["new"], 1.0)
    with pytest.raises(DiffusionError, match=r"diffusion.lora: no LoRA at .*nothing"):
        _ = DiffusionTool("tiny-sd", store=store, lora=tmp_path / "nothing").identity
    (tmp_path / "pickle.bin").write_bytes(b"\x80\x04")
    with pytest.raises(DiffusionError, match="not a .safetensors file"):
        DiffusionTool("tiny-sd", store=store, lora=tmp_path / "pickle.bin").setup()


def summary_image(out, summary: dict, variant: str):
    """The image `artloop eval` drew for a variant (its first cell), from its image store."""
    from artloop.tools.images import ImageStore

    return ImageStore(out / "images").get(summary["results"][variant]["images"][0])


def test_the_loop_draws_with_several_loras_fused_in_order(loras, sft_data, tmp_path):
    """`diffusion.lora = [{path, scale}, ...]`: every LoRA fused at its scale, in order: the
    image differs from each LoRA's alone and equals peft's weighted adapters (the same sum);
    the model identity lists each LoRA's path, sha256 and scale in order, as the loop's tool
    (graphs/context.py) records it; a missing LoRA or one of another family is one line
    naming which."""
    import hashlib

    from artloop.config import ArtloopConfig, DiffusionLoras, load_config
    from artloop.graphs.context import build_context
    from artloop.tools.diffusion import DiffusionError, DiffusionTool, GenParams
    from artloop.tools.images import ImageStore

    second = tmp_path / "second"  # another seed and rate: another direction
    train_sft(
        SFTConfig(
            data=str(sft_data),
            output_dir=str(second),
            resolution=64,
            rank=RANK,
            train_steps=3,
            learning_rate=3e-2,
            seed=1,
        ),
        progress=False,
    )
    first = loras["new"]
    store = ImageStore(tmp_path / "images")
    params = GenParams(width=64, height=64, num_inference_steps=2, guidance_scale=5.0, seed=0)

    def draw(lora=None, scale=1.0) -> np.ndarray:
        tool = DiffusionTool("tiny-sd", store=store, lora=lora, lora_scale=scale)
        return np.asarray(store.get(tool.text_to_image("a red fox", "", params)), dtype=float)

    base, one, two = draw(), draw(first), draw(second, 0.8)
    both = draw([first, second], [1.0, 0.8])
    for alone in (base, one, two):
        assert np.abs(both - alone).max() > 8
    assert np.array_equal(draw([first, second], [0.0, 0.0]), base)
    assert np.array_equal(draw([first], [1.0]), one)  # a list of one is that LoRA

    # peft's adapters switched on together at the same weights draw the same image
    from artloop.trainers.common import load_lora

    pipe = DiffusionTool("tiny-sd", store=store).pipeline
    weights = [load_lora(pipe, lora, f"a{i}", "test") for i, lora in enumerate((first, second))]
    pipe.set_adapters(["a0", "a1"], adapter_weights=[weights[0] * 1.0, weights[1] * 0.8])
    g = torch.Generator().manual_seed(0)
    adapters = pipe(
        "a red fox", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
        generator=g, output_type="np",
    ).images[0]  # fmt: skip
    assert np.abs(both - adapters * 255).max() <= 2

    # From a TOML file, as the loop builds its tool
    (tmp_path / "c.toml").write_text(
        f'home = "{tmp_path / "home"}"\n[chat]\nbackend = "scripted"\n[diffusion]\n'
        f'model = "tiny-sd"\nlora = [{{path = "{first}", scale = 1.0}}, '
        f'{{path = "{second}", scale = 0.8}}]\n'
    )
    cfg = load_config(tmp_path / "c.toml")
    assert isinstance(cfg.diffusion.lora, DiffusionLoras)
    assert cfg.public_dict()["diffusion"]["lora"] == [
        {"path": str(first), "scale": 1.0},
        {"path": str(second), "scale": 0.8},
    ]
    ctx = build_context(cfg)
    digest = [hashlib.sha256((d / LORA_FILE).read_bytes()).hexdigest() for d in (first, second)]
    assert ctx.diffusion.identity["lora"] == [
        {"path": str(first / LORA_FILE), "sha256": digest[0], "scale": 1.0},
        {"path": str(second / LORA_FILE), "sha256": digest[1], "scale": 0.8},
    ]
    ctx.diffusion.store = store
    assert np.array_equal(
        np.asarray(store.get(ctx.diffusion.text_to_image("a red fox", "", params)), float), both
    )
    single = ArtloopConfig(home=tmp_path / "home", diffusion={"lora": [str(first)]})
    assert single.public_dict()["diffusion"]["lora"] == {"path": str(first), "scale": 1.0}

    with pytest.raises(DiffusionError, match=r"^diffusion.lora\[1\]: no LoRA at .*nothing$"):
        DiffusionTool("tiny-sd", store=store, lora=[first, tmp_path / "nothing"]).setup()
    with pytest.raises(DiffusionError) as e:  # tiny-sd's LoRAs on tiny-sdxl
        DiffusionTool("tiny-sdxl", store=store, lora=[first, second]).setup()
    assert str(e.value).startswith("diffusion.lora[0]: ") and "\n" not in str(e.value)
    assert "does not fit" in str(e.value) or "holds no weights" in str(e.value), str(e.value)


def test_a_run_drawn_with_several_loras_is_regenerated_with_them(store):
    """Exports that draw again (best-worst pairs) rebuild a run's tool from its stored identity:
    one LoRA ({path, sha256, scale}) or a list of them, in order."""
    from artloop.graphs.scoring import diffusion_tools

    tool_for = diffusion_tools(store)
    two = [{"path": "r1", "sha256": "a", "scale": 1.0}, {"path": "r2", "sha256": "b", "scale": 0.5}]
    tool = tool_for({"run_id": "x", "models": {"diffusion": {"model": "tiny-sd", "lora": two}}})
    assert (tool.lora, tool.lora_scale) == (["r1", "r2"], [1.0, 0.5])
    one = {"path": "r1", "sha256": "a", "scale": 0.7}
    tool = tool_for({"run_id": "y", "models": {"diffusion": {"model": "tiny-sd", "lora": one}}})
    assert (tool.lora, tool.lora_scale) == (["r1"], [0.7])
    plain = tool_for({"run_id": "z", "models": {"diffusion": {"model": "tiny-sd"}}})
    assert plain.lora == [] and plain is not tool
