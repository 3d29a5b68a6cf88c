"""`artloop eval`: base vs base + LoRA on fixed prompts and seeds, scored by name."""

from __future__ import annotations

import json
import re

import pytest
from artloop.cli import app
from artloop.trainers.common import TrainerConfigError
from artloop.trainers.evaluate import EvalConfig, evaluate
from artloop.trainers.sft import SFTConfig, train_sft
from PIL import Image
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA trained hard on dark images, so that it visibly changes the output."""
    import datasets
    import numpy as np

    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 40).astype(np.uint8)) for _ in range(4)]
    (root / "data" / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_dict({"image": images, "text": ["a red fox"] * 4})
    ds.cast_column("image", datasets.Image()).to_parquet(root / "data" / "data" / "train.parquet")
    train_sft(
        SFTConfig(
            data=str(root / "data"),
            output_dir=str(root / "lora"),
            resolution=64,
            train_steps=20,
            learning_rate=1e-2,
        ),
        progress=False,
    )
    (root / "prompts.txt").write_text("a red fox\na lighthouse\n")
    return root


def config(root, out, **kw) -> EvalConfig:
    return EvalConfig(
        **{
            "prompts": str(root / "prompts.txt"),
            "lora": [str(root / "lora")],
            "output_dir": str(out),
            "seeds": [0, 1],
            "scorers": ["darkness", "contrast"],
            "width": 64,
            "height": 64,
            "steps": 2,
            **kw,
        }
    )


def test_base_vs_lora_table_and_grid(lora, tmp_path):
    summary = evaluate(config(lora, tmp_path / "a"))
    base, tuned = summary["results"]["base"], summary["results"][str(lora / "lora")]
    assert len(summary["cells"]) == 4  # 2 prompts x 2 seeds
    assert (
        set(base["scores"]) == {"darkness", "contrast"}
        and len(base["scores"]["darkness"]["values"]) == 4
    )
    assert base["images"] != tuned["images"]  # the LoRA changes what is drawn
    table = (tmp_path / "a" / "results.md").read_text().splitlines()
    assert table[0] == "| model | darkness | contrast |" and len(table) == 4
    assert table[3].startswith(f"| {lora / 'lora'} |")
    assert "(+" in table[3] or "(-" in table[3]  # the change from the base is shown
    assert Image.open(tmp_path / "a" / "grid.png").size == (2 * 64, 4 * 64)
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    assert on_disk["results"]["base"]["scores"] == base["scores"]
    # each scorer's identity (issue 17, item 3d): what its score means and its weights
    assert on_disk["scorers"]["darkness"] == {
        "name": "darkness",
        "range": [0.0, 1.0],
        "higher_is_better": True,
        "model": None,
    }
    assert on_disk["scorers"]["contrast"]["range"] == [0.0, 0.5]


def test_fixed_seeds_give_the_same_numbers(lora, tmp_path):
    a = evaluate(config(lora, tmp_path / "a", lora=[]))
    b = evaluate(config(lora, tmp_path / "b", lora=[]))
    assert a["results"] == b["results"] and list(a["results"]) == ["base"]


def test_bad_inputs(lora, tmp_path):
    with pytest.raises(TrainerConfigError, match="EvalConfig.lora: no pytorch_lora_weights"):
        config(lora, tmp_path, lora=[str(tmp_path)])
    with pytest.raises(TrainerConfigError, match="unknown reward 'beauty'"):
        config(lora, tmp_path, scorers=["beauty"])
    result = CliRunner().invoke(app, ["eval", "--prompts", str(tmp_path / "none.txt")])
    assert result.exit_code == 2 and result.stderr.startswith("error: EvalConfig")


def test_a_file_that_is_not_a_lora_is_one_line(tmp_path):
    """Through the installed command: safetensors that hold no LoRA, as a directory or the file."""
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    (tmp_path / "unet").mkdir()
    weights = {"conv_in.weight": torch.zeros(4, 4), "conv_in.bias": torch.zeros(4)}
    save_file(weights, tmp_path / "unet" / "pytorch_lora_weights.safetensors")
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "p.txt").write_text("a fox\n")
    artloop = str(Path(sys.executable).with_name("artloop"))
    for lora in ("unet", "model.safetensors"):
        out = subprocess.run(
            [artloop, "eval", "--lora", str(tmp_path / lora), "--prompts", str(tmp_path / "p.txt")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: EvalConfig.lora: ")
        assert "is not a LoRA (2 of its 2 tensors are not LoRA weights, e.g. 'conv_in" in out.stderr


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("tiny-sdxl", "does not fit this model (size mismatch for "),
        ("tiny-flux", "holds no weights for this model (a LoRA for another model family?)"),
    ],
)
def test_a_lora_of_another_family_is_named(lora, tmp_path, model, problem):
    with pytest.raises(TrainerConfigError, match=r"^EvalConfig\.lora: .*" + re.escape(problem)):
        evaluate(config(lora, tmp_path, model=model))


def test_every_field_scorer_from_the_cli(tmp_path, monkeypatch):
    """`artloop eval --scorers clip,aesthetic,pickscore,hpsv2,imagereward,vqa` on the tiny stack
    (issue 17), the scorers pointed at their tiny twins by the environment: every scorer is
    reported with its range and its weights (an inline composite's weights stay together)."""
    from artloop.rewards.registry import configure_scorers

    configure_scorers(None)  # the environment's scorers section, as in a fresh process
    models = {
        "clip": "tiny-clip",
        "aesthetic": "tiny-aesthetic",
        "pickscore": "tiny-clip",
        "hpsv2": "tiny-hps",
        "imagereward": "tiny-imagereward",
    }
    monkeypatch.setenv("ARTLOOP_SCORERS__MODELS", json.dumps(models))
    monkeypatch.setenv("ARTLOOP_SCORERS__DEVICE", "cpu")
    (tmp_path / "p.txt").write_text("a red fox\n")
    names = ["clip", "aesthetic", "pickscore", "hpsv2", "imagereward", "vqa"]
    composite = "composite:clip=0.6,aesthetic=0.4"
    args = ["eval", "--prompts", str(tmp_path / "p.txt"), "--output-dir", str(tmp_path / "e")]
    args += ["--scorers", ",".join(names), "--scorers", composite, "--seeds", "0"]
    args += ["--width", "64", "--height", "64", "--steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    on_disk = json.loads((tmp_path / "e" / "results.json").read_text())
    assert list(on_disk["scorers"]) == [*names, composite]
    scores = on_disk["results"]["base"]["scores"]
    assert set(scores) == {*names, composite}
    assert all(len(s["values"]) == 1 for s in scores.values())
    ranges = {n: on_disk["scorers"][n]["range"] for n in [*names, composite]}
    assert ranges == {
        "clip": [0.0, 100.0],
        "aesthetic": [1.0, 10.0],
        "pickscore": [0.0, 100.0],
        "hpsv2": [0.0, 1.0],
        "imagereward": None,  # unbounded (a standardised reward model's output)
        "vqa": [0.0, 1.0],
        composite: [0.0, 1.0],
    }
    for name, weights in models.items():
        ident = on_disk["scorers"][name]["model"]
        assert ident["id"] == weights and len(ident["sha256"]) == 16, (name, ident)
    vqa = on_disk["scorers"]["vqa"]["model"]
    assert (vqa["id"], vqa["backend"]) == ("tiny-shapes-qwen2vl", "inprocess")  # the chat's
    assert set(on_disk["scorers"][composite]["model"]["parts"]) == {"clip", "aesthetic"}
    head = (tmp_path / "e" / "results.md").read_text().splitlines()[0]
    assert head == "| model | " + " | ".join([*names, composite]) + " |"


def test_the_base_can_carry_earlier_loras(lora, tmp_path):
    """--base-lora fuses LoRAs into the base first (an ArtAug round's earlier ones): the base row
    is drawn as the loop draws with diffusion.lora = that list, and the LoRA row on top of it."""
    from artloop.tools.diffusion import DiffusionTool, GenParams
    from artloop.tools.images import ImageStore

    trained = str(lora / "lora")
    plain = evaluate(config(lora, tmp_path / "plain"))
    carried = evaluate(config(lora, tmp_path / "carried", base_lora=[trained]))
    assert carried["model"]["lora"]["path"].startswith(trained) and "lora" not in plain["model"]
    base_plain, base_carried = plain["results"]["base"], carried["results"]["base"]
    assert base_carried["images"] != base_plain["images"]  # the LoRA is in the base now
    loop = DiffusionTool(model="tiny-sd", store=ImageStore(tmp_path / "loop"), lora=[trained])
    cell = carried["cells"][0]
    drawn = loop.text_to_image(
        cell["prompt"], "", GenParams(width=64, height=64, num_inference_steps=2, seed=cell["seed"])
    )
    assert drawn == base_carried["images"][0]  # the same pixels the loop draws with that LoRA
