"""`artloop rounds ROUNDS.toml`: ArtAug's iterated enhancement (experiments/rounds.py): each
round collects loop sessions on the base model with the earlier rounds' LoRAs, exports the kept
ones, trains a LoRA and evaluates base + LoRAs against the round before. Resumable."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Annotated

import typer
from artloop.cli.batch import _ctrl_c_stops
from artloop.cli.common import HomeOpt, QuietOpt, err, failing, quiet_libraries, read_config
from artloop.cli.experiment import column_progress
from artloop.config import ConfigError
from artloop.experiments.rounds_schema import rounds_guide
from artloop.experiments.schema import ExperimentError
from rich.markup import escape

EXAMPLE = """\
name = "shapes-rounds"
rounds = 2
scorers = ["shapes"]
[base.diffusion]
model = "tiny-shapes-sd"
[collect]
seeds = [1000]
[collect.prompts]
set = "shapes-train"
limit = 24
[filter]
accepted_only = true
[train.sft]
train_steps = 200
[eval]
seeds = [0, 1]
[eval.prompts]
set = "shapes"
limit = 12"""

# Escaped: the help is rich markup, where [collect] would be a style tag.
HELP = escape(
    "ArtAug's rounds: for each round, collect sessions with the loop on the base model and "
    "every earlier round's LoRA, keep the ones [filter] keeps, export them (sft), train a LoRA "
    "(sft --differential when the trainer has it), then draw base + the LoRAs so far with no "
    "loop on held-out prompts and seeds and compare it with the round before, by scorers the "
    "loop does not see. OUT/round-N/ keeps each round's export, LoRA, training summary and "
    "evaluation (each an experiment directory: `artloop show RUN --home OUT/round-N`); "
    "OUT/rounds.md (and .json) is the rounds table. Resumable: run it again after a crash or "
    "Ctrl-C; a finished stage is not redone, a finished round not touched. The ROUNDS file, "
    "every field:\n\n"
    + "\n\n".join(f"  {line}" for line in rounds_guide().splitlines())
    + "\n\nFor example:\n\n\b\n"
    + EXAMPLE
)


def rounds(
    file: Annotated[Path, typer.Argument(help="The ROUNDS file (TOML)", metavar="ROUNDS.toml")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Its directory (default HOME/rounds/NAME)"),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=1024, help="Sessions at once (the file's otherwise)")
    ] = None,
    stop_after: Annotated[
        int | None,
        typer.Option(
            "--stop-after", min=1, help="Stop once this round is done (run again to go on)"
        ),
    ] = None,
    home: HomeOpt = None,
    quiet: QuietOpt = False,
) -> None:
    # deliberately lazy (startup time): the graphs, the models, the trainers
    from artloop.experiments.rounds import check_rounds, load_rounds, run_rounds
    from artloop.graphs.runner import CheckpointerError
    from artloop.models.chat import check_chat_model
    from artloop.rewards.registry import configure_scorers
    from artloop.tools.diffusion import DiffusionError
    from artloop.trainers.common import TrainerConfigError

    home_dir = read_config(None, {"home": home}, create_home=False).home
    with failing(ExperimentError, ConfigError, DiffusionError):
        found = load_rounds(file, home_dir, out)
        for exp in found.experiments:
            if concurrency is not None:
                exp.spec.concurrency = concurrency
        first = found.experiments[0].configs["loop"]
        configure_scorers(first.scorers, first.chat)  # the evaluation scorers' settings
        check_chat_model(first.chat)
        check_rounds(found)  # before any model is built or anything written
        quiet_libraries()
        import datasets  # deliberately lazy (startup time): the trainer reads its export

        datasets.disable_progress_bars()
    stop = threading.Event()
    bar, show, log = column_progress(quiet)

    with (
        bar,
        failing(CheckpointerError, ExperimentError, DiffusionError, TrainerConfigError),
        _ctrl_c_stops(stop),
    ):
        result = asyncio.run(
            run_rounds(found, stop=stop, stop_after=stop_after, on_progress=show, log=log)
        )
    print(json.dumps(result))
    if stop.is_set():
        err.print("interrupted: run the same command again to continue", soft_wrap=True)
        raise typer.Exit(130)
    if not quiet and (table := found.directory / "rounds.md").is_file():
        err.print(table.read_text(), soft_wrap=True, markup=False)
    if result["done"] < result["rounds"]:
        err.print(
            f"stopped after round {result['done']} of {result['rounds']}: run the same command "
            "again to continue",
            soft_wrap=True,
        )
