"""The `artloop` command line (Typer)."""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from contextvars import ContextVar
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from artloop.graphs.batch_cli import batch_command
from artloop.graphs.cli import session_app
from artloop.trainers.cli import eval_command, train_app
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

_debug: ContextVar[bool] = ContextVar("artloop_debug", default=False)


class _Commands(TyperGroup):
    """The root command: an error that escapes a command is still one line (a StoreError is bad
    input, exit 2; anything else exit 1); `--debug` (ARTLOOP_DEBUG=1) shows its traceback too."""

    def invoke(self, ctx):
        token = _debug.set(bool(ctx.params.get("debug")))
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as e:
            from artloop.store.trajectories import StoreError

            if isinstance(e, StoreError):
                fail(str(e))
            fail(f"{type(e).__name__}: {' '.join(str(e).split())} (--debug shows where)", code=1)
        finally:
            _debug.reset(token)


app = typer.Typer(
    help="Improve text-to-image models with AI feedback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_Commands,
)
serve_app = typer.Typer(help="Servers: the vLLM server for the agents' VLM.", no_args_is_help=True)
models_app = typer.Typer(
    help="The tiny offline models (the embedded default).", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(serve_app, name="serve")
app.add_typer(train_app, name="train")
app.add_typer(session_app, name="session")
app.command("batch")(batch_command)
app.command("eval")(eval_command)
err = Console(stderr=True, highlight=False)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", envvar="ARTLOOP_DEBUG", help="Show an error's traceback")
    ] = False,
) -> None:
    pass  # read by _Commands.invoke


# A string, not a Path: Path("") is ".", and an empty --home must be refused, not used.
HomeOpt = Annotated[
    str | None,
    typer.Option("--home", help="Home directory (env ARTLOOP_HOME; default ~/.artloop)"),
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML config file")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr")]


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit (after the traceback, with --debug)."""
    if _debug.get() and sys.exc_info()[1] is not None:
        traceback.print_exc()
    from artloop.config import mask_secrets  # a URL's password never reaches the terminal

    err.print(f"[bold red]error:[/] {escape(mask_secrets(message))}", soft_wrap=True)
    raise typer.Exit(code)


def printable(text: str) -> str:
    """`text` safe to print on a terminal: control and other invisible characters (ANSI
    escapes, bidi overrides) as Python escapes, rich markup escaped."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return escape(shown)


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _config(config: Path | None, overrides: dict[str, Any], *, create_home: bool = True):
    """The config; the home is created unless `create_home` is False (the read-only commands)."""
    from artloop.config import ConfigError, ensure_home, load_config

    try:
        cfg = load_config(config, overrides)
        if create_home:
            ensure_home(cfg.home)
    except ConfigError as e:
        fail(str(e))
    return cfg


def _summarise(name: str, update: dict) -> str:
    step = update.get("step", {})
    out = step.get("agents", {})
    match name:
        case "enhance":
            return f"prompt: {step.get('prompt', '')[:70]!r}"
        case "generate" | "edit":
            digest = step.get("image" if name == "generate" else "edited_image") or ""
            extra = f", {len(step.get('edits', []))} edit(s)" if name == "edit" else ""
            return f"image {digest[:12]}{extra}"
        case "data_cot":
            return f"{len(out.get('data_cot', {}).get('objects', []))} object(s) found"
        case "concept_cot":
            c = out.get("concept_cot", {})
            return (
                f"{len(c.get('artifacts', []))} artifact(s), alignment {c.get('prompt_alignment')}"
            )
        case "thesis_cot":
            return f"{len(out.get('thesis_cot', {}).get('regional_edits', []))} regional edit(s)"
        case "validate":
            v = out.get("validate", {})
            return f"{v.get('verdict')} score {v.get('score', 0):.2f}"
        case "decide":
            who = step.get("decided_by", {}).get("verdict", "agent")
            return f"{step.get('verdict')} ({who}) -> {update.get('status') or 'revise'}"
    return ""


def _progress(name: str, update: dict) -> None:
    step = update.get("step", {})
    seconds = step.get("timings", {}).get(name, 0.0)
    iteration = step.get("iteration")
    where = f"iter {iteration + 1}" if iteration is not None and name != "record" else "done  "
    err.print(f"[dim]\\[{where}][/] {name:<11} {seconds:6.2f}s  {_summarise(name, update)}")


def _stored_loop(cfg, run_id: str | None):
    """`cfg` with the loop settings stored with run `run_id`."""
    from artloop.config import LoopConfig
    from artloop.graphs.context import open_store
    from artloop.store.trajectories import StoreError

    try:
        stored = open_store(cfg).get_run(run_id or "")["config"].get("loop")
    except StoreError as e:
        fail(str(e))
    return cfg.model_copy(update={"loop": LoopConfig(**stored)}) if stored else cfg


Ask = Any  # (pause payload, store) -> an answer dict, None (the agent decides) or QUIT
QUIT = object()


def _execute(
    cfg,
    *,
    prompt: str | None,
    run_id: str | None,
    as_json: bool,
    quiet: bool,
    pause_at: list[str] | None = None,
    answer: dict | None = None,
    ask: Ask | None = None,
) -> None:
    """Start or resume a session and report it. A session that pauses for a person is handed
    to `ask` at each pause (or left paused when there is none)."""
    from artloop.config import ConfigError
    from artloop.graphs.context import build_context
    from artloop.graphs.human import HumanActionError
    from artloop.graphs.runner import CheckpointerError, open_checkpointer, run_session
    from artloop.models.chat import check_chat_model
    from artloop.models.structured import ChatServerError, StructuredOutputError
    from artloop.store.report import write_report
    from artloop.store.trajectories import new_run_id
    from artloop.tools.diffusion import DiffusionError

    try:
        if prompt is None:  # a resumed run keeps the loop rules it started with
            cfg = _stored_loop(cfg, run_id)
        check_chat_model(cfg.chat)
        quiet_libraries()
        ctx = build_context(cfg)
        ctx.models()  # resolves both models: an unknown one fails here, before anything is stored
    except (ConfigError, DiffusionError) as e:
        fail(str(e))
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
    if summary.status == "paused":
        err.print(
            f"run [bold]{summary.run_id}[/] is paused at {summary.pause['pause']}; "
            f"continue with: artloop session resume {summary.run_id}"
        )
    if as_json:
        print(json.dumps({**asdict(summary), "report": str(report), "home": str(cfg.home)}))
    else:
        err.print(
            f"run [bold]{summary.run_id}[/]: {summary.status} after {summary.iterations} "
            f"iteration(s), best score {summary.best_score}, {summary.seconds:.1f}s"
        )
        err.print(f"report: {report}")


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="What to draw")],
    max_iters: Annotated[int | None, typer.Option(help="Iterations at most")] = None,
    seed: Annotated[int | None, typer.Option(help="Diffusion seed")] = None,
    chat_backend: Annotated[str | None, typer.Option(help="inprocess | openai | custom")] = None,
    chat_model: Annotated[
        str | None, typer.Option(help="Chat model id, path or served name")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible server URL (.../v1)")
    ] = None,
    diffusion_model: Annotated[
        str | None, typer.Option(help="tiny-sd, tiny-flux, id or path")
    ] = None,
    judge: Annotated[
        str | None, typer.Option(help="vlm, or a reward name (e.g. darkness) that scores")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="A label stored with the run (repeat)")
    ] = None,
    home: HomeOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Refine an image for PROMPT with the agent loop; prints progress, the run id and a report."""
    from artloop.config import ConfigError, validate_prompt

    try:
        prompt = validate_prompt(prompt)
    except ConfigError as e:
        fail(str(e))
    cfg = _config(
        config,
        {
            "home": home,
            "loop.max_iters": max_iters,
            "diffusion.seed": seed,
            "chat.backend": chat_backend,
            "chat.model": chat_model,
            "chat.base_url": base_url,
            "diffusion.model": diffusion_model,
            "loop.judge": judge,
            "tags": tag or None,
        },
    )
    _execute(cfg, prompt=prompt, run_id=None, as_json=as_json, quiet=quiet)


@app.command()
def resume(
    run_id: str,
    home: HomeOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Continue an interrupted or failed run from its last checkpoint."""
    cfg = _config(config, {"home": home})
    _execute(cfg, prompt=None, run_id=run_id, as_json=as_json, quiet=quiet)


def _store(home: str | None, config: Path | None):
    """The store of an existing home, for the commands that only read it: a mistyped --home is
    an error, not a new empty home."""
    from artloop.graphs.context import open_store
    from artloop.store.trajectories import StoreError

    try:
        return open_store(_config(config, {"home": home}, create_home=False), create=False)
    except StoreError as e:
        fail(str(e))


@app.command()
def show(
    run_id: str, home: HomeOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False
) -> None:
    """Print a trajectory."""
    from artloop.store.report import spent
    from artloop.store.trajectories import StoreError

    try:
        run = _store(home, config).get_run(run_id)
    except StoreError as e:
        fail(str(e))
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
        out.print(f"  image {step['image']}  ->  edited {step.get('edited_image')}")
        for name, answer in step.get("agents", {}).items():
            shown = printable(json.dumps(answer, ensure_ascii=False))
            out.print(f"  {name}: {shown}", soft_wrap=True)
        out.print(f"  timings: {json.dumps({k: round(v, 3) for k, v in step['timings'].items()})}")
        t = spent(step)
        out.print(
            f"  time spent: diffusion {t['diffusion']:.2f}s, VLM {t['vlm']:.2f}s, waiting "
            f"{t['wait']:.2f}s, framework {t['framework']:.2f}s"
        )
        out.print(f"  parse failures: {json.dumps(step.get('parse_failures', {}))}")
    if run.get("error"):
        out.print(f"\nerror: {printable(run['error'])}")


@app.command()
def export(
    out_dir: Annotated[Path, typer.Argument(help="Output directory (outside the home)")],
    fmt: Annotated[str, typer.Option("--format", help="sft | dpo | prompts | raw")],
    accepted_only: Annotated[bool, typer.Option(help="Only runs the validator accepted")] = False,
    min_gain: Annotated[
        float | None, typer.Option(help="Best score minus first score, at least")
    ] = None,
    top_fraction: Annotated[
        float | None, typer.Option(help="Keep this fraction of runs by gain (0-1]")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Created at or after (ISO date)")] = None,
    until: Annotated[str | None, typer.Option(help="Created before (ISO date)")] = None,
    run: Annotated[list[str] | None, typer.Option("--run", help="Only this run (repeat)")] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Only runs with this tag (repeat: all)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier artloop export in OUT_DIR (nothing else)")
    ] = False,
    home: HomeOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export finished runs as a training dataset (Hugging Face parquet, imagefolder, jsonl)."""
    from artloop.store.export import ExportError, ExportFilters, export_dataset, parse_when

    try:
        filters = ExportFilters(
            accepted_only=accepted_only,
            min_gain=min_gain,
            top_fraction=top_fraction,
            since=parse_when(since),
            until=parse_when(until),
            run_ids=tuple(run or ()),
            tags=tuple(tag or ()),
        )
        result = export_dataset(_store(home, config), out_dir, fmt, filters, overwrite=overwrite)
    except ExportError as e:
        fail(str(e))
    if as_json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"exported {result.rows} {fmt} row(s) from {result.runs_kept} run(s): {result.path}")


@app.command("list")
def list_runs(home: HomeOpt = None, config: ConfigOpt = None, limit: int = 20) -> None:
    """List recent runs."""
    table = Table("run", "status", "iterations", "best", "prompt")
    for r in _store(home, config).list_runs(limit):
        best = "" if r["best_score"] is None else f"{r['best_score']:.2f}"
        status = r["status"] + (f" at {r['paused_at']}" if r["paused_at"] else "")
        if r["status"] == "failed" and r["error"]:  # with its cause
            status += f": {printable(r['error'][:80])}"
        table.add_row(r["run_id"], status, str(r["iterations"]), best, printable(r["prompt"][:60]))
    Console().print(table)


@app.command()
def doctor(
    export_dir: Annotated[
        Path | None, typer.Option("--export", help="Check this export directory instead")
    ] = None,
    clean: Annotated[bool, typer.Option(help="Remove files left by interrupted writes")] = False,
    home: HomeOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the store's integrity (or an export's); exit 1 when anything is broken."""
    from artloop.store.doctor import check_export, check_store, describe

    if export_dir is not None and not export_dir.is_dir():
        fail(f"no export directory at {export_dir}")
    report = (
        check_export(export_dir) if export_dir else check_store(_store(home, config), clean=clean)
    )
    if as_json:
        print(json.dumps({"ok": report.ok, **asdict(report)}, indent=2))
    else:
        print(describe(report))
    if not report.ok:
        raise typer.Exit(1)


@serve_app.command(
    "vlm", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def serve_vlm(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option(help="Model id or path; tiny-qwen2vl for CPU")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000)")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | float32 | bfloat16 | float16")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help="GPUs per model")] = None,
    max_image_pixels: Annotated[int | None, typer.Option(help="Cap image tokens")] = None,
    enforce_eager: Annotated[
        bool | None, typer.Option(help="No CUDA graphs (CPU needs it)")
    ] = None,
    vllm: Annotated[str | None, typer.Option(help="The vllm executable")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run a vLLM server for the agents until Ctrl-C. Flags after `--` go to `vllm serve`."""
    from artloop.config import mask_secrets, secret_values
    from artloop.serve.vlm import ServerError, VLMServer

    cfg = _config(
        config,
        {
            "serve.model": model,
            "serve.host": host,
            "serve.port": port,
            "serve.dtype": dtype,
            "serve.max_model_len": max_model_len,
            "serve.tensor_parallel_size": tensor_parallel_size,
            "serve.max_image_pixels": max_image_pixels,
            "serve.enforce_eager": enforce_eager,
            "serve.vllm": vllm,
        },
    ).serve
    if ctx.args:
        cfg = cfg.model_copy(update={"extra_args": [*cfg.extra_args, *ctx.args]})
    server = VLMServer(cfg)
    hidden = secret_values(cfg.model_dump())  # its API key, env and flags: not in a log tail
    # Ctrl-C and SIGTERM both stop the server cleanly (SIGINT may arrive ignored when started
    # in the background by a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    err.print(f"starting vLLM for {cfg.model} (log: {server.log_path})")
    try:
        server.start()
    except (ServerError, ValueError) as e:
        fail(mask_secrets(str(e), hidden), code=1)
    except KeyboardInterrupt:
        server.stop()
        fail("interrupted while vLLM was starting", code=130)
    name = cfg.served_model_name or cfg.model
    err.print(f"vLLM is serving [bold]{name}[/] at [bold]{server.base_url}[/]")
    err.print(
        f"  agents use it with: --chat-backend openai --base-url {server.base_url} "
        f"--chat-model {name}   (Ctrl-C stops it)"
    )
    try:
        status = server.wait()
    except KeyboardInterrupt:
        err.print("stopping vLLM ...")
        server.stop()
        err.print("stopped")
        return
    fail(
        mask_secrets(f"vLLM exited with status {status}; last log lines:\n{server.tail()}", hidden),
        code=1,
    )


@serve_app.command("ui")
def serve_ui(
    host: Annotated[
        str, typer.Option(help="Bind address; another than loopback needs a token")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 7860,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file", help="File holding the login password (or set ARTLOOP_UI_TOKEN)"
        ),
    ] = None,
    token: Annotated[str | None, typer.Option(hidden=True)] = None,  # refused: see below
    home: HomeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The web UI: refine images with the agents in a browser (Ctrl-C stops it)."""
    from artloop.serve.guard import UIError, check_serve, read_token

    if token is not None:  # argv is readable by every user of the machine
        fail(
            "--token would show the password to anyone running ps: set ARTLOOP_UI_TOKEN "
            "or use --token-file"
        )
    try:  # before anything loads: a bind that cannot work is refused at once
        secret = check_serve(host, port, read_token(token_file))
    except UIError as e:
        fail(str(e))
    from artloop.config import ConfigError
    from artloop.graphs.context import build_context
    from artloop.models.chat import check_chat_model
    from artloop.serve.ui import serve

    cfg = _config(config, {"home": home})
    try:
        check_chat_model(cfg.chat)
        quiet_libraries()
        ctx = build_context(cfg)
        serve(
            ctx,
            host=host,
            port=port,
            token=secret,
            on_ready=lambda: err.print(
                f"artloop UI at [bold]http://{host}:{port}[/] (home {cfg.home})"
            ),
        )
    except (ConfigError, UIError) as e:
        fail(str(e))


@models_app.command("list")
def models_list() -> None:
    """List the tiny models and whether they are built."""
    from artloop.models.tiny import cache_root, tiny_models

    table = Table("name", "kind", "family", "built", "description")
    for m in tiny_models().values():
        built = any(cache_root().glob(f"{m.name}-*/.complete"))
        table.add_row(m.name, m.kind, m.family, "yes" if built else "no", m.description)
    Console().print(table)


@models_app.command("build-tiny")
def models_build_tiny(
    names: Annotated[list[str] | None, typer.Argument(help="Default: all")] = None,
) -> None:
    """Build (or find cached) the tiny offline models and print their paths."""
    from artloop.models.tiny import TINY_NAMES, tiny_models

    quiet_libraries()
    for name in names or TINY_NAMES:
        if name not in TINY_NAMES:
            fail(f"unknown tiny model {name!r}; choose from {', '.join(TINY_NAMES)}")
        print(f"{name}\t{tiny_models()[name].build()}")


def main() -> None:  # pragma: no cover
    app(prog_name="artloop")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
