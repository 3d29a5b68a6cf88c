"""ImageReward's architecture (arXiv 2304.05977: BLIP's ViT, the BERT text encoder that
cross-attends to it, an MLP head on the [CLS] state) on transformers' BLIP classes, and its tiny
random-weight twin `tiny-imagereward`. The layout rewards/imagereward.py loads, the published
weights' and the twin's alike: config.json (a BlipConfig), model.safetensors (keys
vision_model.*, text_encoder.*, mlp.layers.*) and a BERT tokenizer with BLIP's [DEC]/[ENC]."""

from __future__ import annotations

# Deliberately lazy: torch and transformers are imported inside the functions that use them, so
# that importing this module (the tiny registry, the CLI's --help) does not load them.
from pathlib import Path
from typing import Any

from artloop.models.tiny.cache import build_cached

WEIGHTS = "model.safetensors"

# BLIP ViT-L/16 at 224 px (ImageReward's `BLIP_Pretrain(image_size=224, vit="large")`) and its
# med_config.json (BERT-base, cross-attention to the 1024-wide image tokens, 30524 tokens).
VISION_L = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
}
TEXT_BASE = {
    "vocab_size": 30524,
    "hidden_size": 768,
    "encoder_hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "layer_norm_eps": 1e-12,
}


def blip_config(vision: dict | None = None, text: dict | None = None) -> Any:
    """A BlipConfig: ImageReward's (ViT-L, BERT-base) updated by `vision` and `text`."""
    from transformers import BlipConfig

    return BlipConfig(
        vision_config={**VISION_L, **(vision or {})}, text_config={**TEXT_BASE, **(text or {})}
    )


def imagereward_model(config: Any) -> Any:
    """ImageReward as an nn.Module: `vision_model` (BlipVisionModel), `text_encoder`
    (BlipTextModel, no pooler) and `mlp.layers` (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no
    activations, dropouts at ImageReward's indices, so its state-dict keys carry over)."""
    import torch
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    class Head(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            nn = torch.nn
            self.layers = nn.Sequential(
                nn.Linear(width, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    class ImageRewardModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.vision_model = BlipVisionModel(config.vision_config)
            self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
            self.mlp = Head(config.text_config.hidden_size)

        def forward(self, pixel_values, input_ids, attention_mask):  # (B, 3, S, S), (B, L) x2
            image = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, P, Dv)
            image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
            text = self.text_encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=image,
                encoder_attention_mask=image_mask,
                return_dict=True,
            ).last_hidden_state  # (B, L, Dt)
            return self.mlp(text[:, 0, :].float()).squeeze(-1)  # (B,): the raw reward

    return ImageRewardModel()


CONFIG = {
    "seed": 0,
    "version": 2,
    "image_size": 32,
    "patch_size": 8,
    "vision_hidden": 32,
    "text_hidden": 32,
    "layers": 2,
    "heads": 2,
    "intermediate": 64,
    "words": ["a", "red", "fox", "in", "snow", "blue", "cat", "the", "of", "photo", "painting"],
}


def build_tiny_imagereward() -> Path:
    return build_cached("tiny-imagereward", CONFIG, _build)


def _build(config: dict, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = specials + config["words"] + letters + [f"##{c}" for c in letters]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tok.save_pretrained(out)
    cfg = blip_config(
        vision={
            "hidden_size": config["vision_hidden"],
            "intermediate_size": config["intermediate"],
            "num_hidden_layers": config["layers"],
            "num_attention_heads": config["heads"],
            "image_size": config["image_size"],
            "patch_size": config["patch_size"],
        },
        text={
            "vocab_size": len(tok),
            "hidden_size": config["text_hidden"],
            "encoder_hidden_size": config["vision_hidden"],
            "intermediate_size": config["intermediate"],
            "num_hidden_layers": config["layers"],
            "num_attention_heads": config["heads"],
            "max_position_embeddings": 64,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "sep_token_id": tok.sep_token_id,
        },
    )
    torch.manual_seed(config["seed"])
    model = imagereward_model(cfg)
    for p in model.mlp.parameters():  # a head of visible scale (ImageReward's init is ~1e-3)
        torch.nn.init.normal_(p, std=0.3)
    cfg.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
