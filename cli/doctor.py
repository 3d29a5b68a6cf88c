"""`artloop doctor`: the store's integrity, or an export's."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from artloop.cli.common import ConfigOpt, HomeOpt, JsonOpt, existing_store, fail


def doctor(
    export_dir: Annotated[
        Path | None, typer.Option("--export", help="Check this export directory instead")
    ] = None,
    clean: Annotated[bool, typer.Option(help="Remove files left by interrupted writes")] = False,
    home: HomeOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the store's integrity (or an export's); exit 1 when anything is broken."""
    # deliberately lazy (startup time): the store
    from artloop.store.doctor import check_export, check_store, describe

    if export_dir is not None and not export_dir.is_dir():
        fail(f"no export directory at {export_dir}")
    report = (
        check_export(export_dir)
        if export_dir
        else check_store(existing_store(home, config), clean=clean)
    )
    if as_json:
        print(json.dumps({"ok": report.ok, **asdict(report)}, indent=2))
    else:
        print(describe(report))
    if not report.ok:
        raise typer.Exit(1)
