"""Start or resume one session and report it: what `run`, `resume`, `session new` and
`session resume` share (progress lines on stderr, the report, the summary)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from artloop.cli.common import QUIT, err, fail, or_fail, quiet_libraries
from artloop.config import ArtloopConfig, ConfigError, LoopConfig
from artloop.runtime.accounting import describe_calls, session_totals

# (pause payload, store) -> an answer dict, None (the agent decides) or QUIT
Ask = Callable[[dict, Any], Any]


def _summarise(name: str, update: dict) -> str:
    step = update.get("step", {})
    out = step.get("agents", {})
    match name:
        case "enhance" | "compose":
            return f"prompt: {step.get('prompt', '')[:70]!r}"
        case "pick" if step.get("candidates"):
            kept = step["candidates"][step["picked"]]
            return f"seed {kept['seed']} of {len(step['candidates'])}, score {kept['score']:.2f}"
        case "generate" if step.get("candidates"):  # best-of: pick keeps one
            return f"{len(step['candidates'])} candidates"
        case "generate" | "edit":
            digest = step.get("image" if name == "generate" else "edited_image") or ""
            extra = f", {len(step.get('edits', []))} edit(s)" if name == "edit" else ""
            extra += " (the person's)" if name == "generate" and step.get("from_image") else ""
            watched = step.get("watch", {}).get("image" if name == "generate" else "edited", {})
            extra += "".join(f", {k} {v['score']:.2f}" for k, v in watched.items() if "score" in v)
            return f"image {digest[:12]}{extra}"
        case "data_cot":
            return f"{len(out.get('data_cot', {}).get('objects', []))} object(s) found"
        case "concept_cot":
            c = out.get("concept_cot", {})
            return (
                f"{len(c.get('artifacts', []))} artifact(s), alignment {c.get('prompt_alignment')}"
            )
        case "thesis_cot" | "critic":
            return f"{len(out.get('thesis_cot', {}).get('regional_edits', []))} regional edit(s)"
        case "validate":
            v = out.get("validate", {})
            return f"{v.get('verdict')} score {v.get('score', 0):.2f}"
        case "decide":
            who = step.get("decided_by", {}).get("verdict", "agent")
            out = f"{step.get('verdict')} ({who}) -> {update.get('status') or 'revise'}"
            if update.get("status") == "budget":
                out += f" ({_budget(step['budget'])})"
            return out
    return ""


def _budget(used: dict) -> str:
    """The budgets a session spent: "max_vlm_tokens: 1020 tokens of 600"."""
    parts = []
    if "max_vlm_tokens" in used["spent"]:
        parts.append(f"max_vlm_tokens: {used['vlm_tokens']} tokens of {used['max_vlm_tokens']}")
    if "max_seconds" in used["spent"]:
        parts.append(f"max_seconds: {used['seconds']:.1f}s of {used['max_seconds']:g}s")
    return "; ".join(parts)


def _calls(name: str, step: dict) -> str:
    """The node's VLM calls in brief (decide: the iteration's), after its progress line."""
    calls = step.get("calls", [])
    if name == "decide":
        return f"  [dim]| iteration: {describe_calls(calls)}[/]" if calls else ""
    calls = [c for c in calls if c.get("node") == name]
    return f"  [dim]| {describe_calls(calls)}[/]" if calls else ""


def _progress(name: str, update: dict) -> None:
    step = update.get("step", {})
    seconds = step.get("timings", {}).get(name, 0.0)
    iteration = step.get("iteration")
    where = f"iter {iteration + 1}" if iteration is not None and name != "record" else "done  "
    line = f"{_summarise(name, update)}{_calls(name, step) if name != 'record' else ''}"
    # One line each, however narrow the terminal (a log read later, a pipe's 80 columns).
    err.print(f"[dim]\\[{where}][/] {name:<11} {seconds:6.2f}s  {line}", soft_wrap=True)


def _stored_loop(cfg: ArtloopConfig, run_id: str | None) -> ArtloopConfig:
    """`cfg` with the loop settings stored with run `run_id`."""
    from artloop.graphs.context import open_store  # deliberately lazy (startup time)

    stored = or_fail(lambda: open_store(cfg).get_run(run_id or "")["config"].get("loop"))
    return cfg.model_copy(update={"loop": LoopConfig(**stored)}) if stored else cfg


def execute(
    cfg: ArtloopConfig,
    *,
    prompt: str | None,
    run_id: str | None,
    as_json: bool,
    quiet: bool,
    pause_at: list[str] | None = None,
    answer: dict | None = None,
    ask: Ask | None = None,
    image: Path | None = None,
) -> None:
    """Start (a `prompt`) or resume (a `run_id`) a session and report it. A session that pauses
    for a person is handed to `ask` at each pause (or left paused when there is none). `image`:
    the person's image file, the new session's first image (imported into the store)."""
    # deliberately lazy (startup time): the graphs, the models and the diffusion tool
    from artloop.graphs.context import build_context
    from artloop.graphs.human import HumanActionError
    from artloop.graphs.runner import CheckpointerError, open_checkpointer, run_session
    from artloop.models.chat import check_chat_model
    from artloop.models.structured import ChatServerError, StructuredOutputError
    from artloop.store.report import write_report
    from artloop.store.trajectories import new_run_id
    from artloop.tools.diffusion import DiffusionError
    from artloop.tools.images import ImageStoreError, import_image

    try:
        if prompt is None:  # a resumed run keeps the loop rules it started with
            cfg = _stored_loop(cfg, run_id)
        check_chat_model(cfg.chat)
        quiet_libraries()
        ctx = build_context(cfg)
        ctx.models()  # resolves both models: an unknown one fails here, before anything is stored
    except (ConfigError, DiffusionError) as e:
        fail(str(e))
    init_image = None
    if image is not None:  # at the size the model draws at; a refused file stores nothing
        size = (ctx.diffusion_config.width, ctx.diffusion_config.height)
        try:
            init_image = import_image(ctx.store.images, image, size)
        except ImageStoreError as e:
            fail(f"--image {image}: {e}")
    run_id = run_id or new_run_id()
    progress = None if quiet else _progress
    try:
        with open_checkpointer(ctx.store):  # this command's one saver, closed when it ends
            summary = run_session(
                ctx,
                prompt=prompt,
                run_id=run_id,
                config=cfg.public_dict(),
                on_update=progress,
                pause_at=pause_at,
                answer=answer,
                init_image=init_image,
            )
            while summary.status == "paused" and ask is not None:
                reply = ask(summary.pause, ctx.store)
                if reply is QUIT:
                    break
                try:
                    summary = run_session(ctx, run_id=run_id, on_update=progress, answer=reply)
                except HumanActionError as e:  # the session stays paused: ask again
                    err.print(f"[bold red]error:[/] {e}")
    except CheckpointerError as e:  # it could not be opened: nothing was stored or changed
        fail(str(e))
    except HumanActionError as e:
        fail(str(e))
    except (StructuredOutputError, ChatServerError, DiffusionError) as e:
        fail(f"{e} (the run is saved; continue with: artloop resume {run_id})", code=1)
    except ValueError as e:  # unknown run, nothing left to resume
        fail(str(e))
    except Exception as e:  # e.g. a server error from a client library: still one line
        fail(f"{type(e).__name__}: {e} (continue with: artloop resume {run_id})", code=1)
    report = write_report(ctx.store, summary.run_id)
    totals = session_totals(ctx.store.get_run(summary.run_id)["steps"])
    if summary.status == "paused":
        err.print(
            f"run [bold]{summary.run_id}[/] is paused at {summary.pause['pause']}; "
            f"continue with: artloop session resume {summary.run_id}"
        )
    if as_json:
        out = {**asdict(summary), "report": str(report), "home": str(cfg.home), "totals": totals}
        print(json.dumps(out))
    else:
        err.print(
            f"run [bold]{summary.run_id}[/]: {summary.status} after {summary.iterations} "
            f"iteration(s), best score {summary.best_score}, {summary.seconds:.1f}s, "
            f"{totals['calls']} VLM call(s), {totals['vlm_tokens']} tokens",
            soft_wrap=True,
        )
        err.print(f"report: {report}")
