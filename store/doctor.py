"""Integrity checks: `artloop doctor` on a store, and on an export directory.

A store passes when both SQLite files are intact, every image a trajectory references exists
and its bytes hash to its name, and every run is either complete (a final status, iterations
0..n-1, its final image among its steps' images) or marked incomplete (running, paused,
interrupted or failed: `resume` or a batch re-run finishes it). Files a killed write left
behind (`.*.tmp` beside the images) are reported, and removed with `clean=True`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from artloop.store.export import provenance, step_images
from artloop.store.trajectories import FINAL_STATUSES, StoreError, TrajectoryStore

INCOMPLETE = ("running", "paused", "interrupted", "failed", "cancelled")


@dataclass
class Report:
    """What a check found: counts, errors (integrity broken) and warnings (nothing lost)."""

    checked: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def count(self, what: str, n: int = 1) -> None:
        self.checked[what] = self.checked.get(what, 0) + n


def _sqlite_ok(path: Path, report: Report) -> None:
    """SQLite's own full check (pages, indexes) and the foreign keys."""
    if not path.exists():
        return
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            result = [r[0] for r in db.execute("PRAGMA integrity_check")]
            orphans = db.execute("PRAGMA foreign_key_check").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        report.errors.append(f"{path.name}: not a readable SQLite database ({e})")
        return
    if result != ["ok"]:
        report.errors.append(f"{path.name}: integrity check failed: {'; '.join(result[:5])}")
    if orphans:
        report.errors.append(f"{path.name}: {len(orphans)} row(s) reference missing rows")
    report.count("databases")


class _Hashes:
    """Checks each image file once: it exists and its bytes hash to its name."""

    def __init__(self, report: Report) -> None:
        self.report, self.seen = report, set()

    def check(self, path: Path, digest: str, where: str) -> None:
        if digest in self.seen:
            return
        self.seen.add(digest)
        self.report.count("images")
        if not path.is_file():
            self.report.errors.append(f"{where}: image {digest[:12]} is missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            self.report.errors.append(f"{where}: image {digest[:12]} does not match its hash")


def _check_run(run: dict, hashes: _Hashes, store: TrajectoryStore, report: Report) -> None:
    rid, status, steps = run["run_id"], run["status"], run["steps"]
    if status in INCOMPLETE:
        report.count("incomplete runs")
    elif status in FINAL_STATUSES:
        report.count("complete runs")
        if not steps:
            report.errors.append(f"run {rid}: {status} but has no steps")
        if run["final_image"] and run["final_image"] not in {
            d for s in steps for d in step_images(s)
        }:
            report.errors.append(f"run {rid}: its final image is in none of its steps")
    else:
        report.errors.append(f"run {rid}: unknown status {status!r}")
    iterations = [s.get("iteration") for s in steps]
    if iterations != list(range(len(steps))):
        report.errors.append(f"run {rid}: iterations {iterations} are not 0..{len(steps) - 1}")
    for step in steps:
        for digest in step_images(step):
            hashes.check(store.images.path(digest), digest, f"run {rid}")


def check_store(store: TrajectoryStore, *, clean: bool = False) -> Report:
    """Check the whole store (read-only, apart from removing leftovers when `clean`)."""
    report = Report()
    _sqlite_ok(store.db_path, report)
    _sqlite_ok(store.home / "checkpoints.sqlite", report)
    if report.errors:  # a broken database cannot be read run by run
        return report
    hashes = _Hashes(report)
    try:
        for summary in store.list_runs(limit=-1):  # SQLite: a negative LIMIT is no limit
            report.count("runs")
            _check_run(store.get_run(summary["run_id"]), hashes, store, report)
    except StoreError as e:  # damage the integrity check did not see
        report.errors.append(str(e))
        return report
    for tmp in store.images.root.glob("*/.*.tmp") if store.images.root.exists() else []:
        if clean:
            tmp.unlink(missing_ok=True)
            report.warnings.append(f"removed {tmp.name}, left by an interrupted write")
        else:
            report.warnings.append(f"{tmp.name}: left by an interrupted write (--clean removes)")
    return report


def check_export(out: Path) -> Report:
    """Check an export: its card's row count matches its data, and raw images match their
    hashes. Exports are published by one rename, so a half-written one is never in place."""
    report = Report()
    if (card := provenance(out)) is None or "rows" not in card:
        report.errors.append(f"{out}: no dataset card with provenance (README.md)")
        return report
    rows = card["rows"]
    parquet = sorted(out.glob("data/*.parquet"))
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        found, table = 0, "data/*.parquet"
        for path in parquet:
            try:
                found += pq.ParquetFile(path).metadata.num_rows
            except (OSError, pa.ArrowException) as e:
                report.errors.append(f"{path.name}: not a readable parquet file ({e})")
                return report
    else:
        jsonl = [p for p in (out / "steps.jsonl", out / "prompts.jsonl") if p.is_file()]
        if not jsonl:
            report.errors.append(f"{out}: no data files (data/*.parquet, steps/prompts.jsonl)")
            return report
        text = jsonl[0].read_text(encoding="utf-8", errors="replace")
        lines = [line for line in text.split("\n") if line]  # not splitlines(): U+2028 is text
        found, table = len(lines), jsonl[0].name
        hashes = _Hashes(report)
        for number, line in enumerate(lines, 1) if table == "steps.jsonl" else []:
            try:
                digests = step_images(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError, AttributeError):
                report.errors.append(f"{table}:{number}: not a step record")
                continue
            for digest in digests:
                hashes.check(out / "images" / f"{digest}.png", digest, table)
    report.count("rows", found)
    if found != rows:
        report.errors.append(f"{out}: the card says {rows} rows, {table} has {found}")
    return report


def describe(report: Report) -> str:
    """Counts, then each error and warning on its own line."""
    counts = ", ".join(f"{n} {what}" for what, n in report.checked.items()) or "nothing"
    lines = [f"checked {counts}: " + ("ok" if report.ok else f"{len(report.errors)} error(s)")]
    lines += [f"error: {e}" for e in report.errors] + [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)
