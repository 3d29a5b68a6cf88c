"""`artloop train ...`: one command per trainer, generated from its config dataclass."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from artloop.trainers.common import TrainerConfigError, typer_command
from artloop.trainers.ddpo import DDPOConfig
from artloop.trainers.dpo import DPOConfig
from artloop.trainers.evaluate import EvalConfig
from artloop.trainers.sft import SFTConfig

train_app = typer.Typer(help="LoRA trainers on exported trajectories.", no_args_is_help=True)


def _runner(train: Callable[[Any], dict]) -> Callable[[Any], None]:
    """Run a trainer; its errors become one `error:` line and exit 2; print its summary."""

    def run(cfg: Any) -> None:
        from artloop.cli import fail, quiet_libraries
        from artloop.tools.diffusion import DiffusionError

        quiet_libraries()
        try:
            summary = train(cfg)
        except (TrainerConfigError, DiffusionError) as e:
            fail(str(e))
        if summary.get("main_process", True):  # under torchrun / accelerate: one line, not N
            print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "losses")}))

    return run


def _sft(cfg: SFTConfig) -> dict:
    from artloop.trainers.sft import train_sft

    return train_sft(cfg)


def _dpo(cfg: DPOConfig) -> dict:
    from artloop.trainers.dpo import train_dpo

    return train_dpo(cfg)


def _ddpo(cfg: DDPOConfig) -> dict:
    from artloop.trainers.ddpo import train_ddpo

    return train_ddpo(cfg)


def _eval(cfg: EvalConfig) -> dict:
    from artloop.trainers.evaluate import evaluate

    summary = evaluate(cfg)
    print((Path(cfg.output_dir) / "results.md").read_text(), file=sys.stderr)
    return {"output_dir": cfg.output_dir, "models": list(summary["results"])}


eval_command = typer_command(EvalConfig, _runner(_eval))
train_app.command("sft")(typer_command(SFTConfig, _runner(_sft)))
train_app.command("dpo")(typer_command(DPOConfig, _runner(_dpo)))
train_app.command("ddpo")(typer_command(DDPOConfig, _runner(_ddpo)))
