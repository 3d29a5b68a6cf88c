"""ArtAug's differential training end to end (`artloop train sft --differential`) on
tiny-shapes-sd: LoRA1 on the base's own drawings, fused, then LoRA2 on a systematic change of
them; LoRA2 alone, on the plain base, against a plain sft LoRA trained on the same data. Also
the refusals (with a preset LoRA, on data without `original`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from artloop.cli import app
from artloop.tools.diffusion import DiffusionTool
from artloop.tools.images import ImageStore
from artloop.trainers.common import LORA_FILE, TrainerConfigError
from artloop.trainers.sft import SFTConfig, train_sft
from artloop.world import sample_scenes
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

TRAIN, HELD_OUT = 16, 16
BACKGROUND = 238  # the shapes world's grey-white background


def draw(pipe, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """tiny-shapes-sd's drawings, (N, 64, 64, 3) in 0..255 floats."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        images = pipe(
            prompts,
            height=64,
            width=64,
            num_inference_steps=8,
            guidance_scale=5.0,
            generator=generators,
            output_type="np",
        ).images
    return images * 255


def cooled(images: np.ndarray) -> np.ndarray:
    """The "enhancement": every warm pixel made cool (red and blue swapped where red is
    higher), so red, orange and yellow shapes turn blue, cyan; the rest stays. Unlike a tone
    change of the whole image, tiny-shapes-sd's VAE, fitted to the world's grey-white
    background, represents it (its round trip keeps the colours)."""
    out = images.copy()
    out[..., 0] = np.minimum(images[..., 0], images[..., 2])
    out[..., 2] = np.maximum(images[..., 0], images[..., 2])
    return out


def foreground(images: np.ndarray) -> np.ndarray:
    return np.abs(images - BACKGROUND).max(axis=-1) > 60


def warm_share(images: np.ndarray) -> np.ndarray:
    """Per image: the share of its shapes' pixels that are warm (red well above blue)."""
    shapes = foreground(images)
    warm = (images[..., 0] > images[..., 2] + 40) & shapes
    return warm.sum(axis=(1, 2)) / np.maximum(shapes.sum(axis=(1, 2)), 1)


def layout_change(images: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per image: 1 - IoU of its shapes' pixels with the base's drawing of the same prompt and
    seed (0: the same layout)."""
    a, b = foreground(images), foreground(base)
    union = (a | b).sum(axis=(1, 2))
    return 1 - (a & b).sum(axis=(1, 2)) / np.maximum(union, 1)


@pytest.fixture(scope="module")
def triples(tmp_path_factory):
    """An sft export's layout with `original` = tiny-shapes-sd's own drawing of each prompt,
    `image` = its cooled copy; and the held-out prompts."""
    import datasets

    root = tmp_path_factory.mktemp("differential")
    pipe = DiffusionTool("tiny-shapes-sd", store=ImageStore(root / "img")).pipeline
    pipe.set_progress_bar_config(disable=True)
    prompts = [s.caption() for s in sample_scenes("train", TRAIN + HELD_OUT, seed=1)]
    originals = draw(pipe, prompts[:TRAIN], list(range(TRAIN))).round().astype(np.uint8)
    enhanced = cooled(originals.astype(np.float64)).astype(np.uint8)
    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(a) for a in enhanced],
            "text": prompts[:TRAIN],
            "original": [Image.fromarray(a) for a in originals],
        }
    )
    ds = ds.cast_column("image", datasets.Image()).cast_column("original", datasets.Image())
    (root / "data").mkdir()
    ds.to_parquet(root / "data" / "train-00000-of-00001.parquet")
    return root, pipe, prompts[TRAIN:]


def config(data, out, **kw) -> SFTConfig:
    return SFTConfig(
        data=str(data),
        output_dir=str(out),
        model="tiny-shapes-sd",
        resolution=64,
        train_steps=150,
        learning_rate=5e-3,
        batch_size=4,
        checkpoint_every=1000,
        **kw,
    )


def test_lora2_alone_carries_the_enhancement_without_the_content(triples, tmp_path):
    data, pipe, held_out = triples
    train_sft(config(data, tmp_path / "plain"), progress=False)
    diff = train_sft(config(data, tmp_path / "diff", differential=True), progress=False)

    # Both LoRAs saved; the summary (and its file) says which is which.
    out = tmp_path / "diff"
    lora1, lora2 = out / "lora1" / LORA_FILE, out / LORA_FILE
    assert diff["lora"] == diff["differential"]["lora2"] == str(lora2)
    assert diff["differential"]["lora1"] == str(lora1)
    assert diff["differential"]["lora1_summary"]["steps"] == 150 and diff["steps"] == 150
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["differential"] == diff["differential"] and saved["config"]["differential"]
    assert saved["config"]["preset_lora"] is None
    w1, w2 = load_file(lora1), load_file(lora2)
    assert w1.keys() == w2.keys() and any(not torch.equal(w1[k], w2[k]) for k in w1)

    # On held-out prompts and seeds: the base, plain sft, LoRA2 alone on the plain base.
    seeds = [1000 + i for i in range(HELD_OUT)]
    base = draw(pipe, held_out, seeds)
    drawn = {}
    for name, lora in (("plain", tmp_path / "plain"), ("lora2", out)):
        pipe.load_lora_weights(str(lora), adapter_name=name)
        pipe.set_adapters([name])
        drawn[name] = draw(pipe, held_out, seeds)
        pipe.delete_adapters([name])
    cooler = {k: float((warm_share(base) - warm_share(v)).mean()) for k, v in drawn.items()}
    moved = {k: float(layout_change(v, base).mean()) for k, v in drawn.items()}
    figures = {"warm share drop": cooler, "layout change": moved}
    print(json.dumps(figures))  # pytest -s shows them
    # Measured (training seed 0; seed 1): warm-share drop LoRA2 0.105 (0.11), plain 0.027
    # (-0.08); layout change (1 - IoU) LoRA2 0.41 (0.43), plain 0.65 (0.59).
    assert cooler["lora2"] > 0.05, figures  # toward the enhancement
    assert cooler["lora2"] > cooler["plain"] + 0.04, figures  # more than plain sft does
    assert moved["lora2"] < moved["plain"] - 0.08, figures  # with less of the content


def test_refusals_are_one_line(sft_data, tmp_path):
    with pytest.raises(TrainerConfigError, match="SFTConfig.differential: .*not with preset_lora"):
        SFTConfig(data=str(sft_data), differential=True, preset_lora=str(tmp_path / "x"))
    runner = CliRunner()
    common = ["train", "sft", "--data", str(sft_data), "--output-dir", str(tmp_path / "o")]
    cases = {
        "preset": (["--differential", "--preset-lora", str(tmp_path)], "not with preset_lora"),
        # an sft parquet without `original` (the conftest's, as an earlier export wrote it)
        "no original": (["--differential"], "`artloop export OUT --format sft` writes it"),
    }
    for name, (args, message) in cases.items():
        result = runner.invoke(app, [*common, *args, "--resolution", "64"])
        # one error line, after `datasets`' own progress lines; no traceback
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1, (name, result.output)
        assert errors[0].startswith("error: SFTConfig.differential") and message in errors[0]
        assert "Traceback" not in result.stderr, name
    assert not (tmp_path / "o" / "lora1").exists()  # refused before anything trained
    help_text = runner.invoke(app, ["train", "sft", "--help"], env={"COLUMNS": "200"}).stdout
    assert "--differential" in help_text and "ArtAug" in help_text
