"""open_clip's own forward pass on a tiny ViT CLIP: the reference that artloop's HPSv2 mapping
(artloop.rewards.hps.open_clip_to_transformers) is tested against (tests/test_hps_open_clip.py).

Run by the vLLM venv's python, which has open_clip and torchvision (scripts/install-vllm-cpu.sh),
with its CUDA stand-ins on the library path:

    LD_LIBRARY_PATH=.venv-vllm/cuda-stubs .venv-vllm/bin/python scripts/open_clip_reference.py OUT

It writes to OUT:
  model/open_clip_model.safetensors  the state_dict, open_clip's keys (HPSv2's checkpoint layout)
  model/config.json                  the same architecture as a transformers CLIPConfig
  reference.safetensors              the inputs (pixels, input_ids) and open_clip's outputs
(model/ is an HPSv2 weights directory: artloop's loader reads every *.safetensors in it.)

The model is ViT-H-14's architecture scaled down: GELU (not QuickGELU), a text width equal to
embed_dim (a square text projection), a wider image tower, argmax (end-of-text) text pooling.
Every parameter is perturbed after open_clip's init, so that no LayerNorm is the identity.
Standalone: it imports neither artloop nor transformers.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

NAME = "artloop-tiny-vit"
EMBED_DIM = 32
VISION = {"image_size": 32, "patch_size": 8, "width": 48, "head_width": 12, "layers": 2}
TEXT = {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 4, "layers": 2}
SEED = 0
N_IMAGES = 3
# open_clip's tokenizer: <start_of_text> and <end_of_text> are the two highest ids, the rest of
# the context is padded with 0; the text tower pools at text.argmax(-1), the end-of-text token.
SOT, EOT = TEXT["vocab_size"] - 2, TEXT["vocab_size"] - 1
WORDS = ([5, 17, 300], [42], [7, 7, 7, 7, 900, 3, 12, 64, 2, 1, 88, 500])


def model_config() -> dict:
    return {
        "embed_dim": EMBED_DIM,
        "quick_gelu": False,  # as ViT-H-14 (HPSv2's base): nn.GELU
        "vision_cfg": dict(VISION),
        "text_cfg": dict(TEXT),
    }


def transformers_config() -> dict:
    """The same architecture as transformers' CLIPConfig (config.json)."""
    vision_width, text_width = VISION["width"], TEXT["width"]
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": EMBED_DIM,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "vocab_size": TEXT["vocab_size"],
            "hidden_size": text_width,
            "intermediate_size": 4 * text_width,  # open_clip's mlp_ratio 4.0
            "num_hidden_layers": TEXT["layers"],
            "num_attention_heads": TEXT["heads"],
            "max_position_embeddings": TEXT["context_length"],
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,  # torch's LayerNorm default, open_clip's
            "projection_dim": EMBED_DIM,
            "bos_token_id": SOT,
            # transformers pools at the first eos_token_id; open_clip at the argmax, the same
            # position since end-of-text is the highest id.
            "eos_token_id": EOT,
            "pad_token_id": 0,
        },
        "vision_config": {
            "image_size": VISION["image_size"],
            "patch_size": VISION["patch_size"],
            "num_channels": 3,
            "hidden_size": vision_width,
            "intermediate_size": 4 * vision_width,
            "num_hidden_layers": VISION["layers"],
            "num_attention_heads": vision_width // VISION["head_width"],
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": EMBED_DIM,
        },
    }


def build_model() -> torch.nn.Module:
    """The tiny CLIP, created by open_clip's factory from a registered config."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{NAME}.json").write_text(json.dumps(model_config()))
        open_clip.add_model_config(tmp)
    torch.manual_seed(SEED)
    model = open_clip.create_model(NAME, pretrained=None, precision="fp32", device="cpu")
    if not isinstance(model, open_clip.CLIP):
        raise TypeError(f"expected open_clip.CLIP, got {type(model).__name__}")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed normalised-pixel tensors and open_clip-style token id sequences."""
    g = torch.Generator().manual_seed(SEED + 1)
    side = VISION["image_size"]
    pixels = torch.randn(N_IMAGES, 3, side, side, generator=g)
    ids = torch.zeros(len(WORDS), TEXT["context_length"], dtype=torch.long)
    for i, words in enumerate(WORDS):
        seq = [SOT, *words, EOT]
        ids[i, : len(seq)] = torch.tensor(seq)
    return pixels, ids


def main(out: Path) -> None:
    weights = out / "model"
    weights.mkdir(parents=True, exist_ok=True)
    model = build_model()
    pixels, ids = inputs()
    with torch.no_grad():
        image = model.encode_image(pixels)
        text = model.encode_text(ids)
        image_n, text_n = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    # HPSv2's checkpoint is this state dict (its "state_dict" entry), saved by open_clip's CLIP.
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(weights / "open_clip_model.safetensors"),
    )
    (weights / "config.json").write_text(json.dumps(transformers_config(), indent=2) + "\n")
    save_file(
        {
            "pixel_values": pixels,
            "input_ids": ids,
            "image_embeds": image,
            "text_embeds": text,
            "image_features": image_n,
            "text_features": text_n,
            "cosines": image_n @ text_n.T,  # (images, texts)
        },
        str(out / "reference.safetensors"),
        metadata={"open_clip": open_clip.__version__, "torch": torch.__version__},
    )
    print(f"open_clip {open_clip.__version__}: reference written to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    main(Path(sys.argv[1]))
