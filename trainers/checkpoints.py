"""Training checkpoints, safetensors + JSON, never a pickle: `checkpoint-{step}` directories
as diffusers' examples name them, each written whole then renamed in place.

Not accelerate's save_state / load_state: those write the optimizer, the LR schedule and the RNG
states with torch.save and read them back with torch.load, i.e. unpickle them (weights_only
narrows what unpickling may build; it is still a pickle). Here the LoRA and AdamW's moments are
safetensors, and the step, AdamW's param groups and the schedule's state (plain numbers) JSON.
"""

from __future__ import annotations

# Deliberately lazy: torch, peft and safetensors are imported inside the functions that use them.
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CHECKPOINT = "checkpoint-"  # checkpoint-{step}, as diffusers' examples name them


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoint-{step} directories under `out`, oldest first (a save cut short
    is a checkpoint-{step}.tmp directory, never one of these)."""
    found = []
    for path in out.glob(f"{CHECKPOINT}*"):
        step = path.name.removeprefix(CHECKPOINT)
        if step.isdigit() and (path / "state.json").is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def prune_checkpoints(out: Path, limit: int) -> None:
    """Remove the oldest checkpoints beyond the `limit` newest (0: keep all)."""
    import shutil

    if limit:
        for old in checkpoints(out)[:-limit]:
            shutil.rmtree(old)


def save_checkpoint(
    ckpt: Path,
    step: int,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any = None,
    extra: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """LoRA weights and AdamW's moments (safetensors), the step, AdamW's param groups, the LR
    schedule's state and the trainer's `extra` (JSON), the trainer's `tensors` (safetensors):
    written whole to a .tmp directory, then renamed in place."""
    import shutil

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():  # what a save cut short left
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()},
        tmp / "lora.safetensors",
    )
    state = optimizer.state_dict()
    moments = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    save_file({k: v.contiguous() for k, v in moments.items()}, tmp / "optimizer.safetensors")
    if tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / EXTRA)
    meta = {
        "step": step,
        "param_groups": state["param_groups"],
        # a LambdaLR's state: its step count, base and last rates (its lambdas are code)
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "extra": extra or {},
    }
    (tmp / "state.json").write_text(json.dumps(meta))
    old = ckpt.with_name(ckpt.name + ".old")
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    if old.exists():
        shutil.rmtree(old)


EXTRA = "extra.safetensors"


def load_checkpoint(
    ckpt: Path, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore what save_checkpoint wrote; returns its JSON (with "step" and the trainer's
    "extra") and the trainer's tensors."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(unet, load_file(ckpt / "lora.safetensors"))
    meta = json.loads((ckpt / "state.json").read_text())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(ckpt / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if lr_scheduler is not None and meta.get("lr_scheduler"):
        lr_scheduler.load_state_dict(meta["lr_scheduler"])
    tensors = load_file(ckpt / EXTRA) if (ckpt / EXTRA).is_file() else {}
    return meta, tensors
