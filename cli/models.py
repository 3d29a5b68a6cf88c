"""`artloop models list`, `build-tiny`, and the shapes world's training: `train-shapes` (all
three models from one seed), `train-shapes-sd`, `train-shapes-inpaint`, `train-shapes-vlm`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from artloop.cli.common import fail, quiet_libraries
from artloop.cli.train import typer_command

# The command is generated from this dataclass: the module keeps torch inside its functions.
from artloop.models.tiny.shapes_sd import ShapesSDTraining, train_shapes_sd
from artloop.trainers.shapes_inpaint import ShapesInpaintTraining
from artloop.trainers.shapes_models import ShapesTraining
from artloop.trainers.shapes_vlm import ShapesVLMTraining
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="The tiny offline models (the embedded default).", no_args_is_help=True)


@app.command("list")
def models_list() -> None:
    """List the tiny models and whether they are built."""
    from artloop.models.tiny import tiny_models  # deliberately lazy (startup time)

    table = Table("name", "kind", "family", "built", "description")
    for m in tiny_models().values():
        table.add_row(m.name, m.kind, m.family, "yes" if m.built() else "no", m.description)
    Console().print(table)


@app.command("build-tiny")
def models_build_tiny(
    names: Annotated[list[str] | None, typer.Argument(help="Default: all")] = None,
) -> None:
    """Build (or find cached) the tiny offline models and print their paths."""
    from artloop.models.tiny import TINY_NAMES, tiny_models  # deliberately lazy (startup time)

    quiet_libraries()
    for name in names or TINY_NAMES:
        if name not in TINY_NAMES:
            fail(f"unknown tiny model {name!r}; choose from {', '.join(TINY_NAMES)}")
        print(f"{name}\t{tiny_models()[name].build()}")


def _train(cfg, train, hidden: tuple[str, ...]) -> None:
    """Check `cfg` (one line, exit 2), train with progress on stderr, print the summary as one
    JSON line on stdout without its `hidden` keys."""
    quiet_libraries()
    try:
        cfg.check()
    except ValueError as e:
        fail(str(e))
    summary = train(cfg, log=lambda line: typer.echo(line, err=True))
    print(json.dumps({k: v for k, v in summary.items() if k not in hidden}))


def _train_shapes(cfg: ShapesTraining) -> None:
    from artloop.trainers.shapes_models import train_shapes  # deliberately lazy (startup)

    _train(cfg, train_shapes, ())


def _train_shapes_sd(cfg: ShapesSDTraining) -> None:
    _train(cfg, train_shapes_sd, ("arch", "training"))


def _train_shapes_inpaint(cfg: ShapesInpaintTraining) -> None:
    from artloop.trainers.shapes_inpaint import train_shapes_inpaint  # deliberately lazy

    _train(cfg, train_shapes_inpaint, ("training",))


def _train_shapes_vlm(cfg: ShapesVLMTraining) -> None:
    from artloop.trainers.shapes_vlm import train_shapes_vlm  # deliberately lazy (startup)

    _train(cfg, train_shapes_vlm, ("arch", "config"))


app.command("train-shapes")(typer_command(ShapesTraining, _train_shapes))
app.command("train-shapes-sd")(typer_command(ShapesSDTraining, _train_shapes_sd))
app.command("train-shapes-inpaint")(typer_command(ShapesInpaintTraining, _train_shapes_inpaint))
app.command("train-shapes-vlm")(typer_command(ShapesVLMTraining, _train_shapes_vlm))
