"""Tiny CLIP-family scorers' models: `tiny-clip` (a transformers CLIPModel + CLIPProcessor, the
architecture of CLIP score's and PickScore's weights) and `tiny-aesthetic` (LAION's aesthetic
predictor v2: that CLIP's image tower into an MLP head 32-1024-128-64-16-1, ViT-L/14's 768 scaled
down to the tiny projection width).

The CLIP towers are fitted for a few contrastive steps on solid-colour images captioned with their
colour (deterministic, a few seconds), so that a matching caption scores higher than a shuffled
one; the aesthetic head is set by hand along the dark -> bright direction of the image embedding,
so that a brighter image scores higher (about 2 for black, 9 for white).
"""

from __future__ import annotations

# Deliberately lazy: torch, transformers and safetensors are imported inside the functions that use
# them, so that importing this module (the CLI's --help, the config, a test) does not load them.
from pathlib import Path

from artloop.models.tiny.cache import build_cached
from artloop.models.tiny.diffusion import clip_tokenizer

# (name, RGB) pairs the tiny CLIP is fitted on; each name is a word of the tokenizer's corpus.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 30, 30)),
    ("green", (30, 180, 40)),
    ("blue", (30, 50, 220)),
    ("yellow", (235, 220, 40)),
    ("purple", (130, 40, 170)),
    ("orange", (240, 140, 20)),
    ("pink", (245, 150, 200)),
    ("black", (10, 10, 10)),
    ("white", (245, 245, 245)),
    ("gray", (128, 128, 128)),
)
TEMPLATES = ("a {} painting", "a photo of {} colour", "{}", "a {} picture with soft light")

CLIP_CONFIG: dict = {
    "builder": 1,
    "seed": 0,
    "tokenizer": {"vocab_size": 1000, "model_max_length": 77},
    "text_config": {
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    },
    "vision_config": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "projection_dim": 32,
    "fit": {"steps": 80, "lr": 0.01},
}

AESTHETIC_CONFIG: dict = {
    "builder": 1,
    "clip": CLIP_CONFIG,
    # LAION's head: Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64),
    # Dropout, Linear(64, 16), Linear(16, 1); 768 here is the tiny CLIP's projection width.
    "head": [32, 1024, 128, 64, 16, 1],
    "scores": {"dark": 2.0, "bright": 9.0},
}
HEAD_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")  # the .pth's names


def colour_images(size: int = 32, jitter: int = 0, seed: int = 0):
    """One solid-colour PIL image per COLOURS entry (`jitter`: uniform noise of that amplitude)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _, rgb in COLOURS:
        a = np.full((size, size, 3), rgb, dtype=np.int16)
        if jitter:
            a = a + rng.integers(-jitter, jitter + 1, size=a.shape)
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


def _processor(config: dict):
    from transformers import CLIPImageProcessor, CLIPProcessor

    side = config["vision_config"]["image_size"]
    images = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    return CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer(**config["tokenizer"]))


def _fit(model, processor, config: dict) -> None:
    """A few steps of CLIP's contrastive loss: each colour's images against its captions."""
    import torch
    import torch.nn.functional as F

    names = [name for name, _ in COLOURS]
    images = [im for seed in range(4) for im in colour_images(jitter=12, seed=seed)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    labels = torch.arange(len(COLOURS)).repeat(4)
    captions = [t.format(name) for t in TEMPLATES for name in names]
    text = processor(text=captions, return_tensors="pt", padding=True)
    text_labels = torch.arange(len(COLOURS)).repeat(len(TEMPLATES))
    opt = torch.optim.Adam(model.parameters(), lr=config["fit"]["lr"])
    model.train()
    for _ in range(config["fit"]["steps"]):
        img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T  # (images, captions)
        same = (labels[:, None] == text_labels[None, :]).float()
        loss = F.cross_entropy(logits, same / same.sum(1, keepdim=True)) + F.cross_entropy(
            logits.T, same.T / same.T.sum(1, keepdim=True)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _clip(config: dict):
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(config["seed"])
    cfg = CLIPConfig(
        text_config=config["text_config"],
        vision_config=config["vision_config"],
        projection_dim=config["projection_dim"],
    )
    model = CLIPModel(cfg)
    processor = _processor(config)
    _fit(model, processor, config)
    return model, processor


def _build_clip(config: dict, out_dir: Path) -> None:
    model, processor = _clip(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def _build_aesthetic(config: dict, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPProcessor

    # Its CLIP is tiny-clip's, fitted once (config["clip"] is CLIP_CONFIG, hashed into the key).
    fitted = build_tiny_clip()
    model = CLIPModel.from_pretrained(fitted, use_safetensors=True)
    processor = CLIPProcessor.from_pretrained(fitted)
    model.save_pretrained(out_dir / "clip", safe_serialization=True)
    processor.save_pretrained(out_dir / "clip")
    with torch.no_grad():
        ends = colour_images()
        names = [n for n, _ in COLOURS]
        dark, bright = ends[names.index("black")], ends[names.index("white")]
        pixels = processor(images=[dark, bright], return_tensors="pt")["pixel_values"]
        emb = torch.nn.functional.normalize(
            model.get_image_features(pixel_values=pixels).pooler_output, dim=-1
        )
    u = torch.nn.functional.normalize(emb[1] - emb[0], dim=0)
    lo, hi = float(emb[0] @ u), float(emb[1] @ u)
    want = config["scores"]
    a = (want["bright"] - want["dark"]) / (hi - lo)
    dims = config["head"]
    tensors = {}
    for i, key in enumerate(HEAD_KEYS):  # a chain carrying u . e through unit 0 of each layer
        w = torch.zeros(dims[i + 1], dims[i])
        b = torch.zeros(dims[i + 1])
        if i == 0:
            w[0] = u
        else:
            w[0, 0] = 1.0
        if i == len(HEAD_KEYS) - 1:
            w[0, 0] = a
            b[0] = want["dark"] - a * lo
        tensors[f"{key}.weight"], tensors[f"{key}.bias"] = w.contiguous(), b
    save_file(tensors, str(out_dir / "model.safetensors"))


def build_tiny_clip() -> Path:
    """The tiny CLIP directory (CLIPModel + CLIPProcessor; built on first use, then cached)."""
    return build_cached("tiny-clip", CLIP_CONFIG, _build_clip)


def build_tiny_aesthetic() -> Path:
    """The tiny aesthetic predictor: model.safetensors (the head) beside clip/ (its CLIP)."""
    return build_cached("tiny-aesthetic", AESTHETIC_CONFIG, _build_aesthetic)


HPS_CONFIG: dict = {"builder": 1, "clip": CLIP_CONFIG}


def _open_clip_state(state: dict) -> dict:
    """transformers CLIPModel weights under open_clip's names (the layout of HPSv2's checkpoint:
    fused q/k/v in_proj, projections as (width, dim) matrices), written out here independently
    of the scorer's reverse mapping so that the test checks one against the other."""
    import torch

    top = {
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm": "visual.ln_pre",
        "vision_model.post_layernorm": "visual.ln_post",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm": "ln_final",
        "logit_scale": "logit_scale",
    }
    out: dict = {
        "visual.proj": state["visual_projection.weight"].T.contiguous(),
        "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    for key, value in state.items():
        for hf, oc in top.items():
            if key == hf or key.startswith(hf + "."):
                out[oc + key[len(hf) :]] = value
        for tower, prefix in (
            ("vision_model", "visual.transformer"),
            ("text_model", "transformer"),
        ):
            head = f"{tower}.encoder.layers."
            if not key.startswith(head):
                continue
            i, _, rest = key[len(head) :].partition(".")
            block = f"{prefix}.resblocks.{i}."
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                parts = [state[f"{head}{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{block}attn.in_proj_{kind}"] = torch.cat(parts).contiguous()
            elif not rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                rest = rest.replace("self_attn.out_proj", "attn.out_proj")
                rest = rest.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                rest = rest.replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")
                out[block + rest] = value
    return out


def _build_hps(config: dict, out_dir: Path) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPProcessor

    fitted = build_tiny_clip()  # its CLIP is tiny-clip's (config["clip"] is CLIP_CONFIG)
    model = CLIPModel.from_pretrained(fitted, use_safetensors=True)
    save_file(_open_clip_state(model.state_dict()), str(out_dir / "open_clip_model.safetensors"))
    model.config.save_pretrained(out_dir)
    CLIPProcessor.from_pretrained(fitted).save_pretrained(out_dir)


def build_tiny_hps() -> Path:
    """Tiny HPSv2: tiny-clip's weights in open_clip's layout (open_clip_model.safetensors) beside
    the transformers config and processor they load into."""
    return build_cached("tiny-hps", HPS_CONFIG, _build_hps)
