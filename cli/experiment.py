"""`artloop experiment run|report|compare`: variants of the loop and the baseline on a prompt
set over seeds, scored and compared (experiments/). The group's help lists every field of the
experiment file, from the schema's descriptions."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from artloop.cli.batch import _ctrl_c_stops
from artloop.cli.common import (
    HomeOpt,
    JsonOpt,
    QuietOpt,
    err,
    fail,
    failing,
    quiet_libraries,
    read_config,
)
from artloop.config import ConfigError
from artloop.experiments.schema import ExperimentError, field_guide
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

EXAMPLE = """\
name = "critics"
seeds = [0, 1]
scorers = ["shapes"]
[prompts]
set = "shapes"
limit = 6
[base.diffusion]
model = "tiny-shapes-sd"
[variants.full]
[variants.no_concept]
loop = {critics = ["data_cot", "thesis_cot"]}
[variants.merged]
loop = {critics = "merged"}"""

FIELDS = (
    "The experiment file (TOML), every field:\n\n"
    + "\n\n".join(f"  {line}" for line in field_guide().splitlines())
    + "\n\nFor example:\n\n\b\n"
    + EXAMPLE
)
# Escaped: the help is rich markup, where [prompts] would be a style tag.
HELP = escape(
    "Loop variants and the baseline (the base model's first image, no loop) on a prompt set "
    "over seeds, scored by evaluation scorers and compared pair by pair.\n\n" + FIELDS
)
RUN_HELP = escape(
    "Run every (variant, prompt, seed) and the baseline, score them, write the report. "
    "Resumable: run it again after a crash or Ctrl-C; finished runs are skipped.\n\n" + FIELDS
)

app = typer.Typer(help=HELP, no_args_is_help=True)
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="The experiment's directory (default HOME/experiments/NAME)"),
]


def column_progress(quiet: bool) -> tuple[Progress, Callable, Callable[[str], None]]:
    """A bar per column (its sessions done of all, skipped and failed: `show(column, r)`), and
    `log(line)` printing above the bars (a stage's news); nothing shown with `quiet`."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
    )
    tasks: dict[str, TaskID] = {}

    def show(column: str, r) -> None:
        if column not in tasks:
            tasks[column] = bar.add_task(column, total=r.total, stats="")
        bar.update(
            tasks[column],
            completed=r.done + r.skipped + r.failed + r.interrupted,
            stats=f"skipped {r.skipped} failed {r.failed}",
        )

    def log(line: str) -> None:
        if not quiet:
            bar.console.print(escape(line), soft_wrap=True)

    return bar, show, log


def _counts(summary: dict) -> dict:
    """A column's batch summary with its first errors only (the store has them all)."""
    errors = summary.pop("errors")
    return summary | {"errors": dict(list(errors.items())[:3])}


def _home(home: str | None) -> Path:
    """The artloop home (--home, ARTLOOP_HOME, the default), not created here."""
    return read_config(None, {"home": home}, create_home=False).home


def _directory(experiment: str, home: str | None, out: Path | None) -> Path:
    """An experiment's directory from a directory, an experiment file or a name."""
    from artloop.experiments.spec import experiment_dir, parse_file  # deliberately lazy

    path = Path(experiment).expanduser()
    if out is not None:
        return out
    if path.is_dir():
        return path
    if path.is_file():
        with failing(ExperimentError):
            return experiment_dir(parse_file(path).name, _home(home))
    return experiment_dir(experiment, _home(home))


@app.command("run", help=RUN_HELP)
def run(
    experiment: Annotated[Path, typer.Argument(help="The experiment file (TOML)")],
    out: OutOpt = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=1024, help="Sessions at once (the file's otherwise)")
    ] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Run and score only")] = False,
    home: HomeOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run an experiment (its help is RUN_HELP: every field of the file)."""
    # deliberately lazy (startup time): the graphs, the models and the scorers
    from artloop.experiments.report import write_report
    from artloop.experiments.runner import (
        check_drift,
        contexts,
        prepare,
        run_cells,
        score_cells,
        store_of,
    )
    from artloop.experiments.spec import load_experiment
    from artloop.experiments.training import run_stages
    from artloop.graphs.batch import batch_summary
    from artloop.graphs.runner import CheckpointerError
    from artloop.models.chat import check_chat_model
    from artloop.rewards.registry import configure_scorers
    from artloop.tools.diffusion import DiffusionError

    with failing(ExperimentError, ConfigError, DiffusionError):
        exp = load_experiment(experiment, _home(home), out)
        if concurrency is not None:
            exp.spec.concurrency = concurrency
        first = exp.configs[exp.variants[0]]
        configure_scorers(first.scorers, first.chat)  # the evaluation scorers' settings
        for chat in {
            json.dumps(c.chat.model_dump(mode="json")): c.chat for c in exp.configs.values()
        }.values():
            check_chat_model(chat)
        check_drift(exp)  # before any model is built or anything written
        quiet_libraries()
        if exp.train is not None:  # the trainers read their exports with datasets
            import datasets  # deliberately lazy (startup time)

            datasets.disable_progress_bars()
        ctxs = contexts(exp.configs)
        prepare(exp)
    stop = threading.Event()
    bar, show, log = column_progress(quiet)

    async def stages_then_columns():
        # [train] first (collect, export, train): its LoRA columns draw with what it trained
        trained = await run_stages(exp, ctxs, stop=stop, on_progress=show, log=log)
        return trained, await run_cells(exp, ctxs, stop=stop, on_progress=show)

    with (
        bar,
        failing(CheckpointerError, ExperimentError, DiffusionError),
        _ctrl_c_stops(stop),
    ):
        trained, results = asyncio.run(stages_then_columns())
    summary = {
        "experiment": exp.name,
        "directory": str(exp.directory),
        "columns": {n: _counts(batch_summary(r)) for n, r in results.items()},
    }
    if trained is not None:
        summary["train"] = trained
    if stop.is_set():
        print(json.dumps(summary))
        err.print("interrupted: run the same command again to continue", soft_wrap=True)
        raise typer.Exit(130)
    if not quiet:
        err.print("scoring ...")
    summary["scored"] = score_cells(exp, store_of(exp))
    if not no_report:
        summary["report"] = str(write_report(exp.directory)[0])
    print(json.dumps(summary))
    failed = sum(r.failed for r in results.values())
    if failed:
        err.print(f"{failed} session(s) failed (stored with their errors); run again to retry them")


@app.command("report")
def report(
    experiment: Annotated[str, typer.Argument(help="Its directory, file or name")],
    out: OutOpt = None,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write the report of an experiment as it stands (DIR/report/: index.html, report.md,
    report.json); print its tables (markdown, or JSON with --json)."""
    from artloop.experiments.report import markdown, write_report  # deliberately lazy

    directory = _directory(experiment, home, out)
    with failing(ExperimentError):
        path, result = write_report(directory)
    print(json.dumps(result) if json_out else markdown(result))
    err.print(f"report: {path}", soft_wrap=True)


@app.command("compare")
def compare(
    a: Annotated[str, typer.Argument(help="Experiment A: its directory, file or name")],
    b: Annotated[str, typer.Argument(help="Experiment B: its directory, file or name")],
    home: HomeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Two experiments side by side: every column's mean per shared scorer, and B minus A for
    each column both have, paired over the prompts and seeds both ran."""
    from artloop.experiments.report import compare_experiments, compare_markdown  # lazy

    da, db = _directory(a, home, None), _directory(b, home, None)
    if da.resolve() == db.resolve():
        fail(f"A and B are the same experiment ({da})")
    with failing(ExperimentError):
        result = compare_experiments(da, db)
    print(json.dumps(result) if json_out else compare_markdown(result))
