"""Run the refine graph as a session: SQLite checkpoints (one thread per run), progress per node,
a trajectory in the store, resumable from the last checkpoint after a crash or a dead server.
A session paused for a person (graphs/human.py) resumes with their answer."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artloop.graphs.context import RefineContext
from artloop.graphs.human import check_action, check_pause_at
from artloop.graphs.refine import builder
from artloop.prompts import PROMPTS_VERSION
from artloop.tools.store import TrajectoryStore, check_run_id, new_run_id
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command, StateSnapshot

OnUpdate = Callable[[str, dict[str, Any]], None]  # (node name, its state update)


@dataclass
class RunSummary:
    run_id: str
    status: str
    iterations: int
    scores: list[float]
    best_score: float | None
    final_image: str | None
    seconds: float
    pause: dict | None = None  # where a paused session waits: the interrupt's payload


class CheckpointerError(RuntimeError):
    """The checkpointer cannot be reached; the message names it (password masked)."""


@contextmanager
def open_checkpointer(store: TrajectoryStore) -> Iterator[BaseCheckpointSaver]:
    """The sessions' checkpointer: SQLite in the store's home, or the Postgres database its
    `checkpointer` URL names (a shared server: several UIs or runners see the same sessions)."""
    if store.checkpointer:
        yield from _postgres(store.checkpointer)
        return
    yield _sqlite(store.home / "checkpoints.sqlite")


_SQLITE: dict[Path, SqliteSaver] = {}
_SQLITE_LOCK = threading.Lock()


def _sqlite(path: Path) -> SqliteSaver:
    """One saver (one connection) per database and process, shared by concurrent sessions: its
    lock orders their writes, instead of a connection each contending for SQLite's file lock
    (whose busy handler sleeps). Also lets the compiled graph be kept per saver."""
    with _SQLITE_LOCK:
        if (saver := _SQLITE.get(path)) is None:
            conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a killed process loses nothing committed; no fsync per checkpoint.
            conn.execute("PRAGMA synchronous=NORMAL")
            saver = _SQLITE[path] = SqliteSaver(conn)
        return saver


_COMPILED: dict[tuple[int, tuple[str, ...]], Any] = {}


def compiled(saver: BaseCheckpointSaver, interrupt_before: tuple[str, ...] = ()) -> Any:
    """The refine graph compiled with `saver`, once per saver (compiling inspects every node's
    code: ~40 ms, as much as the rest of the framework's work in a session)."""
    if not isinstance(saver, SqliteSaver):  # a Postgres saver is opened per use: not kept
        return builder.compile(checkpointer=saver, interrupt_before=list(interrupt_before))
    key = (id(saver), interrupt_before)
    with _SQLITE_LOCK:
        if key not in _COMPILED or _COMPILED[key].checkpointer is not saver:
            _COMPILED[key] = builder.compile(
                checkpointer=saver, interrupt_before=list(interrupt_before)
            )
        return _COMPILED[key]


def _postgres(url: str) -> Iterator[BaseCheckpointSaver]:
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver

    try:
        with PostgresSaver.from_conn_string(url) as saver:
            saver.setup()  # creates or migrates its tables; a no-op when they are current
            yield saver
    except psycopg.OperationalError as e:
        shown = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
        raise CheckpointerError(f"cannot use the checkpointer at {shown}: {e}".strip()) from None


def pending_pause(snapshot: StateSnapshot) -> dict | None:
    """The pause a session waits at (the payload the graph's interrupt() sent), if any."""
    return snapshot.interrupts[0].value if snapshot.interrupts else None


def run_session(
    ctx: RefineContext,
    *,
    prompt: str | None = None,
    run_id: str | None = None,
    config: dict | None = None,
    on_update: OnUpdate | None = None,
    interrupt_before: list[str] | None = None,
    pause_at: list[str] | None = None,
    answer: dict | None = None,
) -> RunSummary:
    """Start a run (`prompt` given; `run_id` optional) or resume one (`run_id` alone).

    `pause_at` lists where a new session waits for a person; a paused session resumes with
    their `answer` (a HumanAction's fields; None lets the agent decide), checked before anything
    changes.

    A failing node (a dead server, invalid output after every retry) marks the run `failed`
    with the error and re-raises; resuming it later continues from the last checkpoint.
    """
    resume = prompt is None
    if resume and run_id is None:
        raise ValueError("resuming needs a run id")
    run_id = check_run_id(run_id) if run_id else new_run_id()
    if not resume:
        check_pause_at(pause_at or [])
        ctx.store.create_run(run_id, prompt, config or {}, ctx.models(), PROMPTS_VERSION)
    else:
        ctx.store.get_run(run_id)  # raises StoreError for an unknown run
    start = time.perf_counter()
    thread = {"configurable": {"thread_id": run_id}}
    with open_checkpointer(ctx.store) as saver:
        graph = compiled(saver, tuple(interrupt_before or ()))
        # The `begin` node completes a new run's state from the context's settings.
        inputs: Any = None if resume else {"run_id": run_id, "prompt": prompt,
                                           "pause_at": pause_at or []}  # fmt: skip
        if resume:
            snapshot = graph.get_state(thread)
            if not snapshot.next:
                raise ValueError(f"run {run_id} has nothing left to resume")
            pause = pending_pause(snapshot)
            if pause is not None:
                action = check_action(pause["pause"], answer)  # a bad answer changes nothing
                inputs = Command(resume=action.model_dump(exclude_none=True))
            elif answer is not None:
                raise ValueError(f"run {run_id} is not paused: there is nothing to answer")
        try:
            ctx.store.finish_run(run_id, "running")
            for chunk in graph.stream(inputs, thread, context=ctx, stream_mode="updates"):
                for name, update in chunk.items():
                    if on_update is not None and isinstance(update, dict):
                        on_update(name, update)
        except BaseException as e:
            ctx.store.finish_run(run_id, "failed", error=f"{type(e).__name__}: {e}"[:2000])
            raise
        state = graph.get_state(thread)
    values, pause = state.values, pending_pause(state)
    status = values.get("status") or "running"
    if state.next:  # waiting for a person, or stopped by interrupt_before: not finished
        status = "paused" if pause else "interrupted"
        ctx.store.finish_run(run_id, status)
    return RunSummary(
        run_id=run_id, status=status, iterations=len(values.get("scores", [])),
        scores=values.get("scores", []), best_score=values.get("best_score"),
        final_image=values.get("best_image"), seconds=time.perf_counter() - start, pause=pause,
    )  # fmt: skip
