"""`artloop eval`: base vs base + LoRA on fixed prompts and seeds, scored by name."""

from __future__ import annotations

import json

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
    train_sft(SFTConfig(data=str(root / "data"), output_dir=str(root / "lora"), resolution=64,
                        train_steps=20, learning_rate=1e-2), progress=False)  # fmt: skip
    (root / "prompts.txt").write_text("a red fox\na lighthouse\n")
    return root


def config(root, out, **kw) -> EvalConfig:
    return EvalConfig(**{"prompts": str(root / "prompts.txt"), "lora": [str(root / "lora")],
                         "output_dir": str(out), "seeds": [0, 1], "scorers": ["darkness", "contrast"],
                         "width": 64, "height": 64, "steps": 2, **kw})  # fmt: skip


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
