"""Batch collection: many refine sessions at once, for training data.

Sessions run concurrently (an asyncio loop hands each to a worker thread, at most `concurrency`
at a time); their diffusion requests meet in the tool's batcher and their agent calls go to the
server together. Each session has a run id derived from the batch name, its line and its options,
so a re-run skips the finished ones and resumes the rest from their checkpoints. A failed
session is stored with its error and does not stop the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from artloop.graphs.context import RefineContext
from artloop.graphs.runner import run_session
from artloop.graphs.sessions import view
from artloop.tools.store import FINAL_STATUSES, StoreError
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class BatchError(ValueError):
    """The prompts file is unreadable or a line is invalid; the message names the line."""


class BatchItem(BaseModel):
    """One line of a prompts file: a prompt, or a JSON object with per-prompt options."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=10_000)
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_iters: int | None = Field(None, ge=1, le=50)
    tags: list[str] = Field(default_factory=list)


def read_prompts(path: str | Path) -> list[BatchItem]:
    """The items of a prompts file: one prompt per line, or JSONL (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"cannot read prompts file {path}: {e}") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line) if line.lstrip().startswith("{") else {"prompt": line.strip()}
            items.append(BatchItem.model_validate(data))
        except (json.JSONDecodeError, ValidationError) as e:
            first = str(e).splitlines()[0] if isinstance(e, json.JSONDecodeError) else (
                f"{'.'.join(map(str, e.errors()[0]['loc']))}: {e.errors()[0]['msg']}")  # fmt: skip
            raise BatchError(f"{path}:{number}: {first}") from None
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
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)  # run id -> error
    run_ids: list[str] = field(default_factory=list)


Progress = Callable[[BatchResult], None]


def _session(ctx: RefineContext, item: BatchItem, run_id: str, config: dict) -> str:
    """Run one session to its end (resuming it when it has a checkpoint); its status."""
    if item.seed is not None:
        ctx = replace(
            ctx, diffusion_config=ctx.diffusion_config.model_copy(update={"seed": item.seed})
        )
    if item.max_iters is not None:
        ctx = replace(ctx, loop=ctx.loop.model_copy(update={"max_iters": item.max_iters}))
    try:
        resumable = bool(view(ctx.store, run_id).next)
    except StoreError:
        resumable = False
    if resumable:
        return run_session(ctx, run_id=run_id).status
    config = {
        **config,
        "loop": ctx.loop.model_dump(),
        "tags": [*config.get("tags", []), *item.tags],
    }
    return run_session(ctx, prompt=item.prompt, run_id=run_id, config=config).status


async def run_batch(ctx: RefineContext, items: list[BatchItem], *, name: str, concurrency: int,
                    config: dict | None = None, on_progress: Progress | None = None,
                    chats: list[Any] | None = None) -> BatchResult:  # fmt: skip
    """Run every item's session (those finished earlier are skipped); the counts. With `chats`
    (one chat model per VLM server), sessions are spread over them in turn."""
    result = BatchResult(total=len(items))
    start = time.perf_counter()
    config = {**(config or {}), "tags": [*(config or {}).get("tags", []), f"batch:{name}"]}
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)

    def report() -> None:
        result.seconds = time.perf_counter() - start
        if on_progress is not None:
            on_progress(result)

    async def one(pool: ThreadPoolExecutor, index: int, item: BatchItem) -> None:
        run_id = item_run_id(name, index, item)
        result.run_ids.append(run_id)
        try:
            if ctx.store.get_run(run_id)["status"] in FINAL_STATUSES:
                result.skipped += 1
                return report()
        except StoreError:
            pass  # not started yet
        async with slots:
            session_ctx = replace(ctx, chat=chats[index % len(chats)]) if chats else ctx
            try:
                status = await loop.run_in_executor(
                    pool, _session, session_ctx, item, run_id, config
                )
            except Exception as e:  # stored as `failed` with its error by the runner
                result.failed += 1
                result.errors[run_id] = f"{type(e).__name__}: {e}"[:500]
                return report()
        result.done += 1
        result.accepted += status == "accepted"
        report()

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="session") as pool:
        await asyncio.gather(*(one(pool, i, item) for i, item in enumerate(items)))
    report()
    return result


def batch_summary(result: BatchResult) -> dict[str, Any]:
    rate = result.done / result.seconds * 60 if result.seconds > 0 else 0.0
    return {"total": result.total, "done": result.done, "accepted": result.accepted,
            "failed": result.failed, "skipped": result.skipped, "seconds": round(result.seconds, 2),
            "sessions_per_min": round(rate, 2), "errors": result.errors}  # fmt: skip
