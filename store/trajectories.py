"""The trajectory store: SQLite + content-addressed images under one home directory.

A trajectory is a run row (prompt, config, model identities, final verdict) and one step row per
iteration (prompts, parameters, seed, image hashes, every agent's output, scores, timings, parse
failures): enough to replay the session and to export any training format. Writes are upserts,
so a graph node that re-runs after a resume writes the same row again instead of a duplicate.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from artloop.config import mask_secrets
from artloop.tools.images import ImageStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    status TEXT NOT NULL,          -- running | paused | interrupted | failed | cancelled | accepted | max_iters | plateau | budget
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    config TEXT NOT NULL,          -- JSON, secrets masked
    models TEXT NOT NULL,          -- JSON: chat and diffusion model identities
    prompts_version TEXT NOT NULL,
    final_image TEXT,              -- sha256 of the best image
    best_score REAL,
    error TEXT,
    pause TEXT                     -- JSON: where a paused run waits (its interrupt's payload)
);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    iteration INTEGER NOT NULL,
    record TEXT NOT NULL,          -- JSON, see RefineState's `step`
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, iteration)
);
CREATE TABLE IF NOT EXISTS leases (  -- the session working on a run now: see store/leases.py
    run_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,           -- that session's token
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    since REAL NOT NULL,
    expires_at REAL NOT NULL       -- renewed while it works; lapses once its holder stops
);
"""

RUN_ID = re.compile(r"^[0-9a-f]{16}$")
FINAL_STATUSES = ("accepted", "max_iters", "plateau", "budget")  # a session that ended


HOST = socket.gethostname()  # a lease names its holder's host and pid


def process_alive(pid: int) -> bool:
    """Whether process `pid` (on this host) still runs: a lease whose process is gone holds
    nothing."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class StoreError(ValueError):
    """A run is unknown, a run id is malformed, or the store is missing or unreadable."""


def _damaged(e: sqlite3.DatabaseError) -> bool:
    """SQLite says the file is not a database, or a page of it is corrupt."""
    return getattr(e, "sqlite_errorname", "").startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT"))


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def check_run_id(run_id: str) -> str:
    """Run ids are 16 hex characters: nothing else reaches SQL or a file path."""
    if not RUN_ID.match(run_id or ""):
        raise StoreError(f"not a run id: {run_id!r} (expected 16 hex characters)")
    return run_id


class TrajectoryStore:
    """`home/artloop.sqlite` for trajectories, `home/images/` for the images they reference.
    `checkpointer` names where the sessions' LangGraph checkpoints live (None: SQLite in the
    home; or a postgresql:// URL): see graphs/runner.py. With `create=False` (the read-only
    commands) nothing is created or touched: a home without a store is a StoreError."""

    def __init__(
        self, home: str | Path, checkpointer: str | None = None, *, create: bool = True
    ) -> None:
        self.home = Path(home)
        self.checkpointer = checkpointer
        self.db_path = self.home / "artloop.sqlite"
        self.images = ImageStore(self.home / "images")
        if not create:
            if not self.home.is_dir():
                raise StoreError(f"no artloop home at {self.home} (check --home / ARTLOOP_HOME)")
            if not self.db_path.is_file():
                raise StoreError(f"{self.home} holds no artloop store (no {self.db_path.name})")
            return
        self.home.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            db.executescript(SCHEMA)
            if "pause" not in {c["name"] for c in db.execute("PRAGMA table_info(runs)")}:
                db.execute("ALTER TABLE runs ADD COLUMN pause TEXT")  # a store made before it

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # A short-lived connection per operation: safe from any thread, nothing held open.
        db = sqlite3.connect(self.db_path, timeout=30.0)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA foreign_keys=ON")
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        except sqlite3.DatabaseError as e:
            if not _damaged(e):
                raise
            raise StoreError(
                f"{self.db_path} is not a readable SQLite database ({e}); "
                "`artloop doctor` checks the store"
            ) from e
        finally:
            db.close()

    def create_run(
        self, run_id: str, prompt: str, config: dict, models: dict, prompts_version: str
    ) -> None:
        now = time.time()
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO runs (run_id, prompt, status, created_at, updated_at, "
                "config, models, prompts_version) VALUES (?, ?, 'running', ?, ?, ?, ?, ?)",
                (
                    check_run_id(run_id),
                    prompt,
                    now,
                    now,
                    json.dumps(mask_secrets(config)),
                    json.dumps(mask_secrets(models)),
                    prompts_version,
                ),
            )

    def put_step(self, run_id: str, iteration: int, record: dict[str, Any]) -> None:
        """Insert or replace the record of one iteration."""
        now = time.time()
        with self._connect() as db:
            db.execute(
                "INSERT INTO steps (run_id, iteration, record, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (run_id, iteration) DO UPDATE SET record = excluded.record",
                (check_run_id(run_id), iteration, json.dumps(record), now),
            )
            db.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", (now, run_id))

    def finish_run(
        self,
        run_id: str,
        status: str,
        *,
        final_image: str | None = None,
        best_score: float | None = None,
        error: str | None = None,
        pause: dict | None = None,
    ) -> None:
        """Set a run's status (`pause`: where a paused one waits, its interrupt's payload)."""
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET status = ?, final_image = ?, best_score = ?, error = ?, "
                "pause = ?, updated_at = ? WHERE run_id = ?",
                (
                    status,
                    final_image,
                    best_score,
                    error,
                    pause and json.dumps(pause),
                    time.time(),
                    check_run_id(run_id),
                ),
            )

    def revoke(self, run_id: str, error: str) -> None:
        """Mark a finished run failed (its verdicts are not to be trusted), keeping its steps,
        final image and score: it is no longer exported or skipped as done."""
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET status = 'failed', error = ?, updated_at = ? WHERE run_id = ?",
                (error, time.time(), check_run_id(run_id)),
            )

    def get_run(self, run_id: str) -> dict[str, Any]:
        """The whole trajectory: the run's fields plus `steps`, ordered by iteration."""
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM runs WHERE run_id = ?", (check_run_id(run_id),)
            ).fetchone()
            if row is None:
                raise StoreError(f"no run {run_id} in {self.home}")
            steps = db.execute(
                "SELECT record FROM steps WHERE run_id = ? ORDER BY iteration", (run_id,)
            ).fetchall()
            run = self._as_read(db, [dict(row)])[0]
        for key in ("config", "models"):
            run[key] = json.loads(run[key])
        run["pause"] = json.loads(run["pause"]) if run.get("pause") else None
        run["steps"] = [json.loads(s["record"]) for s in steps]
        return run

    @staticmethod
    def _as_read(db: sqlite3.Connection, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A `running` run that no process works on any more (its process was killed: it holds
        no lease, or one whose process on this host is gone) reads `interrupted`, saying so.
        Only read so: the next session on it writes its status."""
        running = [r for r in runs if r["status"] == "running"]
        if not running:
            return runs
        try:
            marks = ", ".join("?" * len(running))
            held = {
                lease["run_id"]: lease
                for lease in db.execute(
                    f"SELECT run_id, pid, host FROM leases WHERE run_id IN ({marks})",
                    [r["run_id"] for r in running],
                )
            }
        except sqlite3.OperationalError:  # a store made before leases: nothing holds its runs
            held = {}
        for run in running:
            lease = held.get(run["run_id"])
            if lease is None or (lease["host"] == HOST and not process_alive(lease["pid"])):
                run["status"] = "interrupted"
                run["error"] = "stopped without finishing: the process working on it is gone"
        return runs

    def delete_run(self, run_id: str) -> None:
        """Remove a run and its steps (images stay: they are shared by content hash)."""
        with self._connect() as db:
            if not db.execute(
                "DELETE FROM runs WHERE run_id = ?", (check_run_id(run_id),)
            ).rowcount:
                raise StoreError(f"no run {run_id} in {self.home}")

    def list_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT r.*, (SELECT COUNT(*) FROM steps s WHERE s.run_id = r.run_id) "
                "AS iterations FROM runs r ORDER BY r.created_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
            runs = self._as_read(db, [dict(r) for r in rows])
        keys = ("run_id", "prompt", "status", "created_at", "best_score", "iterations", "error")
        listed = []
        for row in runs:  # a store made before the `pause` column has none
            pause = json.loads(row["pause"]) if row.get("pause") else None
            listed.append({k: row[k] for k in keys} | {"paused_at": pause and pause["pause"]})
        return listed
