"""`artloop export`: finished runs as a training dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from artloop.cli.common import (
    ConfigOpt,
    HomeOpt,
    JsonOpt,
    existing_store,
    failing,
    read_config,
)


def export(
    out_dir: Annotated[Path, typer.Argument(help="Output directory (outside the home)")],
    fmt: Annotated[str, typer.Option("--format", help="sft | dpo | prompts | raw")],
    accepted_only: Annotated[bool, typer.Option(help="Only runs the validator accepted")] = False,
    min_gain: Annotated[
        float | None, typer.Option(help="Best score minus first score, at least")
    ] = None,
    top_fraction: Annotated[
        float | None, typer.Option(help="Keep this fraction of runs (0-1], by gain or --by")
    ] = None,
    by: Annotated[
        str | None,
        typer.Option("--by", help="Rank --top-fraction by this scorer's score of the best image"),
    ] = None,
    min_score: Annotated[
        list[str] | None,
        typer.Option(
            "--min-score",
            help="NAME=V: the best image scored by scorer NAME at least V (repeat: all)",
        ),
    ] = None,
    since: Annotated[str | None, typer.Option(help="Created at or after (ISO date)")] = None,
    until: Annotated[str | None, typer.Option(help="Created before (ISO date)")] = None,
    run: Annotated[list[str] | None, typer.Option("--run", help="Only this run (repeat)")] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Only runs with this tag (repeat: all)")
    ] = None,
    pairs: Annotated[
        str,
        typer.Option(
            "--pairs",
            help="dpo pairs: judge (each edit by the judge's verdict, best vs worst step) or "
            "best-worst (--candidates images per prompt, best vs worst by --score)",
        ),
    ] = "judge",
    score: Annotated[
        str | None, typer.Option("--score", help="The scorer --pairs best-worst ranks by")
    ] = None,
    candidates: Annotated[
        int,
        typer.Option(
            "--candidates",
            help="--pairs best-worst: images per prompt (the run's own, then new seeds)",
        ),
    ] = 8,
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
        store = existing_store(home, config)
        filters = ExportFilters(
            accepted_only=accepted_only,
            min_gain=min_gain,
            top_fraction=top_fraction,
            since=parse_when(since),
            until=parse_when(until),
            run_ids=tuple(run or ()),
            tags=tuple(tag or ()),
            min_scores=tuple(parse_min_score(m) for m in min_score or ()),
            top_by=by,
        )
        filters.check()
        check_pairs(fmt, pairs, score, candidates)
        named = filters.scorers() + ([score] if score and pairs == "best-worst" else [])
        scorer = pair_source = pairing = None
        if named:
            from artloop.graphs import scoring  # deliberately lazy (the registry, diffusion)

            scorer = scoring.StoreScorer(store, named)  # an unknown name fails here
        if pairs == "best-worst":
            cfg = read_config(config, {"home": home}, create_home=False)
            tools = scoring.diffusion_tools(store, cfg.diffusion.device)
            pair_source = scoring.best_worst_pairs(scorer, score, candidates, tools)
            pairing = {"pairs": pairs, "score": score, "candidates": candidates}
        result = export_dataset(
            store,
            out_dir,
            fmt,
            filters,
            overwrite=overwrite,
            scorer=scorer,
            scorers=scorer.identities if scorer else None,
            pairs=pair_source,
            pairing=pairing,
        )
    if as_json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"exported {result.rows} {fmt} row(s) from {result.runs_kept} run(s): {result.path}")


def parse_min_score(text: str) -> tuple[str, float]:
    """`NAME=V` (the scorer's name may hold '=': composite:a=0.6,b=0.4=0.5 splits at the last)."""
    from artloop.store.export import ExportError  # deliberately lazy (startup time)

    name, eq, value = text.rpartition("=")
    try:
        least = float(value)
    except ValueError:
        least = None
    if not eq or not name.strip() or least is None:
        raise ExportError(f"--min-score {text!r} is not NAME=V (e.g. aesthetic=5.5)")
    return name.strip(), least


def check_pairs(fmt: str, pairs: str, score: str | None, candidates: int) -> None:
    """--pairs, --score and --candidates go together, with --format dpo."""
    from artloop.store.export import ExportError  # deliberately lazy (startup time)

    if pairs not in ("judge", "best-worst"):
        raise ExportError(f"--pairs {pairs!r}: choose judge or best-worst")
    if pairs == "judge":
        if score is not None:
            raise ExportError("--score ranks --pairs best-worst, which is not given")
        return
    if fmt != "dpo":
        raise ExportError(f"--pairs best-worst makes a dpo export, not {fmt}")
    if score is None:
        raise ExportError("--pairs best-worst needs --score NAME (e.g. composite:agfsync)")
    if not 2 <= candidates <= 64:
        raise ExportError(f"--candidates must be 2 to 64, not {candidates}")
