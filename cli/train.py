"""`artloop train sft|dpo|ddpo` and `artloop eval`: one command per trainer, generated from its
config dataclass by `typer_command` (one option per field, with its help, plus --config)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from artloop.cli.common import fail, quiet_libraries
from artloop.config import ConfigError

# The commands are generated from the trainers' config dataclasses, so these modules load with
# the CLI (`artloop --help`): they keep torch and the pipelines inside their functions.
from artloop.tools.diffusion import DiffusionError
from artloop.trainers.common import TrainerConfigError, load_trainer_config
from artloop.trainers.ddpo import DDPOConfig, train_ddpo
from artloop.trainers.dpo import DPOConfig, train_dpo
from artloop.trainers.evaluate import EvalConfig, evaluate
from artloop.trainers.sft import SFTConfig, train_sft

app = typer.Typer(help="LoRA trainers on exported trajectories.", no_args_is_help=True)
C = TypeVar("C")


def typer_command(cls: type[C], run: Callable[[C], Any]) -> Callable[..., Any]:
    """A Typer command whose options are `cls`'s fields (with their help), plus --config."""
    hints = typing.get_type_hints(cls)
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, typer.Option(help="TOML file with these fields")],
        )
    ]
    for f in dataclasses.fields(cls):
        option = typer.Option(help=f.metadata.get("help", ""), show_default=False)
        kind = hints[f.name]
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[kind | None, option],
            )
        )

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


def _runner(train: Callable[[Any], dict]) -> Callable[[Any], None]:
    """Run a trainer; its errors become one `error:` line and exit 2; print its summary."""

    def run(cfg: Any) -> None:
        quiet_libraries()
        try:
            summary = train(cfg)
        except (TrainerConfigError, DiffusionError, ConfigError) as e:  # ConfigError: ARTLOOP_*
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
