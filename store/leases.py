"""One session at a time per run: a lease row in the store's `leases` table.

A session takes its run's lease before it reads the run's checkpoint and keeps it until it
stops, renewing it in the background. A second session (another `artloop resume`, a second
browser tab, another batch over the same file) is refused with RunBusyError naming the holder,
and changes nothing. A killed holder never blocks a run for good: on its host the lease is
taken over at once (its pid is gone); from any host once it lapses (LEASE_S after the last
renewal).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from artloop.store.trajectories import HOST, StoreError, TrajectoryStore, process_alive

LEASE_S = 30.0  # how long a lease outlives its holder's last renewal (renewed every third)


class RunBusyError(StoreError):
    """Another session holds the run's lease; the message says who."""


def _who(row: sqlite3.Row) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["since"]))
    return f"pid {row['pid']} on {row['host']} (since {since})"


class Lease:
    """A held lease; `check()` raises once it was lost (its holder stalled past LEASE_S and
    another session took the run over)."""

    def __init__(self, store: TrajectoryStore, run_id: str, seconds: float) -> None:
        self.store, self.run_id, self.seconds = store, run_id, seconds
        self.owner = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease-{run_id}")

    def _holder(self) -> sqlite3.Row | None:
        with self.store._connect() as db:
            return db.execute("SELECT * FROM leases WHERE run_id = ?", (self.run_id,)).fetchone()

    def acquire(self) -> None:
        for _ in range(3):  # the holder may release or change between the statements
            now = time.time()
            with self.store._connect() as db:
                if db.execute(
                    "INSERT INTO leases (run_id, owner, pid, host, since, expires_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
                    "owner = excluded.owner, pid = excluded.pid, host = excluded.host, "
                    "since = excluded.since, expires_at = excluded.expires_at "
                    "WHERE leases.expires_at < excluded.since",
                    (self.run_id, self.owner, os.getpid(), HOST, now, now + self.seconds),
                ).rowcount:
                    break
            holder = self._holder()
            if holder is None:
                continue
            if holder["host"] == HOST and not process_alive(holder["pid"]):  # killed: take it over
                with self.store._connect() as db:
                    if db.execute(
                        "UPDATE leases SET owner = ?, pid = ?, since = ?, expires_at = ? "
                        "WHERE run_id = ? AND owner = ?",
                        (
                            self.owner,
                            os.getpid(),
                            now,
                            now + self.seconds,
                            self.run_id,
                            holder["owner"],
                        ),
                    ).rowcount:
                        break
                continue
            raise RunBusyError(
                f"run {self.run_id} is being worked on by {_who(holder)}: "
                f"wait for it to stop, then resume it"
            )
        else:
            raise RunBusyError(f"run {self.run_id} is contended: try again")
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                with self.store._connect() as db:
                    kept = db.execute(
                        "UPDATE leases SET expires_at = ? WHERE run_id = ? AND owner = ?",
                        (time.time() + self.seconds, self.run_id, self.owner),
                    ).rowcount
            except sqlite3.Error:  # a busy store: try again at the next renewal
                continue
            if not kept:
                self.lost = True
                return

    def check(self) -> None:
        if self.lost:
            holder = self._holder()
            who = _who(holder) if holder is not None else "another session"
            raise RunBusyError(
                f"run {self.run_id} was taken over by {who} while this session "
                f"stalled: this one stopped"
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join()
        with self.store._connect() as db:
            db.execute(
                "DELETE FROM leases WHERE run_id = ? AND owner = ?", (self.run_id, self.owner)
            )


@contextmanager
def hold_run(store: TrajectoryStore, run_id: str, seconds: float | None = None) -> Iterator[Lease]:
    """Hold `run_id`'s lease while the block runs (RunBusyError, naming the holder, if another
    session holds it)."""
    lease = Lease(store, run_id, LEASE_S if seconds is None else seconds)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()
