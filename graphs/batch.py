"""Batch collection: many refine sessions at once, for training data.

Sessions run concurrently (an asyncio loop hands each to a worker thread, at most `concurrency`
at a time); their diffusion requests meet in the tool's batcher and their agent calls go to the
server together. Each session has a run id derived from the batch name, its line and its options,
so a re-run skips the finished ones and resumes the rest from their checkpoints. A failed
session is stored with its error and does not stop the others. Every line of the prompts file
is checked before any session starts. A `stop` event (the CLI's Ctrl-C) starts no more
sessions and stops the running ones at their next checkpoint, marked `interrupted`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from artloop.config import ConfigError, validate_prompt
from artloop.graphs.context import RefineContext
from artloop.graphs.refine import NODES
from artloop.graphs.runner import OnUpdate, open_checkpointer, run_session
from artloop.graphs.sessions import view
from artloop.store.trajectories import FINAL_STATUSES, StoreError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError


class BatchError(ValueError):
    """The prompts file is unreadable or a line is invalid; the message names the line."""


class BatchItem(BaseModel):
    """One line of a prompts file: a prompt, or a JSON object with per-prompt options."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_iters: int | None = Field(None, ge=1, le=50)
    tags: list[str] = Field(default_factory=list)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        """The rules `artloop run` applies (config.validate_prompt: one limit everywhere)."""
        try:
            return validate_prompt(value)
        except ConfigError as e:
            raise PydanticCustomError("prompt", str(e).removeprefix("prompt ")) from None


_JSON_TYPES = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true/false",
    type(None): "null",
}


def _item(line: str, jsonl: bool) -> BatchItem:
    """One non-blank line as an item; ValueError says what is wrong with it."""
    if not jsonl and not line.lstrip().startswith("{"):
        data: Any = {"prompt": line}
    else:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            hint = "; each line of a .jsonl file is one JSON object" if jsonl else ""
            raise ValueError(f"not JSON ({e.msg} at column {e.colno}){hint}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{_JSON_TYPES[type(data)]}, not a JSON object with a prompt")
    try:
        return BatchItem.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def read_prompts(path: str | Path) -> list[BatchItem]:
    """The items of a prompts file, every line checked (blank lines skipped): in a `.jsonl` file
    each line is a JSON object; in any other a line is a prompt, or a JSON object when it
    starts with `{`. A UTF-8 byte-order mark is allowed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"cannot read prompts file {path}: {e}") from None
    jsonl = path.suffix.lower() == ".jsonl"
    items = []
    # Lines end at \n only: JSON strings may hold U+2028 and others that splitlines() breaks at.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            items.append(_item(line.removesuffix("\r"), jsonl))
        except ValueError as e:
            raise BatchError(f"{path}:{number}: {e}") from None
    if not items:
        raise BatchError(f"{path} holds no prompts")
    return items


def item_run_id(name: str, index: int, item: BatchItem) -> str:
    """A stable run id: the same batch, line and options always give the same run."""
    key = json.dumps([name, index, item.model_dump()], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class BatchResult:
    total: int
    done: int = 0  # finished in this call
    accepted: int = 0
    failed: int = 0
    skipped: int = 0  # finished before this call
    interrupted: int = 0  # stopped at a checkpoint (by `stop`); a re-run resumes them
    not_started: int = 0  # left alone once `stop` was set
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)  # run id -> error
    run_ids: list[str] = field(default_factory=list)


Progress = Callable[[BatchResult], None]


LAST_NODE = NODES[-1].__name__  # `record`: it stores the run's final status


class _Stopped(Exception):
    """Raised between two nodes of a session once the batch's `stop` is set."""


def _session(
    ctx: RefineContext, item: BatchItem, run_id: str, config: dict, stop: threading.Event
) -> str:
    """Run one session to its end (resuming it when it has a checkpoint), or until `stop` is
    set: then it is `interrupted` at its last checkpoint. Its status."""

    def check_stop(name: str, update: dict) -> None:
        if stop.is_set() and name != LAST_NODE:  # after the last one the run is finished
            raise _Stopped

    try:
        return _run(ctx, item, run_id, config, check_stop)
    except _Stopped:
        ctx.store.finish_run(run_id, "interrupted", error="stopped by Ctrl-C; run again to resume")
        return "interrupted"


def _run(
    ctx: RefineContext, item: BatchItem, run_id: str, config: dict, on_update: OnUpdate
) -> str:
    """One session to its end (resumed when it has a checkpoint); its status."""
    if item.seed is not None:
        ctx = replace(
            ctx, diffusion_config=ctx.diffusion_config.model_copy(update={"seed": item.seed})
        )
    if item.max_iters is not None:
        ctx = replace(ctx, loop=ctx.loop.model_copy(update={"max_iters": item.max_iters}))
    try:
        # Not `.next`: a process killed after a node's writes were saved, before the next
        # checkpoint, leaves that node's step with nothing in `next`, yet it is unfinished.
        resumable = view(ctx.store, run_id).unfinished
    except StoreError:
        resumable = False
    if resumable:
        return run_session(ctx, run_id=run_id, on_update=on_update).status
    config = {
        **config,
        "loop": ctx.loop.model_dump(),
        "tags": [*config.get("tags", []), *item.tags],
    }
    return run_session(
        ctx, prompt=item.prompt, run_id=run_id, config=config, on_update=on_update
    ).status


async def run_batch(
    ctx: RefineContext,
    items: list[BatchItem],
    *,
    name: str,
    concurrency: int,
    config: dict | None = None,
    on_progress: Progress | None = None,
    chats: list[Any] | None = None,
    stop: threading.Event | None = None,
    run_ids: list[str] | None = None,
) -> BatchResult:
    """Run every item's session (those finished earlier are skipped); the counts. With `chats`
    (one chat model per VLM server), sessions are spread over them in turn. Once `stop` is
    set no session starts and the running ones stop at their next checkpoint. `run_ids` gives
    each item's run id (default `item_run_id(name, index, item)`): a caller whose items have
    a stable identity of their own (an experiment's variant, prompt and seed) keeps it."""
    if run_ids is not None and len(run_ids) != len(items):
        raise ValueError(f"{len(run_ids)} run ids for {len(items)} items")
    result = BatchResult(total=len(items))
    stop = stop or threading.Event()
    start = time.perf_counter()
    config = {**(config or {}), "tags": [*(config or {}).get("tags", []), f"batch:{name}"]}
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)

    def report() -> None:
        result.seconds = time.perf_counter() - start
        if on_progress is not None:
            on_progress(result)

    async def one(pool: ThreadPoolExecutor, index: int, item: BatchItem) -> None:
        run_id = run_ids[index] if run_ids is not None else item_run_id(name, index, item)
        result.run_ids.append(run_id)
        try:
            if ctx.store.get_run(run_id)["status"] in FINAL_STATUSES:
                result.skipped += 1
                return report()
        except StoreError:
            pass  # not started yet
        async with slots:
            if stop.is_set():
                result.not_started += 1
                return report()
            session_ctx = replace(ctx, chat=chats[index % len(chats)]) if chats else ctx
            try:
                status = await loop.run_in_executor(
                    pool, _session, session_ctx, item, run_id, config, stop
                )
            except Exception as e:  # stored as `failed` with its error by the runner
                result.failed += 1
                result.errors[run_id] = f"{type(e).__name__}: {e}"[:500]
                return report()
        if status == "interrupted":
            result.interrupted += 1
        else:
            result.done += 1
            result.accepted += status == "accepted"
        report()

    # The batch's one checkpointer, shared by its sessions and closed when the batch ends.
    with (
        open_checkpointer(ctx.store),
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="session") as pool,
    ):
        await asyncio.gather(*(one(pool, i, item) for i, item in enumerate(items)))
    report()
    return result


def batch_summary(result: BatchResult) -> dict[str, Any]:
    rate = result.done / result.seconds * 60 if result.seconds > 0 else 0.0
    return {
        "total": result.total,
        "done": result.done,
        "accepted": result.accepted,
        "failed": result.failed,
        "skipped": result.skipped,
        "interrupted": result.interrupted,
        "not_started": result.not_started,
        "seconds": round(result.seconds, 2),
        "sessions_per_min": round(rate, 2),
        "errors": result.errors,
    }
