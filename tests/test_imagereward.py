"""ImageReward (issue 17, item 2): transformers' BLIP classes + ImageReward's head, safetensors
only, its preprocessing and (raw - mean) / std; on the tiny twin, loaded by the published
weights' code path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from artloop.config import ScorersConfig
from artloop.models.tiny import resolve_model
from artloop.rewards import configure_scorers, reward_entry
from artloop.rewards.imagereward import (
    MEAN,
    STD,
    convert_keys,
    imagereward_scores,
    load_imagereward,
    preprocess,
)
from PIL import Image

RED = Image.new("RGB", (40, 24), (200, 40, 30))
NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny-imagereward")


def test_preprocess_is_imagerewards():
    x = preprocess(RED, 32)  # shorter side 24 -> 32, longer int(32 * 40 / 24) = 53, centre crop
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    want = (200 / 255 - 0.48145466) / 0.26862954
    assert x[0, 16, 16] == pytest.approx(want, abs=1e-2)  # a flat image survives bicubic


def test_scores_a_batch_deterministically(tiny):
    images, prompts = [RED, NOISE, RED], ["a red fox", "a red fox", "a blue cat in snow"]
    a = imagereward_scores(tiny, images, prompts, "cpu", "float32", batch=2)
    b = imagereward_scores(tiny, images, prompts, "cpu", "float32", batch=16)
    assert a.shape == (3,) and np.all(np.isfinite(a))
    # Batching does not change a score beyond float32 noise (BLAS picks kernels by batch size).
    np.testing.assert_allclose(a, b, rtol=1e-4)
    # Image and prompt both matter (compared within one batch: the same kernels).
    assert a[0] != a[1] and abs(a[0] - a[2]) > 1e-3


def test_the_head_moves_the_score_the_right_way(tiny):
    """A head set by hand: the last bias is the raw reward's offset, so +1 raises every score
    by exactly 1 / STD; zero weights give the published constants' floor (0 - MEAN) / STD."""
    import torch

    model, _ = load_imagereward(tiny, "cpu", "float32")
    last = model.mlp.layers[7]
    before = imagereward_scores(tiny, [RED, NOISE], ["a fox", "a fox"], "cpu", "float32", 16)
    saved = last.weight.detach().clone(), last.bias.detach().clone()
    try:
        with torch.no_grad():
            last.bias += 1.0
        up = imagereward_scores(tiny, [RED, NOISE], ["a fox", "a fox"], "cpu", "float32", 16)
        np.testing.assert_allclose(up - before, 1 / STD, atol=1e-5)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        flat = imagereward_scores(tiny, [RED, NOISE], ["a fox", "a fox"], "cpu", "float32", 16)
        np.testing.assert_allclose(flat, -MEAN / STD, atol=1e-6)
    finally:
        with torch.no_grad():
            last.weight.copy_(saved[0])
            last.bias.copy_(saved[1])


def test_the_published_key_layout_is_converted(tiny, tmp_path):
    """The published checkpoint's keys (after the user's one-off safetensors conversion) map
    onto the same modules: renamed back to ImageReward's names, it loads to the same scores."""
    from safetensors.torch import load_file, save_file

    state = load_file(f"{tiny}/model.safetensors")
    back = {}
    for k, v in state.items():
        k2 = k
        for a, b in [
            ("vision_model.embeddings.class_embedding", "blip.visual_encoder.cls_token"),
            ("vision_model.embeddings.position_embedding", "blip.visual_encoder.pos_embed"),
            ("vision_model.embeddings.patch_embedding.", "blip.visual_encoder.patch_embed.proj."),
            ("vision_model.post_layernorm.", "blip.visual_encoder.norm."),
            ("vision_model.encoder.layers.", "blip.visual_encoder.blocks."),
            (".layer_norm1.", ".norm1."),
            (".layer_norm2.", ".norm2."),
            (".self_attn.projection.", ".attn.proj."),
            (".self_attn.qkv.", ".attn.qkv."),
            ("text_encoder.", "blip.text_encoder."),
        ]:
            if k2.startswith(a) or (a.startswith(".") and k2.startswith("blip.visual_encoder")):
                k2 = k2.replace(a, b, 1)
        back[k2] = v.contiguous()
    back["blip.itm_head.weight"] = back["mlp.layers.0.weight"][:2].clone()  # dropped on load
    assert convert_keys(back).keys() == state.keys()
    pub = tmp_path / "published"
    pub.mkdir()
    save_file(back, str(pub / "ImageReward.safetensors"))
    for f in Path(tiny).iterdir():  # config and tokenizer as they are
        if f.name.endswith((".json", ".txt")) and f.name != "artloop_tiny.json":
            shutil.copy(f, pub / f.name)
    got = imagereward_scores(str(pub), [RED, NOISE], ["a fox", "a fox"], "cpu", "float32", 16)
    want = imagereward_scores(tiny, [RED, NOISE], ["a fox", "a fox"], "cpu", "float32", 16)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_pickle_only_directory_is_one_line(tmp_path):
    (tmp_path / "ImageReward.pt").write_bytes(b"not loaded")
    (tmp_path / "med_config.json").write_text(json.dumps({"hidden_size": 768}))
    with pytest.raises(ValueError) as e:
        load_imagereward(str(tmp_path), "cpu", "float32")
    msg = str(e.value)
    assert "\n" not in msg and "ImageReward.pt" in msg and "safetensors is required" in msg


def test_registered_with_the_model_identity(tiny):
    configure_scorers(ScorersConfig(models={"imagereward": "tiny-imagereward"}, device="cpu"))
    try:
        entry = reward_entry("imagereward")
        ident = entry.identity()
        scores, info = entry.fn([RED, NOISE], ["a red fox", "a red fox"], [{}, {}])
    finally:
        configure_scorers(None)
    assert entry.range is None and entry.higher_is_better
    assert ident["model"]["id"] == "tiny-imagereward" and len(ident["model"]["sha256"]) == 16
    np.testing.assert_allclose(
        scores, imagereward_scores(tiny, [RED, NOISE], ["a red fox"] * 2, "cpu", "float32", 16)
    )
    assert info["model"] == "tiny-imagereward"
