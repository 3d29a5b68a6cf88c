"""`artloop export`: finished runs as a training dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from artloop.cli.common import ConfigOpt, HomeOpt, JsonOpt, existing_store, failing


def export(
    out_dir: Annotated[Path, typer.Argument(help="Output directory (outside the home)")],
    fmt: Annotated[str, typer.Option("--format", help="sft | dpo | prompts | raw")],
    accepted_only: Annotated[bool, typer.Option(help="Only runs the validator accepted")] = False,
    min_gain: Annotated[
        float | None, typer.Option(help="Best score minus first score, at least")
    ] = None,
    top_fraction: Annotated[
        float | None, typer.Option(help="Keep this fraction of runs by gain (0-1]")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Created at or after (ISO date)")] = None,
    until: Annotated[str | None, typer.Option(help="Created before (ISO date)")] = None,
    run: Annotated[list[str] | None, typer.Option("--run", help="Only this run (repeat)")] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Only runs with this tag (repeat: all)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier artloop export in OUT_DIR (nothing else)")
    ] = False,
    home: HomeOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export finished runs as a training dataset (Hugging Face parquet, imagefolder, jsonl)."""
    # deliberately lazy (startup time): the store, parquet and images
    from artloop.store.export import ExportError, ExportFilters, export_dataset, parse_when

    with failing(ExportError):
        filters = ExportFilters(
            accepted_only=accepted_only,
            min_gain=min_gain,
            top_fraction=top_fraction,
            since=parse_when(since),
            until=parse_when(until),
            run_ids=tuple(run or ()),
            tags=tuple(tag or ()),
        )
        result = export_dataset(
            existing_store(home, config), out_dir, fmt, filters, overwrite=overwrite
        )
    if as_json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"exported {result.rows} {fmt} row(s) from {result.runs_kept} run(s): {result.path}")
