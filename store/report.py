"""An HTML report of one trajectory: every iteration's images next to each agent's output."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from artloop.runtime.accounting import add_up, describe_calls
from artloop.store.trajectories import TrajectoryStore
from artloop.tools.images import atomic_write
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

_env = Environment(
    loader=PackageLoader("artloop.store", "."),
    autoescape=select_autoescape(["html", "jinja"]),  # prompts and model output are untrusted
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False)
_env.filters["when"] = lambda t: datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_op(op: dict) -> str:
    """One edit op's caption from whatever it recorded (img2img and inpaint have a strength,
    tone has its factors, a later kind has its own): the template assumes no field."""
    details = [
        f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in op.items()
        if k not in ("op", "image", "prompt")
    ]
    caption = f"{op.get('op', 'edit')} ({', '.join(details)})" if details else op.get("op", "edit")
    return f"{caption}: {op['prompt']}" if op.get("prompt") else caption


_env.filters["describe_op"] = describe_op

AGENT_ORDER = ("enhance", "data_cot", "concept_cot", "thesis_cot", "validate")


def spent(step: dict) -> dict[str, float]:
    """Where a step's time went: diffusion, VLM, waiting, framework (runtime/accounting.py)."""
    return add_up(list(step.get("accounting", {}).values()))


def by_agent(calls: list[dict]) -> str:
    """The calls per agent, in order: "enhance 1, concept_cot 2, validate 1"."""
    counts: dict[str, int] = {}
    for c in calls:
        counts[c["agent"]] = counts.get(c["agent"], 0) + 1
    return ", ".join(f"{agent} {n}" for agent, n in counts.items())


def write_report(store: TrajectoryStore, run_id: str) -> Path:
    """Render home/reports/<run_id>.html (images linked relatively from the store)."""
    run = store.get_run(run_id)
    out = store.home / "reports" / f"{run_id}.html"

    def src(digest: str | None) -> str | None:
        return os.path.relpath(store.images.path(digest), out.parent) if digest else None

    html = _env.get_template("report.html.jinja").render(
        run=run,
        steps=run["steps"],
        src=src,
        agent_order=AGENT_ORDER,
        spent=spent,
        describe_calls=describe_calls,
        by_agent=by_agent,
        all_calls=[c for step in run["steps"] for c in step.get("calls", [])],
    )
    atomic_write(out, html.encode("utf-8"))
    return out
