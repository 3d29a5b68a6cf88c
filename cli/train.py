"""`artloop train sft|dpo|ddpo` and `artloop eval`: one command per trainer, generated from its
config dataclass (trainers/common.py's typer_command)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from artloop.cli.common import fail, quiet_libraries

# The commands are generated from the trainers' config dataclasses, so these modules load with
# the CLI (`artloop --help`): they keep torch and the pipelines inside their functions.
from artloop.trainers.common import TrainerConfigError, typer_command
from artloop.trainers.ddpo import DDPOConfig, train_ddpo
from artloop.trainers.dpo import DPOConfig, train_dpo
from artloop.trainers.evaluate import EvalConfig, evaluate
from artloop.trainers.sft import SFTConfig, train_sft

app = typer.Typer(help="LoRA trainers on exported trajectories.", no_args_is_help=True)


def _runner(train: Callable[[Any], dict]) -> Callable[[Any], None]:
    """Run a trainer; its errors become one `error:` line and exit 2; print its summary."""

    def run(cfg: Any) -> None:
        from artloop.tools.diffusion import DiffusionError  # deliberately lazy (startup time)

        quiet_libraries()
        try:
            summary = train(cfg)
        except (TrainerConfigError, DiffusionError) as e:
            fail(str(e))
        if summary.get("main_process", True):  # under torchrun / accelerate: one line, not N
            print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "losses")}))

    return run


def _eval(cfg: EvalConfig) -> dict:
    summary = evaluate(cfg)
    print((Path(cfg.output_dir) / "results.md").read_text(), file=sys.stderr)
    return {"output_dir": cfg.output_dir, "models": list(summary["results"])}


eval_command = typer_command(EvalConfig, _runner(_eval))
app.command("sft")(typer_command(SFTConfig, _runner(train_sft)))
app.command("dpo")(typer_command(DPOConfig, _runner(train_dpo)))
app.command("ddpo")(typer_command(DDPOConfig, _runner(train_ddpo)))
