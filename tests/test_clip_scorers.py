"""The CLIP-family scorers (rewards/clip.py) on their tiny twins (models/tiny/clip.py), loaded
through the same path as the published weights: scores come in batches, are deterministic, move
the right way on a constructed case, and record the weights' identity; pickled weights are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from artloop.config import ScorersConfig
from artloop.models.tiny.clip import COLOURS, HEAD_KEYS, colour_images
from artloop.rewards.registry import REWARDS, configure_scorers, reward_entry

CLIP_LIKE = ("clip", "pickscore", "hpsv2")
TINY_MODELS = {
    "clip": "tiny-clip",
    "pickscore": "tiny-clip",
    "aesthetic": "tiny-aesthetic",
    "hpsv2": "tiny-hps",
}


@pytest.fixture(scope="module", autouse=True)
def clip_family():
    """Registers the scorers for this module's tests and leaves REWARDS as it found it (other
    test files list the registered names)."""
    import importlib

    saved = dict(REWARDS)
    from artloop.rewards import clip, hps

    importlib.reload(clip)
    importlib.reload(hps)
    yield clip, hps
    REWARDS.clear()
    REWARDS.update(saved)


@pytest.fixture(autouse=True)
def tiny_scorers():
    configure_scorers(
        ScorersConfig(
            device="cpu",
            batch_size=4,
            models=TINY_MODELS,
        )
    )
    yield
    configure_scorers(None)


def _captions(shift: int = 0) -> list[str]:
    names = [name for name, _ in COLOURS]
    return [f"a {names[(i + shift) % len(names)]} painting" for i in range(len(names))]


def _score(name: str, images, prompts):
    scores, info = reward_entry(name).fn(images, prompts, [{} for _ in images])
    assert isinstance(scores, np.ndarray) and scores.shape == (len(images),)
    assert np.isfinite(scores).all()
    return scores, info


@pytest.mark.parametrize("name", CLIP_LIKE)
def test_matching_captions_score_higher_than_shuffled(name):
    images = colour_images(jitter=6, seed=11)  # 10 images: batches of 4, 4, 2
    right, info = _score(name, images, _captions())
    wrong, _ = _score(name, images, _captions(shift=3))
    assert info["model"] == ("tiny-hps" if name == "hpsv2" else "tiny-clip")
    assert (right > wrong).mean() >= 0.8, (right, wrong)
    scale = 1 if name == "hpsv2" else 100  # hpsv2 is the bare cosine
    assert right.mean() > wrong.mean() + 0.05 * scale
    lo, hi = reward_entry(name).range
    assert lo <= right.min() and right.max() <= hi


@pytest.mark.parametrize("name", (*CLIP_LIKE, "aesthetic"))
def test_deterministic_and_batch_independent(name):
    images, prompts = colour_images(jitter=6, seed=5), _captions()
    first, _ = _score(name, images, prompts)
    again, _ = _score(name, images, prompts)
    np.testing.assert_array_equal(first, again)
    one_by_one = np.concatenate(
        [_score(name, [im], [p])[0] for im, p in zip(images, prompts, strict=True)]
    )
    np.testing.assert_allclose(first, one_by_one, rtol=1e-4, atol=1e-3)


def test_scores_are_the_published_definitions():
    """100 x cosine of the projected embeddings, clipped at 0 (CLIPScore's definition)."""
    import torch
    from artloop.models.tiny import resolve_model
    from transformers import CLIPModel, CLIPProcessor

    path = resolve_model("tiny-clip")
    model, processor = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    images, prompts = colour_images(seed=2)[:3], _captions(shift=1)[:3]
    with torch.no_grad():
        img = model.get_image_features(**processor(images=images, return_tensors="pt"))
        txt = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True))
    img, txt = img.pooler_output, txt.pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt).numpy()
    scores, _ = _score("clip", images, prompts)
    np.testing.assert_allclose(scores, np.maximum(100 * cos, 0), rtol=1e-4, atol=1e-3)
    picks, info = _score("pickscore", images, prompts)
    np.testing.assert_allclose(picks, info["logit_scale"] * cos, rtol=1e-4, atol=1e-3)
    # tiny-hps holds these weights in open_clip's layout: mapped back, the same cosines
    hps, _ = _score("hpsv2", images, prompts)
    np.testing.assert_allclose(hps, cos, rtol=1e-4, atol=1e-5)


def test_aesthetic_brighter_scores_higher():
    names = [name for name, _ in COLOURS]
    images = colour_images(jitter=4, seed=3)
    dark, grey, bright = (images[names.index(n)] for n in ("black", "gray", "white"))
    scores, info = _score("aesthetic", [dark, grey, bright], ["", "", ""])
    assert info["model"] == "tiny-aesthetic"
    assert scores[0] < scores[2] - 3, scores
    assert scores[0] >= 1.0 and scores[2] <= 10.0


@pytest.mark.parametrize("name", (*CLIP_LIKE, "aesthetic"))
def test_identity_records_the_weights(name):
    identity = reward_entry(name).identity()
    model = identity["model"]
    assert model["id"] == {"aesthetic": "tiny-aesthetic", "hpsv2": "tiny-hps"}.get(
        name, "tiny-clip"
    )
    assert model["revision"] == "local"
    assert len(model["sha256"]) == 16 and int(model["sha256"], 16) >= 0
    assert (
        identity["range"]
        == {"clip": (0, 100), "pickscore": (0, 100), "aesthetic": (1, 10), "hpsv2": (0, 1)}[name]
    )


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    configure_scorers(ScorersConfig(device="cpu", models={"clip": str(tmp_path)}))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors is required") as e:
        _score("clip", colour_images()[:1], ["a red painting"])
    assert "\n" not in str(e.value)


def test_aesthetic_head_file_checked(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(1, 4)}, str(tmp_path / "head.safetensors"))
    configure_scorers(
        ScorersConfig(
            device="cpu", models={"aesthetic": str(tmp_path), "aesthetic_clip": "tiny-clip"}
        )
    )
    with pytest.raises(ValueError, match=f"not LAION's aesthetic head .no {HEAD_KEYS[0]}.weight"):
        _score("aesthetic", colour_images()[:1], [""])


def test_import_is_lazy(clip_family):
    import subprocess
    import sys

    code = (
        "import sys, artloop.rewards.clip, artloop.rewards.hps; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert clip_family[0].CLIP_ID == "openai/clip-vit-large-patch14"


def test_hps_checkpoint_keys_checked(tmp_path, clip_family):
    """An open_clip checkpoint missing a block, or with a foreign key: one line naming it."""
    from artloop.models.tiny import resolve_model
    from safetensors.torch import load_file, save_file

    state = load_file(str(Path(resolve_model("tiny-hps")) / "open_clip_model.safetensors"))
    with pytest.raises(ValueError, match="unexpected key 'foo.weight'"):
        clip_family[1].open_clip_to_transformers({**state, "foo.weight": state["logit_scale"]})
    del state["visual.ln_post.weight"]
    save_file(state, str(tmp_path / "hps.safetensors"))
    configure_scorers(
        ScorersConfig(device="cpu", models={"hpsv2": str(tmp_path), "hpsv2_base": "tiny-hps"})
    )
    with pytest.raises(ValueError, match="no vision_model.post_layernorm.weight") as e:
        _score("hpsv2", colour_images()[:1], ["a red painting"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", (*CLIP_LIKE, "aesthetic"))
def test_scorers_dtype_is_used(name):
    """scorers.dtype = bfloat16 loads a second copy in bfloat16: close to float32, not equal."""
    images, prompts = colour_images(jitter=6, seed=7)[:4], _captions()[:4]
    full, _ = _score(name, images, prompts)
    entry = reward_entry(name)
    configure_scorers(ScorersConfig(device="cpu", dtype="bfloat16", models=TINY_MODELS))
    half, _ = entry.fn(images, prompts, [{}] * 4)
    scale = {"hpsv2": 1, "aesthetic": 10}.get(name, 100)
    np.testing.assert_allclose(half, full, atol=0.05 * scale)
    assert not np.array_equal(half, full)


def test_concurrent_first_calls_load_once(clip_family):
    from concurrent.futures import ThreadPoolExecutor

    clip = clip_family[0]
    clip._load_clip.cache_clear()
    images, prompts = colour_images()[:2], _captions()[:2]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _score("clip", images, prompts)[0], range(4)))
    assert clip._load_clip.cache_info().misses == 1
    assert all(np.array_equal(r, results[0]) for r in results)
