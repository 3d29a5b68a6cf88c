"""What a run a LangGraph server drives needs besides the nodes (artloop's runner does this
itself): its context from the client's settings, its lease on the session, and the store's
status where the run ends in a way no node sees (cancelled, failed)."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from artloop.graphs.context import RefineContext, RunSettings, for_server, merge_settings
from artloop.store import leases
from artloop.store.trajectories import TrajectoryStore
from langchain_core.callbacks import BaseCallbackHandler
from langgraph.runtime import Runtime


@dataclass
class _Driven:
    """A session a run of the server's graph works on (not artloop's runner), and its lease:
    while the run lasts, the store knows a live process works on it (see store/leases.py)."""

    store: TrajectoryStore
    run_id: str
    lease: leases.Lease

    def end(self, status: str | None = None, error: str | None = None) -> None:
        if status is not None:
            self.store.finish_run(self.run_id, status, error=error)
        self.lease.release()


# Server run id (LangGraph's run id, also its callbacks' root run id) -> the session it drives;
# and the server runs that ended (a node still running in its thread when the server cancelled
# the run may finish after that: it must not register the run again).
DRIVEN: dict[str, _Driven] = {}
ENDED: deque[str] = deque(maxlen=1000)


def node_context(runtime: Runtime, state: dict, name: str) -> tuple[RefineContext, dict | None]:
    """The node's context; and for a run a server started (with no context, or a client's
    RunSettings), the session's settings: the client's context applies to the session from the
    run it came with on (merged over what earlier runs gave; begin starts from none)."""
    given = runtime.context
    if isinstance(given, RefineContext):  # artloop's runner
        return given, None
    stored = None if name == "begin" else state.get("settings")
    settings = merge_settings(stored, given if isinstance(given, RunSettings) else None)
    return for_server(RunSettings(**settings)), settings


def drive(runtime: Runtime, ctx: RefineContext, run_id: str | None) -> None:
    """The first node of each server run marks its session running (it may have been paused,
    cancelled or failed before) and registers it for ServerRuns."""
    info = runtime.execution_info
    server_run = str(info.run_id) if info is not None and info.run_id is not None else None
    if server_run is None or run_id is None or server_run in DRIVEN or server_run in ENDED:
        return
    lease = leases.Lease(ctx.store, run_id, leases.LEASE_S)
    lease.acquire()  # RunBusyError if another session works on it: this run changes nothing
    DRIVEN[server_run] = _Driven(ctx.store, run_id, lease)
    ctx.store.finish_run(run_id, "running")


# How a run stopped from outside ends (the server cancels its task: CancelledError).
STOPPED = (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)


class ServerRuns(BaseCallbackHandler):
    """The end of each server run that the nodes cannot see: a run the server cancels reads
    `cancelled` in the store, one that fails `failed` with its cause. (Pauses, answers and the
    finish are written by the nodes; see `DRIVEN`.)"""

    run_inline = True  # a status write, at once: the run may be torn down next

    def on_chain_end(
        self, outputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        if parent_run_id is None:
            ENDED.append(str(run_id))
            if (session := DRIVEN.pop(str(run_id), None)) is not None:
                session.end()

    def on_chain_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        if parent_run_id is not None:
            return
        ENDED.append(str(run_id))
        if (session := DRIVEN.pop(str(run_id), None)) is None:
            return
        if isinstance(error, STOPPED):
            session.end("cancelled")
        else:
            session.end("failed", " ".join(f"{type(error).__name__}: {error}".split())[:2000])
