"""The root `artloop` command: mounts the command modules of this folder (none imports it)."""

from __future__ import annotations

import typer
from artloop.cli import (
    batch,
    doctor,
    experiment,
    export,
    models,
    rounds,
    runs,
    serve,
    session,
    train,
)
from artloop.cli.common import Commands, DebugOpt

app = typer.Typer(
    help="Improve text-to-image models with AI feedback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=Commands,
)


@app.callback()
def _options(debug: DebugOpt = False) -> None:
    pass  # read by Commands.invoke


# In this order in `artloop --help` (the commands, then the groups).
app.command("batch")(batch.batch)
app.command("eval")(train.eval_command)
app.command("run")(runs.run)
app.command("resume")(runs.resume)
app.command("show")(runs.show)
app.command("export")(export.export)
app.command("list")(runs.list_runs)
app.command("doctor")(doctor.doctor)
app.command(
    "rounds",
    help=rounds.HELP,
    short_help="ArtAug's rounds: collect, train a LoRA, evaluate; the next round draws with it",
)(rounds.rounds)
app.add_typer(models.app, name="models")
app.add_typer(serve.app, name="serve")
app.add_typer(train.app, name="train")
app.add_typer(session.app, name="session")
app.add_typer(experiment.app, name="experiment")


def main() -> None:  # pragma: no cover
    app(prog_name="artloop")
