"""The CLIP-family scorers: `clip` (CLIP score), `aesthetic` (LAION aesthetic predictor v2) and
`pickscore` (PickScore v1). Each loads its weights (safetensors only) once per process, on first
call, on `scorer_device()`, in batches of `scorers.batch_size`; each records the weights it used
(`Reward.identity()["model"]`: id, revision, sha256 of the safetensors files).

- clip: 100 x cosine(image, caption) of CLIP's projected embeddings, clipped at 0 (torchmetrics'
  CLIPScore definition, computed here: its feature code expects transformers 4's tensors).
  Default weights openai/clip-vit-large-patch14. Range (0, 100).
- aesthetic: CLIP ViT-L/14's L2-normalised image embedding into LAION's linear MLP head
  (768-1024-128-64-16-1). The model id names a directory with the head as safetensors (keys
  layers.{0,2,4,6,7}.{weight,bias}, as in sac+logos+ava1-l14-linearMSE.pth) and, optionally, its
  CLIP in clip/; without one, the CLIP is `scorers.models.aesthetic_clip` (default
  openai/clip-vit-large-patch14). Default head ttj/sac-logos-ava1-l14-linearMSE (the .pth's
  safetensors variant). Range (1, 10).
- pickscore: logit_scale.exp() x cosine (PickScore v1 is a fine-tuned CLIP ViT-H/14, logit scale
  100). Default yuvalkirstain/PickScore_v1 with the processor of its base model,
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K (`scorers.models.pickscore_processor`), unless the model
  directory has its own. Range (0, 100) (a negative cosine, never seen in practice, would go below).
"""

from __future__ import annotations

# Deliberately lazy: torch and transformers are imported inside the loaders and scorers, so that
# importing this module (registering the scorers) loads neither.
import functools
import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
from artloop.rewards.registry import reward, scorer_device, scorer_model, scorers_config
from PIL import Image

CLIP_ID = "openai/clip-vit-large-patch14"
AESTHETIC_ID = "ttj/sac-logos-ava1-l14-linearMSE"
PICKSCORE_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_HEAD_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LOAD_LOCK = threading.Lock()  # sessions score from threads: each model loads once


def _resolve(name: str, default_id: str) -> tuple[str, str]:
    """(model id, local directory or hub id to load) for scorer `name`."""
    from artloop.models.tiny import resolve_model

    model_id = scorer_model(name, default_id)
    return model_id, resolve_model(model_id)


def require_safetensors(path: str) -> None:
    """A directory whose weights are only pickles (.bin/.pt/.pth): one-line ValueError."""
    root = Path(path)
    if not root.is_dir() or any(root.rglob("*.safetensors")):
        return
    pickles = sorted(p for p in root.rglob("*") if p.suffix in _PICKLES)
    if pickles:
        raise ValueError(
            f"{pickles[0]}: weights in a pickle file; safetensors is required (artloop never "
            "loads pickles: convert it to .safetensors)"
        )


@functools.cache
def _identity(model_id: str, path: str) -> dict[str, Any]:
    """The weights' identity: id, revision (the hub snapshot's commit, else 'local'), sha256
    (first 16 hex) over the safetensors files below `path`, in path order."""
    root = Path(path)
    digest = hashlib.sha256()
    files = sorted(root.rglob("*.safetensors")) if root.is_dir() else []
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    parts = root.parts
    revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else "local"
    return {
        "id": model_id,
        "revision": revision,
        "sha256": digest.hexdigest()[:16] if files else None,
    }


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, dtype)


@functools.cache
def _load_clip(path: str, processor_path: str, device: str, dtype: str):
    """(CLIPModel, processor) from `path`, in eval mode on `device`."""
    from transformers import AutoProcessor, CLIPModel

    require_safetensors(path)
    model = CLIPModel.from_pretrained(path, use_safetensors=True, dtype=_torch_dtype(dtype))
    return model.to(device).eval(), AutoProcessor.from_pretrained(processor_path)


def _features(out):
    """transformers 5 returns a model output (its pooler_output the projection), 4 a tensor."""
    return getattr(out, "pooler_output", out)


def _cosines(model, processor, images, prompts, device: str, dtype: str) -> np.ndarray:
    """cosine(image i, prompt i) for each i, in batches of scorers.batch_size."""
    import torch

    size = scorers_config().batch_size
    out: list[np.ndarray] = []
    max_len = model.config.text_config.max_position_embeddings
    for i in range(0, len(images), size):
        ims = [im.convert("RGB") for im in images[i : i + size]]
        pixels = processor(images=ims, return_tensors="pt")["pixel_values"]
        text = processor(
            text=list(prompts[i : i + size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_len,
        )
        with torch.no_grad():
            img = _features(
                model.get_image_features(pixel_values=pixels.to(device, _torch_dtype(dtype)))
            )
            txt = _features(
                model.get_text_features(
                    input_ids=text["input_ids"].to(device),
                    attention_mask=text["attention_mask"].to(device),
                )
            )
            img = torch.nn.functional.normalize(img.float(), dim=-1)
            txt = torch.nn.functional.normalize(txt.float(), dim=-1)
            out.append((img * txt).sum(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# --- clip ---------------------------------------------------------------------------------------
def _clip_identity() -> dict[str, Any]:
    return _identity(*_resolve("clip", CLIP_ID))


@reward("clip", range=(0.0, 100.0), model=_clip_identity)
def clip_score(
    images: list[Image.Image], prompts: list[str], metadata: list[dict]
) -> tuple[np.ndarray, dict[str, Any]]:
    """CLIP score: max(100 x cosine(image, prompt), 0) per image."""
    model_id, path = _resolve("clip", CLIP_ID)
    device, dtype = scorer_device()
    with LOAD_LOCK:
        model, processor = _load_clip(path, path, device, dtype)
    scores = np.maximum(100.0 * _cosines(model, processor, images, prompts, device, dtype), 0.0)
    return scores.astype(np.float32), {"model": model_id}


# --- pickscore ----------------------------------------------------------------------------------
def _pickscore_paths() -> tuple[str, str, str]:
    model_id, path = _resolve("pickscore", PICKSCORE_ID)
    if any(
        (Path(path) / f).exists() for f in ("preprocessor_config.json", "processor_config.json")
    ):
        return model_id, path, path
    return model_id, path, _resolve("pickscore_processor", PICKSCORE_PROCESSOR_ID)[1]


def _pickscore_identity() -> dict[str, Any]:
    model_id, path, _ = _pickscore_paths()
    return _identity(model_id, path)


@reward("pickscore", range=(0.0, 100.0), model=_pickscore_identity)
def pickscore(
    images: list[Image.Image], prompts: list[str], metadata: list[dict]
) -> tuple[np.ndarray, dict[str, Any]]:
    """PickScore: logit_scale.exp() x cosine(image, prompt) per image."""
    model_id, path, processor_path = _pickscore_paths()
    device, dtype = scorer_device()
    with LOAD_LOCK:
        model, processor = _load_clip(path, processor_path, device, dtype)
    scale = float(model.logit_scale.detach().exp())
    scores = scale * _cosines(model, processor, images, prompts, device, dtype)
    return scores.astype(np.float32), {"model": model_id, "logit_scale": scale}


# --- aesthetic ----------------------------------------------------------------------------------
def _aesthetic_paths() -> tuple[str, str, str, str]:
    """(head id, head dir, CLIP id, CLIP dir)."""
    head_id, head = _resolve("aesthetic", AESTHETIC_ID)
    if (Path(head) / "clip" / "config.json").exists():
        return head_id, head, f"{head_id}/clip", str(Path(head) / "clip")
    return head_id, head, *_resolve("aesthetic_clip", CLIP_ID)


def _aesthetic_identity() -> dict[str, Any]:
    head_id, head, clip_id, clip = _aesthetic_paths()
    identity = _identity(head_id, head)
    if not clip.startswith(head):  # its CLIP lives apart: record that too
        identity = {**identity, "clip": _identity(clip_id, clip)}
    return identity


@functools.cache
def _load_aesthetic(head: str, clip: str, device: str, dtype: str):
    """(CLIPModel, processor, head: torch.nn.Sequential) on `device`. The whole CLIPModel, not
    CLIPVisionModelWithProjection: that one reads projection_dim from vision_config, which
    CLIPModel configs need not set (a mismatch would re-initialise the projection)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoProcessor, CLIPModel

    require_safetensors(head)
    require_safetensors(clip)
    files = sorted(Path(head).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{head}: no aesthetic head (*.safetensors) in this directory")
    state = load_file(str(files[0]))
    missing = [k for k in AESTHETIC_HEAD_KEYS if f"{k}.weight" not in state]
    if missing:
        raise ValueError(f"{files[0]}: not LAION's aesthetic head (no {missing[0]}.weight)")
    layers = []
    for i, key in enumerate(AESTHETIC_HEAD_KEYS):
        out_dim, in_dim = state[f"{key}.weight"].shape
        layers.append(torch.nn.Linear(in_dim, out_dim))
        if i < 3:
            layers.append(torch.nn.Dropout(0.0))  # keeps the .pth's layer numbering
    mlp = torch.nn.Sequential()
    mlp.add_module("layers", torch.nn.Sequential(*layers))
    mlp.load_state_dict(state)
    vision = CLIPModel.from_pretrained(clip, use_safetensors=True, dtype=_torch_dtype(dtype))
    return (
        vision.to(device).eval(),
        AutoProcessor.from_pretrained(clip),
        mlp.to(device, torch.float32).eval(),
    )


@reward("aesthetic", range=(1.0, 10.0), model=_aesthetic_identity)
def aesthetic(
    images: list[Image.Image], prompts: list[str], metadata: list[dict]
) -> tuple[np.ndarray, dict[str, Any]]:
    """LAION aesthetic v2: the head on CLIP's L2-normalised image embedding (prompts unused)."""
    import torch

    head_id, head, _, clip = _aesthetic_paths()
    device, dtype = scorer_device()
    with LOAD_LOCK:
        vision, processor, mlp = _load_aesthetic(head, clip, device, dtype)
    size = scorers_config().batch_size
    out: list[np.ndarray] = []
    for i in range(0, len(images), size):
        ims = [im.convert("RGB") for im in images[i : i + size]]
        pixels = processor(images=ims, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            emb = _features(
                vision.get_image_features(pixel_values=pixels.to(device, _torch_dtype(dtype)))
            )
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
            out.append(mlp(emb)[:, 0].cpu().numpy())
    scores = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
    return scores.astype(np.float32), {"model": head_id}
