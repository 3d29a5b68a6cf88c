"""`artloop run`, `resume`, `show` and `list`: one refine session, and the runs stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from artloop.cli.common import (
    BaseUrlOpt,
    ChatBackendOpt,
    ChatModelOpt,
    ConfigOpt,
    DiffusionModelOpt,
    FactScorerOpt,
    HomeOpt,
    JsonOpt,
    JudgeOpt,
    MaxItersOpt,
    QuietOpt,
    SeedOpt,
    TagOpt,
    WatchOpt,
    existing_store,
    failing,
    or_fail,
    overrides,
    read_config,
)
from artloop.cli.execute import execute
from artloop.config import ConfigError, validate_prompt
from artloop.runtime.accounting import describe_calls
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def printable(text: str) -> str:
    """`text` safe to print on a terminal: control and other invisible characters (ANSI
    escapes, bidi overrides) as Python escapes, rich markup escaped."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return escape(shown)


def run(
    prompt: Annotated[str, typer.Argument(help="What to draw")],
    max_iters: MaxItersOpt = None,
    seed: SeedOpt = None,
    chat_backend: ChatBackendOpt = None,
    chat_model: ChatModelOpt = None,
    base_url: BaseUrlOpt = None,
    diffusion_model: DiffusionModelOpt = None,
    judge: JudgeOpt = None,
    fact_scorer: FactScorerOpt = None,
    watch: WatchOpt = None,
    tag: TagOpt = None,
    home: HomeOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    image: Annotated[
        Path | None,
        typer.Option(
            "--image",
            help="Start from this image (PNG, JPEG, WebP, ...) instead of drawing one: the loop "
            "edits it towards PROMPT",
        ),
    ] = None,
) -> None:
    """Refine an image for PROMPT with the agent loop; prints progress, the run id and a report."""
    with failing(ConfigError):
        prompt = validate_prompt(prompt)
    flags = overrides(
        max_iters=max_iters,
        seed=seed,
        chat_backend=chat_backend,
        chat_model=chat_model,
        base_url=base_url,
        diffusion_model=diffusion_model,
        judge=judge,
        fact_scorer=fact_scorer,
        watch=watch,
        tag=tag,
    )
    cfg = read_config(config, {"home": home, **flags})
    execute(cfg, prompt=prompt, run_id=None, as_json=as_json, quiet=quiet, image=image)


def resume(
    run_id: str,
    home: HomeOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Continue an interrupted or failed run from its last checkpoint."""
    cfg = read_config(config, {"home": home})
    execute(cfg, prompt=None, run_id=run_id, as_json=as_json, quiet=quiet)


def show(
    run_id: str, home: HomeOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False
) -> None:
    """Print a trajectory."""
    from artloop.store.report import spent  # deliberately lazy (startup time)

    run = or_fail(existing_store(home, config).get_run, run_id)
    if as_json:
        print(json.dumps(run, indent=2))
        return
    out = Console(highlight=False)  # prompts and model output go through printable()
    out.print(
        f"[bold]{run['run_id']}[/]  {run['status']}  best {run['best_score']}  "
        f"{printable(repr(run['prompt']))}"
    )
    out.print(f"models: {printable(json.dumps(run['models']))}")
    for step in run["steps"]:
        out.print(
            f"\n[bold]iteration {step['iteration'] + 1}[/]: {step.get('verdict')} "
            f"score {step.get('score')}  seed {step['params']['seed']}"
        )
        out.print(f"  prompt: {printable(step['prompt'])}")
        given = "  (the person's image)" if step.get("from_image") else ""
        out.print(f"  image {step['image']}{given}  ->  edited {step.get('edited_image')}")
        for name, answer in step.get("agents", {}).items():
            shown = printable(json.dumps(answer, ensure_ascii=False))
            out.print(f"  {name}: {shown}", soft_wrap=True)
        out.print(f"  timings: {json.dumps({k: round(v, 3) for k, v in step['timings'].items()})}")
        t = spent(step)
        out.print(
            f"  time spent: diffusion {t['diffusion']:.2f}s, VLM {t['vlm']:.2f}s, waiting "
            f"{t['wait']:.2f}s, framework {t['framework']:.2f}s"
        )
        if "calls" in step:
            out.print(f"  VLM calls: {describe_calls(step['calls'])}")
        if step.get("budget"):
            out.print(f"  budget (session so far): {json.dumps(step['budget'])}")
        out.print(f"  parse failures: {json.dumps(step.get('parse_failures', {}))}")
    if run.get("error"):
        out.print(f"\nerror: {printable(run['error'])}")


def list_runs(home: HomeOpt = None, config: ConfigOpt = None, limit: int = 20) -> None:
    """List recent runs."""
    table = Table("run", "status", "iterations", "best", "prompt")
    for r in existing_store(home, config).list_runs(limit):
        best = "" if r["best_score"] is None else f"{r['best_score']:.2f}"
        status = r["status"] + (f" at {r['paused_at']}" if r["paused_at"] else "")
        if r["status"] == "failed" and r["error"]:  # with its cause
            status += f": {printable(r['error'][:80])}"
        table.add_row(r["run_id"], status, str(r["iterations"]), best, printable(r["prompt"][:60]))
    Console().print(table)
