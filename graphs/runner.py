"""Run the refine graph as a session: SQLite checkpoints (one thread per run), progress per node,
a trajectory in the store, resumable from the last checkpoint after a crash or a dead server.
A session paused for a person (graphs/human.py) resumes with their answer."""

from __future__ import annotations

# Deliberately lazy: psycopg and the Postgres checkpointer are imported inside the functions that
# use them, so that importing this module (the CLI's --help, the config, a test) does not load them.
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from artloop.config import LoopConfig
from artloop.graphs.context import RefineContext
from artloop.graphs.human import check_action, check_pause_at
from artloop.graphs.refine import build_graph, check_init_image, shape
from artloop.graphs.tracking import track_session
from artloop.prompts import PROMPTS_VERSION
from artloop.store.leases import RunBusyError, hold_run
from artloop.store.trajectories import (
    FINAL_STATUSES,
    TrajectoryStore,
    check_run_id,
    new_run_id,
)
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
    """The checkpointer cannot be opened; the message names it (password masked) and why."""


@dataclass
class _Open:
    """A saver open for one store, and the graphs compiled with it (dropped when it closes),
    by the variant's nodes and the nodes to stop before."""

    saver: BaseCheckpointSaver
    users: int = 0
    graphs: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = field(default_factory=dict)


_OPEN: dict[TrajectoryStore, _Open] = {}
_LOCK = threading.Lock()


@contextmanager
def open_checkpointer(store: TrajectoryStore) -> Iterator[BaseCheckpointSaver]:
    """The sessions' checkpointer: SQLite in the store's home, or the Postgres database its
    `checkpointer` URL names (a shared server: several UIs or runners see the same sessions).

    The outermost `with` on a store opens the saver and closes it on exit; uses inside it (any
    thread) share that saver. So a process that opens it first (a CLI command, the UI, a
    batch) owns one saver for its lifetime, and a library call alone opens and closes its own.
    """
    with _LOCK:
        if (held := _OPEN.get(store)) is None:
            held = _OPEN[store] = _Open(_open_saver(store))
        held.users += 1
    try:
        yield held.saver
    finally:
        with _LOCK:
            held.users -= 1
            if held.users == 0:
                del _OPEN[store]
                _close_saver(held.saver)


def _open_saver(store: TrajectoryStore) -> BaseCheckpointSaver:
    """Only opening is reported as the checkpointer's failure: an error from a session's own
    work while the saver is open is that session's."""
    if store.checkpointer:
        return _postgres(store.checkpointer)
    path = store.home / "checkpoints.sqlite"
    try:
        conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a killed process loses nothing committed; no fsync per checkpoint.
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as e:
        raise CheckpointerError(f"cannot use the checkpointer at {path}: {e}") from e
    # One connection shared by the owner's sessions: the saver's lock orders their writes,
    # instead of a connection each contending for SQLite's file lock (whose busy handler sleeps).
    return SqliteSaver(conn)


def _close_saver(saver: BaseCheckpointSaver) -> None:
    # SQLite's connection (the last one folds the WAL back into the file) or Postgres's pool.
    saver.conn.close()  # type: ignore[attr-defined]


def _postgres(url: str) -> BaseCheckpointSaver:
    """A saver over a connection pool (reconnects after a server restart); its tables are
    created or migrated once, here, not per session."""
    import psycopg
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import ConnectionPool

    settings: dict[str, Any] = {
        "autocommit": True,
        "prepare_threshold": 0,
        "row_factory": dict_row,
        "application_name": "artloop",
    }
    try:  # a direct connection first: its error says why (the pool's would only time out)
        with psycopg.connect(url, connect_timeout=10, **settings) as conn:
            PostgresSaver(conn).setup()  # creates or migrates its tables
    except psycopg.Error as e:
        shown = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
        reason = str(e).strip() or type(e).__name__
        raise CheckpointerError(f"cannot use the checkpointer at {shown}: {reason}") from e
    pool = ConnectionPool(
        url,
        kwargs=settings,
        min_size=1,
        max_size=4,
        open=True,
        check=ConnectionPool.check_connection,
        name="artloop-checkpointer",
    )
    return PostgresSaver(pool)


def compiled(
    saver: BaseCheckpointSaver, loop: LoopConfig, interrupt_before: tuple[str, ...] = ()
) -> Any:
    """The refine graph of `loop`'s variant compiled with `saver`, once per open saver and
    variant shape (compiling inspects every node's code: ~40 ms, as much as the rest of the
    framework's work in a session)."""

    def compile_it() -> Any:
        return build_graph(loop).compile(
            checkpointer=saver, interrupt_before=list(interrupt_before)
        )

    with _LOCK:
        held = next((h for h in _OPEN.values() if h.saver is saver), None)
        if held is None:  # a saver the caller opened itself: not kept
            return compile_it()
        key = (shape(loop), interrupt_before)
        if key not in held.graphs:
            held.graphs[key] = compile_it()
        return held.graphs[key]


def stored_loop(run: dict) -> LoopConfig:
    """The loop a stored run runs (its config's; the default for a run stored without one)."""
    return LoopConfig(**(run["config"].get("loop") or {}))


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
    init_image: str | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> RunSummary:
    """Start a run (`prompt` given; `run_id` optional) or resume one (`run_id` alone).
    A run may start from a person's image, `init_image` (a hash in the image store:
    tools/images.import_image puts it there), recorded in its config; its state keeps it.

    The graph is built for `ctx.loop`'s variant, and the run's stored config records that loop
    (under "loop", over any the caller's `config` gives): a resumed run must be given the loop
    it started with (`stored_loop`; the CLI does so).

    `pause_at` lists where a new session waits for a person; a paused session resumes with
    their `answer` (a HumanAction's fields; None lets the agent decide), checked before anything
    changes. `on_update(node, update)` hears each node's state update; `on_event(event)` its
    progress events as they happen (graphs/refine.py: node_started, diffusion_step, ...).

    A failing node (a dead server, invalid output after every retry) marks the run `failed`
    with the error and re-raises; resuming it later continues from the last checkpoint.
    One session works on a run at a time: RunBusyError (naming the holder) for a second one.
    A session that ends (a final status) is logged to the tracker `ctx.tracking_config` names,
    if any (graphs/tracking.py).
    """
    resume = prompt is None
    if resume and run_id is None:
        raise ValueError("resuming needs a run id")
    run_id = check_run_id(run_id) if run_id else new_run_id()
    if not resume:
        check_pause_at(pause_at or [], plans=ctx.loop.plans)
        check_init_image(ctx, init_image)  # ConfigError: nothing is stored
    elif init_image is not None:
        raise ValueError(f"init_image starts a session: run {run_id} resumes with its own")
    start = time.perf_counter()
    thread = {"configurable": {"thread_id": run_id}}
    with ExitStack() as held:
        saver = held.enter_context(open_checkpointer(ctx.store))  # failing: nothing is stored
        if not resume:
            recorded = {**(config or {}), "loop": ctx.loop.model_dump()}  # what ran
            if init_image:  # what the UI and `session show` tell a session from an image by
                recorded["init_image"] = init_image
            ctx.store.create_run(run_id, prompt, recorded, ctx.models(), PROMPTS_VERSION)
        elif shape(stored_loop(ctx.store.get_run(run_id))) != shape(ctx.loop):  # or StoreError
            raise ValueError(
                f"run {run_id} runs another loop variant than this one: resume it with the loop "
                "stored with it (artloop resume does)"
            )
        # A second session on this run is refused here, before it reads any state.
        lease = held.enter_context(hold_run(ctx.store, run_id))
        graph = compiled(saver, ctx.loop, tuple(interrupt_before or ()))
        # The `begin` node completes a new run's state from the context's settings.
        started = {"run_id": run_id, "prompt": prompt, "pause_at": pause_at or []}
        inputs: Any = None if resume else {**started, "init_image": init_image}
        if resume:
            snapshot = graph.get_state(thread)
            # `tasks`, not `next`: a node whose writes were saved before its process died is
            # left out of `next`, and its step still has to be finished.
            if not snapshot.tasks:
                raise ValueError(f"run {run_id} has nothing left to resume")
            pause = pending_pause(snapshot)
            if pause is not None:
                action = check_action(pause["pause"], answer)  # a bad answer changes nothing
                inputs = Command(resume=action.model_dump(exclude_none=True))
            elif answer is not None:
                raise ValueError(f"run {run_id} is not paused: there is nothing to answer")
        elif graph.get_state(thread).values:  # a new input there would begin another run
            raise ValueError(f"run {run_id} has begun: resume it instead of starting it again")
        try:
            ctx.store.finish_run(run_id, "running")
            # "custom": the nodes' progress events (node_started, diffusion_step, ...).
            modes = ["updates", "custom"] if on_event is not None else ["updates"]
            for mode, chunk in graph.stream(inputs, thread, context=ctx, stream_mode=modes):
                lease.check()  # taken over while this one stalled: the run is the other's now
                if mode == "custom":
                    if on_event is not None:
                        on_event(chunk)
                    continue
                for name, update in chunk.items():
                    if on_update is not None and isinstance(update, dict):
                        on_update(name, update)
        except RunBusyError:
            raise
        except BaseException as e:
            ctx.store.finish_run(run_id, "failed", error=f"{type(e).__name__}: {e}"[:2000])
            raise
        state = graph.get_state(thread)
        values, pause = state.values, pending_pause(state)
        status = values.get("status") or "running"
        if state.next:  # waiting for a person, or stopped by interrupt_before: not finished
            status = "paused" if pause else "interrupted"
            ctx.store.finish_run(run_id, status, pause=pause)
    summary = RunSummary(
        run_id=run_id,
        status=status,
        iterations=len(values.get("scores", [])),
        scores=values.get("scores", []),
        best_score=values.get("best_score"),
        final_image=values.get("best_image"),
        seconds=time.perf_counter() - start,
        pause=pause,
    )
    if status in FINAL_STATUSES:  # after the lease: logging holds no run
        track_session(ctx, run_id, summary.seconds)
    return summary
