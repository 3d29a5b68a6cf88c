"""A finished session's record for the tracker its config names (`[tracking]`): what it ran
with, how it ended, its scores and watch scores per iteration, its totals (VLM calls, tokens,
seconds) and its final image. The logging itself is runtime/tracking.py's `log_metrics`."""

from __future__ import annotations

import logging
from typing import Any

from artloop.graphs.context import RefineContext
from artloop.runtime.accounting import session_totals
from artloop.runtime.tracking import log_metrics

log = logging.getLogger(__name__)


def session_record(run: dict[str, Any], seconds: float | None = None) -> dict[str, Any]:
    """A stored run (`store.get_run`) as `log_metrics`' keyword arguments: `params` (its
    prompt, status, config, models, prompts version), `metrics` (iterations, best score, accepted as 1/0,
    the session's totals as `totals.*`, the seconds this session took), `series` (per
    iteration: `score`, and `watch.<scorer>.image` / `.edited` where the loop watches) and
    `images` (`final`, the best image's file, where there is one: set by the caller)."""
    steps = run["steps"]  # in order of iteration: step i + 1 is steps[i]
    series: dict[str, list[float | None]] = {"score": [s.get("score") for s in steps]}
    for at, step in enumerate(steps):
        for where, scores in (step.get("watch") or {}).items():
            for name, found in scores.items():
                if isinstance(found, dict) and found.get("score") is not None:
                    key = f"watch.{name}.{where}"
                    series.setdefault(key, [None] * len(steps))[at] = found["score"]
    totals = session_totals(steps)
    return {
        "params": {
            "run_id": run["run_id"],
            "prompt": run.get("prompt"),
            "status": run.get("status"),
            "config": run.get("config") or {},
            "models": run.get("models") or {},
            "prompts_version": run.get("prompts_version"),
        },
        "metrics": {
            "iterations": len(steps),
            "best_score": run.get("best_score"),
            "accepted": 1.0 if run.get("status") == "accepted" else 0.0,
            "seconds": seconds,
            **{f"totals.{k}": v for k, v in totals.items()},
        },
        "series": series,
    }


def track_session(ctx: RefineContext, run_id: str, seconds: float | None = None) -> str | None:
    """Log the stored session `run_id` to `ctx.tracking_config`'s tracker (nothing with backend
    none); the tracker's run identity. A tracker that fails is a warning: the session's own
    record, in the store, is complete either way."""
    tracking = ctx.tracking_config
    if tracking.backend == "none":
        return None
    try:
        run = ctx.store.get_run(run_id)
        record = session_record(run, seconds)
        best = run.get("final_image")
        images = {"final": ctx.store.images.path(best)} if best else {}
        return log_metrics(tracking, run_id, images=images, home=ctx.store.home, **record)
    except Exception as e:  # a tracker outage must not fail a session that finished
        log.warning("tracking: run %s was not logged to %s: %s", run_id, tracking.backend, e)
        return None
