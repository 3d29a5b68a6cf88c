"""What the LoRA trainers share: config files and the CLI generated from a config dataclass,
the base pipeline, the LoRA adapter, and checkpoints (safetensors + JSON: no pickles)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

if TYPE_CHECKING:  # torch is imported where it runs: the CLI starts without it
    import torch


C = TypeVar("C")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class TrainerConfigError(ValueError):
    """A trainer config value is invalid; the message names the field."""


def help_field(default: Any = dataclasses.MISSING, *, help: str, **kw: Any) -> Any:
    """A dataclass field that carries its help text (shown by the generated CLI)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def load_trainer_config(cls: type[C], path: str | Path | None, overrides: dict[str, Any]) -> C:
    """`cls` from a TOML file (top-level keys = field names), overridden by non-None flags."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise TrainerConfigError(f"cannot read trainer config {path}: {e}") from None
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - names):
        raise TrainerConfigError(f"unknown {cls.__name__} field(s) in {path}: {', '.join(unknown)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**data)
    except TypeError as e:  # a missing required field
        raise TrainerConfigError(f"{cls.__name__}: {e}") from None


def typer_command(cls: type[C], run: Callable[[C], Any]) -> Callable[..., Any]:
    """A Typer command whose options are `cls`'s fields (with their help), plus --config."""
    import typer

    hints = typing.get_type_hints(cls)
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
              annotation=Annotated[Path | None, typer.Option(help="TOML file with these fields")])]  # fmt: skip
    for f in dataclasses.fields(cls):
        option = typer.Option(help=f.metadata.get("help", ""), show_default=False)
        kind = hints[f.name]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))  # fmt: skip

    def command(**kwargs: Any) -> Any:
        try:
            cfg = load_trainer_config(cls, kwargs.pop("config"), kwargs)
        except TrainerConfigError as e:  # one clear line and exit 2, like every bad input
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        return run(cfg)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = cls.__doc__
    command.__name__ = cls.__name__.lower()
    return command


# --- LoRA ---------------------------------------------------------------------------------------
def add_lora(unet: torch.nn.Module, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Freeze `unet`, add a trainable LoRA to its attention projections; its parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))  # fmt: skip
    return [p for p in unet.parameters() if p.requires_grad]


def save_lora(pipeline_cls: type, unet: torch.nn.Module, out_dir: Path) -> Path:
    """Save the adapter in diffusers' format: `pipe.load_lora_weights(out_dir)` loads it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline_cls.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
    return out_dir / "pytorch_lora_weights.safetensors"


def fuse_preset_lora(pipe: Any, preset: str) -> None:
    """ArtAug's differential training: fold a preset LoRA into the base weights, so that the
    LoRA trained on top learns only the difference (and is used alone at inference)."""
    pipe.load_lora_weights(preset, adapter_name="preset")
    pipe.fuse_lora(adapter_names=["preset"])
    pipe.unload_lora_weights()


# --- checkpoints (safetensors + JSON) -------------------------------------------------------------
def save_checkpoint(ckpt: Path, step: int, unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict | None = None) -> None:  # fmt: skip
    """LoRA weights, optimizer state and the step, written atomically (a dir renamed in place)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()},
              tmp / "lora.safetensors")  # fmt: skip
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "optimizer.safetensors")
    meta = {"step": step, "param_groups": state["param_groups"], **(extra or {})}
    (tmp / "state.json").write_text(json.dumps(meta))
    old = ckpt.with_name(ckpt.name + ".old")
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    if old.exists():
        import shutil

        shutil.rmtree(old)


def load_checkpoint(ckpt: Path, unet: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what save_checkpoint wrote; returns its JSON (with "step")."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(unet, load_file(ckpt / "lora.safetensors"))
    meta = json.loads((ckpt / "state.json").read_text())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(ckpt / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta
