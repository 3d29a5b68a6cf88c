"""`artloop train ...`: one command per trainer, generated from its config dataclass."""

from __future__ import annotations

import json
from typing import Any

import typer
from artloop.trainers.common import TrainerConfigError, typer_command
from artloop.trainers.sft import SFTConfig

train_app = typer.Typer(help="LoRA trainers on exported trajectories.", no_args_is_help=True)


def _run_sft(cfg: SFTConfig) -> Any:
    from artloop.cli import fail, quiet_libraries
    from artloop.tools.diffusion import DiffusionError
    from artloop.trainers.sft import train_sft

    quiet_libraries()
    try:
        summary = train_sft(cfg)
    except (TrainerConfigError, DiffusionError) as e:
        fail(str(e))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))


train_app.command("sft")(typer_command(SFTConfig, _run_sft))
