"""Where a step's time goes: diffusion, VLM calls, waiting (for the diffusion batch, a shared
model, a concurrency slot), and the framework itself (everything else); and the VLM's calls,
each with its tokens.

The code that spends the time charges it to the ledger of the node it runs in (a context
variable, so concurrent sessions in threads keep their own); the node wrapper opens the ledger
and turns it into a breakdown, and puts the calls (`vlm_call`) in the step. Seconds charged
outside any ledger are dropped. `session_totals` sums a session's stored steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

KINDS = ("diffusion", "diffusion_wait", "vlm", "vlm_wait")
# Prompt tokens sent, those of them whose prefill was reused (a prefix cache), answer tokens.
TOKENS = ("prompt_tokens", "cached_tokens", "completion_tokens")
_ledger: ContextVar[dict[str, Any] | None] = ContextVar("artloop_ledger", default=None)


def charge(kind: str, seconds: float) -> None:
    """Add `seconds` of `kind` (one of KINDS) to the open ledger, if any."""
    entries = _ledger.get()
    if entries is not None:
        entries[kind] += seconds


@contextmanager
def timed(kind: str) -> Iterator[None]:
    """Charge the time spent inside to `kind`. A `*_wait` charged inside is part of it."""
    start = time.perf_counter()
    try:
        yield
    finally:
        charge(kind, time.perf_counter() - start)


@contextmanager
def vlm_call(agent: str, attempt: int, backend: str) -> Iterator[dict[str, Any]]:
    """One request to the VLM: its time inside is charged to `vlm` (waiting for a slot or a
    batch included, as `vlm_wait`), and its record goes to the open ledger's `calls`. The
    caller fills in the record's tokens (None where the backend does not say) and, for an
    answer it refuses, `error`; a request that raises records the exception as its error.

    The record: agent, attempt (1-based: repairs of an invalid answer count up), backend,
    prompt_tokens, cached_tokens (of them, those whose prefill was reused), completion_tokens,
    seconds (the request's latency, waiting included), wait (of it, waiting), retries
    (transport retries before the answer), error (None for a valid answer)."""
    entries = _ledger.get()
    waited = entries["vlm_wait"] if entries is not None else 0.0
    record: dict[str, Any] = {
        "agent": agent,
        "attempt": attempt,
        "backend": backend,
        **dict.fromkeys(TOKENS),
        "seconds": 0.0,
        "wait": 0.0,
        "retries": 0,
        "error": None,
    }
    start = time.perf_counter()
    try:
        yield record
    except BaseException as e:
        record["error"] = f"{type(e).__name__}: {e}"[:500]
        raise
    finally:
        record["seconds"] = time.perf_counter() - start
        charge("vlm", record["seconds"])
        if entries is not None:
            record["wait"] = entries["vlm_wait"] - waited
            for kind in TOKENS:
                entries[kind] += record[kind] or 0
            entries["calls"].append(record)


@contextmanager
def ledger() -> Iterator[dict[str, Any]]:
    """Collect the charges of the code run inside (raw: see `breakdown`), and its VLM calls'
    records (`calls`, in order)."""
    entries: dict[str, Any] = {
        **dict.fromkeys(KINDS, 0.0),
        **dict.fromkeys(TOKENS, 0),
        "calls": [],
    }
    token = _ledger.set(entries)
    try:
        yield entries
    finally:
        _ledger.reset(token)


def breakdown(entries: dict[str, Any], total: float) -> dict[str, float]:
    """Seconds of diffusion, vlm and wait (disjoint), framework = the rest of `total`; and
    the tokens counted, where the VLM was called."""
    wait = entries["diffusion_wait"] + entries["vlm_wait"]
    diffusion = entries["diffusion"] - entries["diffusion_wait"]
    vlm = entries["vlm"] - entries["vlm_wait"]
    tokens = {k: entries.get(k, 0) for k in TOKENS}
    return {
        "diffusion": diffusion,
        "vlm": vlm,
        "wait": wait,
        "framework": max(0.0, total - diffusion - vlm - wait),
        "total": total,
        **(tokens if any(tokens.values()) else {}),
    }


def add_up(parts: list[dict[str, float]]) -> dict[str, float]:
    """The sum of several breakdowns (a step's nodes, a run's steps): seconds, and the tokens
    where any part counted them."""
    keys = ("diffusion", "vlm", "wait", "framework", "total")
    out = {k: sum(p.get(k, 0.0) for p in parts) for k in keys}
    if any(k in p for p in parts for k in TOKENS):
        out |= {k: sum(p.get(k, 0) for p in parts) for k in TOKENS}
    return out


def describe_calls(calls: list[dict[str, Any]]) -> str:
    """Some VLM calls (`vlm_call` records) in brief: how many (failed ones among them: an
    answer refused, a request that raised), their prompt + completion tokens where the backend
    says (and the prompt tokens cached) and seconds: "5 calls (1 failed), 2380+210 tokens (1200
    cached), 3.10s"."""
    if not calls:
        return "no VLM calls"
    failed = sum(1 for c in calls if c.get("error"))
    out = f"{len(calls)} call{'s' if len(calls) != 1 else ''}"
    out += f" ({failed} failed)" if failed else ""

    def total(key: str) -> int | None:
        known = [c[key] for c in calls if c.get(key) is not None]
        return sum(known) if known else None

    prompt, cached = total("prompt_tokens"), total("cached_tokens")
    completion = total("completion_tokens")
    if prompt is not None or completion is not None:
        out += f", {prompt or 0}+{completion or 0} tokens"
        out += f" ({cached} cached)" if cached is not None else ""
    return out + f", {sum(c.get('seconds', 0.0) for c in calls):.2f}s"


# --- a session's totals, from its stored steps -------------------------------------------------
TOTALS = (
    "steps",
    "calls",  # VLM requests, repairs included (steps stored before call records: 0)
    "failed_calls",  # of them, those whose answer was refused or that raised
    "prompt_tokens",
    "cached_tokens",  # counted where the backend reports them (vLLM, in-process), else 0
    "completion_tokens",
    "vlm_tokens",  # prompt + completion: what loop.max_vlm_tokens caps
    "vlm_seconds",
    "diffusion_seconds",
    "wait_seconds",
    "wall_seconds",  # the nodes' time: what loop.max_seconds caps
)


def step_totals(step: dict[str, Any]) -> dict[str, float]:
    """One stored step's totals (the keys of TOTALS): its VLM calls, their tokens, and the
    seconds of its nodes (`accounting`) by kind."""
    spent = add_up(list(step.get("accounting", {}).values()))
    calls = step.get("calls", [])
    tokens = {k: int(spent.get(k, 0)) for k in TOKENS}
    return {
        "steps": 1,
        "calls": len(calls),
        "failed_calls": sum(1 for c in calls if c.get("error")),
        **tokens,
        "vlm_tokens": tokens["prompt_tokens"] + tokens["completion_tokens"],
        "vlm_seconds": spent["vlm"],
        "diffusion_seconds": spent["diffusion"],
        "wait_seconds": spent["wait"],
        "wall_seconds": spent["total"],
    }


def sum_totals(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """The sum of several totals (a session's steps, a variant's sessions)."""
    parts = list(parts)
    return {k: sum(p.get(k, 0) for p in parts) for k in TOTALS}


def session_totals(steps: Iterable[dict[str, Any]]) -> dict[str, float]:
    """A session's totals from its stored steps (`store.get_run(run_id)["steps"]`): steps,
    VLM calls (failed ones among them), prompt / cached / completion tokens and their sum
    `vlm_tokens`, and seconds of VLM, diffusion, waiting and in all (`wall_seconds`: the time
    its nodes ran, not the time it waited paused for a person). `sum_totals` adds sessions up."""
    return sum_totals(step_totals(s) for s in steps)
