"""`artloop session ...`: interactive refinement in the terminal. A session pauses where asked
(graphs/human.py), shows the image path, the agent's proposal and the options, and goes on with
the person's answer; `q` (or the end of input, or a killed process) leaves it paused, and
`artloop session resume ID` picks it up at the same pause."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

session_app = typer.Typer(
    help="Interactive sessions: a person reviews the agents' work.", no_args_is_help=True
)
out = Console(stderr=True, highlight=False)  # stdout carries only the JSON results

# A string, not a Path: Path("") is ".", and an empty --home must be refused, not used.
HomeOpt = Annotated[str | None, typer.Option("--home", help="Home directory")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML config file")]
PauseOpt = Annotated[
    list[str] | None,
    typer.Option("--pause-at", help="prompt | plan | verdict | all (repeat; default: all)"),
]
HINTS = {
    "prompt": "a = agent's prompt, e = edit prompt/negative/seed/steps/guidance",
    "plan": "a = agent's plan, e = edit revised prompt and box edits",
    "verdict": "a = agent's verdict, y = accept this image, n = reject the edit",
}


def _ask_line(label: str, default: str = "") -> str:
    return typer.prompt(label, default=default, show_default=bool(default), err=True)


def _edit(pause: dict) -> dict:
    """Guided edit at the prompt or plan pause (Enter keeps the agent's value)."""
    proposal = pause["proposal"]
    if pause["pause"] == "prompt":
        answer: dict[str, Any] = {
            "action": "edit",
            "prompt": _ask_line("prompt", proposal["prompt"]),
            "negative_prompt": _ask_line("negative prompt", proposal["negative_prompt"]),
        }
        params = proposal["params"]
        changes = {
            k: type(params[k])(_ask_line(k, str(params[k])))
            for k in ("seed", "num_inference_steps", "guidance_scale")
        }
        return {**answer, "params": changes}
    regions = [
        {"box": r["box"], "prompt": r["prompt"], "strength": r["strength"]}
        for r in proposal["regional_edits"]
    ]
    out.print(f"box edits now: {json.dumps(regions)}")
    line = _ask_line("box edits, 'x1,y1,x2,y2: local prompt; ...' (0-1000; '-' for none)", "")
    if line.strip() == "-":
        regions = []
    elif line.strip():
        regions = []
        for part in line.split(";"):
            box, _, text = part.partition(":")
            regions.append({"box": [int(v) for v in box.split(",")], "prompt": text.strip()})
    return {
        "action": "edit",
        "prompt": _ask_line("revised prompt", proposal["revised_prompt"]),
        "regions": regions,
    }


def ask_in_terminal(pause: dict, store: Any) -> Any:
    """Show a pause and read the person's answer from stdin (see HINTS; JSON is accepted too)."""
    from artloop.cli import QUIT

    point = pause["pause"]
    out.print(
        f"\n[bold]paused at {point}[/] (run {pause['run_id']}, iteration {pause['iteration'] + 1})"
    )
    for key in ("image", "edited_image"):
        if pause.get(key):
            out.print(f"  {key}: {store.images.path(pause[key])}", soft_wrap=True)
    out.print(f"  proposal: {json.dumps(pause['proposal'], ensure_ascii=False)}", soft_wrap=True)
    out.print(f"  {HINTS[point]}, q = quit (resume later), or a JSON answer", soft_wrap=True)
    try:
        choice = _ask_line("answer", "a").strip()
        if choice.startswith("{"):
            return json.loads(choice)
        if choice == "e" and point != "verdict":
            return _edit(pause)
    except (typer.Abort, EOFError):  # end of input: leave the session paused
        return QUIT
    except ValueError as e:  # bad JSON or numbers: the session stays paused, ask again
        out.print(f"[bold red]error:[/] {e}")
        return ask_in_terminal(pause, store)
    replies = {"a": None, "q": QUIT, "y": {"action": "accept"}, "n": {"action": "reject"}}
    return replies.get(choice, {"action": choice})  # an unknown letter fails as an action


@session_app.command("new")
def new(
    prompt: Annotated[str, typer.Argument(help="What to draw")],
    pause_at: PauseOpt = None,
    max_iters: Annotated[int | None, typer.Option(help="Iterations at most")] = None,
    seed: Annotated[int | None, typer.Option(help="Diffusion seed")] = None,
    wait: Annotated[
        bool, typer.Option(help="Ask at each pause (--no-wait: stop at the first)")
    ] = True,
    home: HomeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Start a session that pauses for you (by default at every pause point)."""
    from artloop.cli import _config, _execute, fail
    from artloop.config import ConfigError, validate_prompt

    try:
        prompt = validate_prompt(prompt)
    except ConfigError as e:
        fail(str(e))
    cfg = _config(config, {"home": home, "loop.max_iters": max_iters, "diffusion.seed": seed})
    _execute(
        cfg,
        prompt=prompt,
        run_id=None,
        as_json=True,
        quiet=False,
        pause_at=pause_at or ["all"],
        ask=ask_in_terminal if wait else None,
    )


@session_app.command("resume")
def resume(
    run_id: str,
    answer: Annotated[str | None, typer.Option(help="JSON answer to the pending pause")] = None,
    wait: Annotated[bool, typer.Option(help="Ask at each later pause")] = True,
    home: HomeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Continue a session: from its pending pause (with --answer, or asked), or a crash."""
    from artloop.cli import _config, _execute, fail

    try:
        reply = json.loads(answer) if answer else None
    except json.JSONDecodeError as e:
        fail(f"--answer is not JSON: {e}")
    cfg = _config(config, {"home": home})
    if reply is None and wait:  # ask about the pending pause first, if there is one
        from artloop.graphs.context import open_store
        from artloop.graphs.sessions import view
        from artloop.store.trajectories import StoreError

        store = open_store(cfg)
        try:
            pause = view(store, run_id).pause
        except StoreError as e:
            fail(str(e))
        if pause is not None:
            from artloop.cli import QUIT

            reply = ask_in_terminal(pause, store)
            if reply is QUIT:
                return
    _execute(
        cfg,
        prompt=None,
        run_id=run_id,
        as_json=True,
        quiet=False,
        answer=reply,
        ask=ask_in_terminal if wait else None,
    )


def _store(home: str | None, config: Path | None):
    from artloop.cli import _store as existing_store

    return existing_store(home, config)  # nothing is created: a mistyped --home is an error


def _or_fail(fn, *args):
    from artloop.cli import fail
    from artloop.store.trajectories import StoreError

    try:
        return fn(*args)
    except StoreError as e:
        fail(str(e))


@session_app.command("list")
def list_(limit: int = 50, home: HomeOpt = None, config: ConfigOpt = None) -> None:
    """Sessions, newest first (JSON lines: id, status, iterations, prompt)."""
    for run in _store(home, config).list_runs(limit):
        print(json.dumps(run))


@session_app.command("show")
def show(run_id: str, home: HomeOpt = None, config: ConfigOpt = None) -> None:
    """Where a session stands: status, pending pause, and who decided each step (JSON)."""
    from dataclasses import asdict

    from artloop.graphs.sessions import view

    v = asdict(_or_fail(view, _store(home, config), run_id))
    v["steps"] = [
        {
            "iteration": s["iteration"],
            "score": s.get("score"),
            "verdict": s.get("verdict"),
            "decided_by": s.get("decided_by"),
            "human": s.get("human", {}),
        }
        for s in v["steps"]
    ]
    print(json.dumps(v, indent=2))


@session_app.command("history")
def history(run_id: str, home: HomeOpt = None, config: ConfigOpt = None) -> None:
    """A session's checkpoints, oldest first (fork from any with `session fork`)."""
    from artloop.graphs.sessions import history as checkpoints

    for point in _or_fail(checkpoints, _store(home, config), run_id):
        print(json.dumps(point))


@session_app.command("fork")
def fork(
    run_id: str,
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint id, or its index in history")],
    home: HomeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """A new session from an earlier checkpoint of RUN_ID; prints its id (resume it next)."""
    from artloop.graphs.sessions import fork as fork_at
    from artloop.graphs.sessions import history as checkpoints

    store = _store(home, config)
    if checkpoint.isdigit():  # an index into the history
        points = _or_fail(checkpoints, store, run_id)
        if int(checkpoint) >= len(points):
            from artloop.cli import fail

            fail(f"run {run_id} has {len(points)} checkpoints: no index {checkpoint}")
        checkpoint = points[int(checkpoint)]["checkpoint_id"]
    print(json.dumps({"run_id": _or_fail(fork_at, store, run_id, checkpoint)}))


@session_app.command("delete")
def delete(run_id: str, home: HomeOpt = None, config: ConfigOpt = None) -> None:
    """Delete a session's trajectory and checkpoints (its images stay, shared by hash)."""
    from artloop.graphs.sessions import delete as remove

    _or_fail(remove, _store(home, config), run_id)
    print(json.dumps({"deleted": run_id}))
