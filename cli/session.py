"""`artloop session ...`: interactive refinement in the terminal. A session pauses where asked
(graphs/human.py), shows the image path, the agent's proposal and the options, and goes on with
the person's answer; `q` (or the end of input, or a killed process) leaves it paused, and
`artloop session resume ID` picks it up at the same pause."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Any

import typer
from artloop.cli.common import (
    QUIT,
    ConfigOpt,
    FactScorerOpt,
    HomeOpt,
    MaxItersOpt,
    SeedOpt,
    WatchOpt,
    err,
    existing_store,
    fail,
    failing,
    or_fail,
    overrides,
    read_config,
)
from artloop.cli.execute import execute
from artloop.config import ConfigError, validate_prompt

app = typer.Typer(
    help="Interactive sessions: a person reviews the agents' work.", no_args_is_help=True
)
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
    err.print(f"box edits now: {json.dumps(regions)}")
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
    point = pause["pause"]
    err.print(
        f"\n[bold]paused at {point}[/] (run {pause['run_id']}, iteration {pause['iteration'] + 1})"
    )
    for key in ("image", "edited_image"):
        if pause.get(key):
            err.print(f"  {key}: {store.images.path(pause[key])}", soft_wrap=True)
    err.print(f"  proposal: {json.dumps(pause['proposal'], ensure_ascii=False)}", soft_wrap=True)
    err.print(f"  {HINTS[point]}, q = quit (resume later), or a JSON answer", soft_wrap=True)
    try:
        choice = _ask_line("answer", "a").strip()
        if choice.startswith("{"):
            return json.loads(choice)
        if choice == "e" and point != "verdict":
            return _edit(pause)
    except (typer.Abort, EOFError):  # end of input: leave the session paused
        return QUIT
    except ValueError as e:  # bad JSON or numbers: the session stays paused, ask again
        err.print(f"[bold red]error:[/] {e}")
        return ask_in_terminal(pause, store)
    replies = {"a": None, "q": QUIT, "y": {"action": "accept"}, "n": {"action": "reject"}}
    return replies.get(choice, {"action": choice})  # an unknown letter fails as an action


@app.command("new")
def new(
    prompt: Annotated[str, typer.Argument(help="What to draw")],
    pause_at: PauseOpt = None,
    max_iters: MaxItersOpt = None,
    seed: SeedOpt = None,
    fact_scorer: FactScorerOpt = None,
    watch: WatchOpt = None,
    wait: Annotated[
        bool, typer.Option(help="Ask at each pause (--no-wait: stop at the first)")
    ] = True,
    home: HomeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Start a session that pauses for you (by default at every pause point)."""
    with failing(ConfigError):
        prompt = validate_prompt(prompt)
    cfg = read_config(
        config,
        {
            "home": home,
            **overrides(max_iters=max_iters, seed=seed, fact_scorer=fact_scorer, watch=watch),
        },
    )
    execute(
        cfg,
        prompt=prompt,
        run_id=None,
        as_json=True,
        quiet=False,
        pause_at=pause_at or ["all"],
        ask=ask_in_terminal if wait else None,
    )


@app.command("resume")
def resume(
    run_id: str,
    answer: Annotated[str | None, typer.Option(help="JSON answer to the pending pause")] = None,
    wait: Annotated[bool, typer.Option(help="Ask at each later pause")] = True,
    home: HomeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Continue a session: from its pending pause (with --answer, or asked), or a crash."""
    try:
        reply = json.loads(answer) if answer else None
    except json.JSONDecodeError as e:
        fail(f"--answer is not JSON: {e}")
    cfg = read_config(config, {"home": home})
    if reply is None and wait:  # ask about the pending pause first, if there is one
        # deliberately lazy (startup time): the store and the graphs
        from artloop.graphs.context import open_store
        from artloop.graphs.sessions import view

        store = open_store(cfg)
        pause = or_fail(view, store, run_id).pause
        if pause is not None:
            reply = ask_in_terminal(pause, store)
            if reply is QUIT:
                return
    execute(
        cfg,
        prompt=None,
        run_id=run_id,
        as_json=True,
        quiet=False,
        answer=reply,
        ask=ask_in_terminal if wait else None,
    )


@app.command("list")
def list_(limit: int = 50, home: HomeOpt = None, config: ConfigOpt = None) -> None:
    """Sessions, newest first (JSON lines: id, status, iterations, prompt)."""
    for run in existing_store(home, config).list_runs(limit):
        print(json.dumps(run))


@app.command("show")
def show(run_id: str, home: HomeOpt = None, config: ConfigOpt = None) -> None:
    """Where a session stands: status, pending pause, and who decided each step (JSON)."""
    from artloop.graphs.sessions import view  # deliberately lazy (startup time)

    v = asdict(or_fail(view, existing_store(home, config), run_id))
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


@app.command("history")
def history(run_id: str, home: HomeOpt = None, config: ConfigOpt = None) -> None:
    """A session's checkpoints, oldest first (fork from any with `session fork`)."""
    from artloop.graphs.sessions import history as checkpoints  # deliberately lazy (startup time)

    for point in or_fail(checkpoints, existing_store(home, config), run_id):
        print(json.dumps(point))


@app.command("fork")
def fork(
    run_id: str,
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint id, or its index in history")],
    home: HomeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """A new session from an earlier checkpoint of RUN_ID; prints its id (resume it next)."""
    # deliberately lazy (startup time): the graphs
    from artloop.graphs.sessions import fork as fork_at
    from artloop.graphs.sessions import history as checkpoints

    store = existing_store(home, config)
    if checkpoint.isdigit():  # an index into the history
        points = or_fail(checkpoints, store, run_id)
        if int(checkpoint) >= len(points):
            fail(f"run {run_id} has {len(points)} checkpoints: no index {checkpoint}")
        checkpoint = points[int(checkpoint)]["checkpoint_id"]
    print(json.dumps({"run_id": or_fail(fork_at, store, run_id, checkpoint)}))


@app.command("delete")
def delete(run_id: str, home: HomeOpt = None, config: ConfigOpt = None) -> None:
    """Delete a session's trajectory and checkpoints (its images stay, shared by hash)."""
    from artloop.graphs.sessions import delete as remove  # deliberately lazy (startup time)

    or_fail(remove, existing_store(home, config), run_id)
    print(json.dumps({"deleted": run_id}))
