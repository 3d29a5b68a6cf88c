"""AGFSync-style preference pairs (issue 17, item 3b): `artloop export --format dpo --pairs
best-worst --score NAME --candidates N`: per run, N candidates (its own step images first, then
new tiny-SD images with its stored settings and seeds seed+1..), the best vs the worst by the
score as a Pick-a-Pic pair; the card names the score and its model."""

from __future__ import annotations

import io

import numpy as np
import pytest
from artloop.cli import app
from artloop.rewards.registry import REWARDS, reward
from artloop.store.export import provenance
from artloop.store.trajectories import TrajectoryStore
from datasets import load_dataset
from PIL import Image
from typer.testing import CliRunner

PARAMS = {"width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 7}
DIFFUSION = {"model": "tiny-sd", "family": "sd", "dtype": "float32"}


def grey(store, level: int) -> str:
    return store.images.put(Image.new("RGB", (64, 64), (level,) * 3))


@pytest.fixture
def pair_store(tmp_path):
    """Run a: two own images (bright 250, dark 5); run b: one own image (mid grey)."""
    store = TrajectoryStore(tmp_path / "home")
    for run_id, levels in {"a" * 16: (250, 5), "b" * 16: (128,)}.items():
        digests = [grey(store, v) for v in levels]
        step = {
            "iteration": 0,
            "prompt": "a grey square",
            "negative_prompt": "",
            "params": PARAMS,
            "image": digests[0],
            "edited_image": digests[-1],
            "result_image": digests[-1],
            "score": 5.0,
        }
        models = {"chat": {"id": "x"}, "diffusion": DIFFUSION}
        store.create_run(run_id, f"prompt {run_id[0]}", {"tags": []}, models, "v1")
        store.put_step(run_id, 0, step)
        store.finish_run(run_id, "accepted", final_image=digests[-1], best_score=5.0)
    return store


def export(store, out, *args):
    return CliRunner().invoke(
        app, ["export", str(out), "--format", "dpo", "--home", str(store.home), *args]
    )


def brightness(data: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(data)).convert("L")).mean())


def test_best_worst_pairs_of_n_candidates(pair_store, tmp_path):
    reward("test-bright", range=(0.0, 1.0), model=lambda: {"id": "test/bright"})(
        REWARDS["brightness"].fn
    )
    try:
        images_before = len(list(pair_store.images.root.rglob("*.png")))
        args = ["--pairs", "best-worst", "--score", "test-bright", "--candidates", "3"]
        done = export(pair_store, tmp_path / "ds", *args)
        assert done.exit_code == 0, done.output
        rows = {r["run_id"][0]: r for r in load_dataset(str(tmp_path / "ds"), split="train")}
        assert set(rows) == {"a", "b"}
        for row in rows.values():
            assert row["label_0"] == 1.0 and row["label_1"] == 0.0
            assert row["source"] == "best_worst_score"
            assert brightness(row["jpg_0"]) > brightness(row["jpg_1"])  # best first
        assert brightness(rows["a"]["jpg_0"]) > 240 and brightness(rows["a"]["jpg_1"]) < 15
        # run b had one image: two were generated (seeds 8 and 9), stored, and one is its worst
        # or best (a grey 128 frame cannot be both)
        generated = len(list(pair_store.images.root.rglob("*.png"))) - images_before
        assert generated == 1 + 2  # a: its 3rd candidate; b: its 2nd and 3rd
        assert {round(brightness(rows["b"][k])) for k in ("jpg_0", "jpg_1")} != {128}
        card = provenance(tmp_path / "ds")
        assert card["pairs"] == {"pairs": "best-worst", "score": "test-bright", "candidates": 3}
        assert card["scorers"]["test-bright"]["model"] == {"id": "test/bright"}
        # again: the same seeds give the same images, and nothing new is stored
        again = export(pair_store, tmp_path / "ds2", *args)
        assert again.exit_code == 0, again.output
        assert len(list(pair_store.images.root.rglob("*.png"))) - images_before == generated
        rows2 = {r["run_id"][0]: r for r in load_dataset(str(tmp_path / "ds2"), split="train")}
        assert rows2["b"]["jpg_0"] == rows["b"]["jpg_0"]
    finally:
        del REWARDS["test-bright"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pairs", "best-worst", "--score", "no-such-scorer"], "'no-such-scorer'"),
        (["--pairs", "best-worst"], "needs --score NAME"),
        (["--pairs", "best-worst", "--score", "brightness", "--candidates", "1"], "2 to 64"),
        (["--pairs", "worst-best", "--score", "brightness"], "choose judge or best-worst"),
        (["--score", "brightness"], "which is not given"),
    ],
)
def test_bad_pair_options_are_one_line_and_write_nothing(pair_store, tmp_path, args, message):
    before = sorted(p.name for p in pair_store.home.rglob("*"))
    done = export(pair_store, tmp_path / "ds", *args)
    assert done.exit_code == 2, done.output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "ds").exists()
    assert sorted(p.name for p in pair_store.home.rglob("*")) == before


def test_best_worst_is_a_dpo_export(pair_store, tmp_path):
    done = CliRunner().invoke(
        app,
        [
            "export",
            str(tmp_path / "ds"),
            "--format",
            "sft",
            "--pairs",
            "best-worst",
            "--score",
            "brightness",
            "--home",
            str(pair_store.home),
        ],
    )
    assert done.exit_code == 2 and "makes a dpo export, not sft" in done.stderr
