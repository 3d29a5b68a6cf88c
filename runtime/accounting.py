"""Where a step's time goes: diffusion, VLM calls, waiting (for the diffusion batch, a shared
model, a concurrency slot), and the framework itself (everything else); and the VLM's tokens.

The code that spends the time charges it to the ledger of the node it runs in (a context
variable, so concurrent sessions in threads keep their own); the node wrapper opens the ledger
and turns it into a breakdown. Seconds charged outside any ledger are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

KINDS = ("diffusion", "diffusion_wait", "vlm", "vlm_wait")
# Prompt tokens sent, those of them whose prefill was reused (a prefix cache), answer tokens.
TOKENS = ("prompt_tokens", "cached_tokens", "completion_tokens")
_ledger: ContextVar[dict[str, float] | None] = ContextVar("artloop_ledger", default=None)


def count(kind: str, tokens: int) -> None:
    """Add `tokens` of `kind` (one of TOKENS) to the open ledger, if any."""
    entries = _ledger.get()
    if entries is not None:
        entries[kind] += tokens


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
def ledger() -> Iterator[dict[str, float]]:
    """Collect the charges of the code run inside (raw: see `breakdown`)."""
    entries: dict[str, float] = {**dict.fromkeys(KINDS, 0.0), **dict.fromkeys(TOKENS, 0)}
    token = _ledger.set(entries)
    try:
        yield entries
    finally:
        _ledger.reset(token)


def breakdown(entries: dict[str, float], total: float) -> dict[str, float]:
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
