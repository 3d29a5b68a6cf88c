"""`artloop serve vlm` (a vLLM server for the agents) and `artloop serve ui` (the web UI)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from artloop.cli.common import (
    ConfigOpt,
    HomeOpt,
    err,
    fail,
    failing,
    quiet_libraries,
    read_config,
)
from artloop.config import ConfigError, mask_secrets, secret_values

app = typer.Typer(help="Servers: the vLLM server for the agents' VLM.", no_args_is_help=True)


@app.command("vlm", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve_vlm(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(help="Model id or path; tiny-qwen2vl or tiny-shapes-qwen2vl on CPU"),
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
    compact_json: Annotated[
        bool | None,
        typer.Option(help="No whitespace in JSON answers (off for a model trained on spaced JSON)"),
    ] = None,
    vllm: Annotated[str | None, typer.Option(help="The vllm executable")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run a vLLM server for the agents until Ctrl-C. Flags after `--` go to `vllm serve`."""
    from artloop.serve.vlm import ServerError, VLMServer  # deliberately lazy (startup time)

    flags = {
        "model": model,
        "host": host,
        "port": port,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "tensor_parallel_size": tensor_parallel_size,
        "max_image_pixels": max_image_pixels,
        "enforce_eager": enforce_eager,
        "compact_json": compact_json,
        "vllm": vllm,
    }
    cfg = read_config(config, {f"serve.{k}": v for k, v in flags.items()}).serve
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


@app.command("ui")
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
    # deliberately lazy (startup time): the server's checks
    from artloop.serve.guard import UIError, check_serve, read_token

    if token is not None:  # argv is readable by every user of the machine
        fail(
            "--token would show the password to anyone running ps: set ARTLOOP_UI_TOKEN "
            "or use --token-file"
        )
    with failing(UIError):  # before anything loads: a bind that cannot work is refused at once
        secret = check_serve(host, port, read_token(token_file))
    # deliberately lazy (startup time): the graphs, the models, gradio
    from artloop.graphs.context import build_context
    from artloop.models.chat import check_chat_model
    from artloop.serve.ui import serve

    cfg = read_config(config, {"home": home})
    with failing(ConfigError, UIError):
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
