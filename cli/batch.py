"""`artloop batch`: collect trajectories with many sessions at once (graphs/batch.py), on this
machine or with diffusion on a Ray cluster (tools/ray_diffusion.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from artloop.cli.common import (
    ConfigOpt,
    FactScorerOpt,
    HomeOpt,
    JudgeOpt,
    MaxItersOpt,
    WatchOpt,
    err,
    failing,
    overrides,
    quiet_libraries,
    read_config,
)
from artloop.config import ConfigError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _on_ray(ctx, cfg, address: str, workers: int, gpus: float):
    """`ctx` with its diffusion served by Ray actors (a local instance binds loopback)."""
    if cfg.diffusion.lora is not None:
        raise ConfigError("diffusion.lora: the Ray diffusion workers load no LoRA; run without Ray")
    # deliberately lazy (startup time): ray
    import ray
    from artloop.tools.ray_diffusion import RayDiffusion

    env = {k: v for k, v in os.environ.items() if k.startswith(("ARTLOOP_", "HF_"))}
    if address == "local":
        ray.init(
            address="local",
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": env},
            log_to_driver=False,
        )
    else:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    d = cfg.diffusion
    diffusion = RayDiffusion(
        d.model,
        ctx.store.images,
        workers=workers,
        gpus_per_worker=gpus,
        family=d.family,
        device=d.device,
        dtype=d.dtype,
        batch_window_ms=d.batch_window_ms,
        max_batch=d.max_batch,
    )
    return replace(ctx, diffusion=diffusion)


@contextmanager
def _ctrl_c_stops(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C sets `stop`: no session starts, the running ones stop at their next
    checkpoint and the batch reports. A second one ends the process at once (as a kill would:
    every write is atomic, so nothing stored is lost)."""

    def first(signum, frame) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def batch(
    prompts_file: Annotated[
        Path,
        typer.Argument(help="One prompt per line, or JSONL with prompt, seed, max_iters, tags"),
    ],
    concurrency: Annotated[int, typer.Option(min=1, max=1024, help="Sessions at once")] = 4,
    name: Annotated[
        str | None,
        typer.Option(help="Batch name (default: the file's stem); runs are tagged batch:NAME"),
    ] = None,
    batch_window_ms: Annotated[
        float | None,
        typer.Option(
            help="Gather diffusion requests (and in-process VLM calls) this long into one"
        ),
    ] = None,
    max_iters: MaxItersOpt = None,
    judge: JudgeOpt = None,
    fact_scorer: FactScorerOpt = None,
    watch: WatchOpt = None,
    base_url: Annotated[
        list[str] | None,
        typer.Option(
            "--base-url",
            help="VLM server (repeat: sessions spread over several); implies the openai backend",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Diffusion on Ray: 'local' (a local instance), 'auto' or ray://HOST:PORT"
        ),
    ] = None,
    diffusion_workers: Annotated[int, typer.Option(min=1, help="Ray diffusion actors")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per Ray actor")] = 0.0,
    home: HomeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Collect trajectories: many sessions at once, resumable (a re-run skips finished ones)."""
    # deliberately lazy (startup time): the graphs, the models and the diffusion tool
    from artloop.graphs.batch import BatchError, batch_summary, read_prompts, run_batch
    from artloop.graphs.context import build_context
    from artloop.graphs.runner import CheckpointerError
    from artloop.models.chat import build_chat_model, check_chat_model
    from artloop.tools.diffusion import DiffusionError

    urls = base_url or []
    cfg = read_config(
        config,
        {
            "home": home,
            **overrides(max_iters=max_iters, judge=judge, fact_scorer=fact_scorer, watch=watch),
            "diffusion.batch_window_ms": batch_window_ms,
            "chat.batch_window_ms": batch_window_ms,
            "chat.backend": "openai" if urls else None,
            "chat.base_url": urls[0] if urls else None,
        },
    )
    with failing(BatchError, ConfigError, DiffusionError):
        items = read_prompts(prompts_file)
        chats = [build_chat_model(cfg.chat.model_copy(update={"base_url": u})) for u in urls]
        for c in [cfg.chat.model_copy(update={"base_url": u}) for u in urls] or [cfg.chat]:
            check_chat_model(c)
        quiet_libraries()
        ctx = build_context(cfg)
        if ray_address:
            ctx = _on_ray(ctx, cfg, ray_address, diffusion_workers, gpus_per_worker)
        ctx.models()
    columns = [
        TextColumn("batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("batch", total=len(items), stats="")

        stop = threading.Event()

        def show(r) -> None:
            rate = r.done / r.seconds * 60 if r.seconds else 0.0
            stopping = " stopping (Ctrl-C)" if stop.is_set() else ""
            bar.update(
                task,
                completed=r.done + r.failed + r.skipped + r.interrupted,
                stats=f"accepted {r.accepted} failed {r.failed} skipped {r.skipped} "
                f"{rate:.1f}/min{stopping}",
            )

        # CheckpointerError: it could not be opened, no session started
        with failing(CheckpointerError), _ctrl_c_stops(stop):
            result = asyncio.run(
                run_batch(
                    ctx,
                    items,
                    name=name or prompts_file.stem,
                    concurrency=concurrency,
                    config=cfg.public_dict(),
                    on_progress=show,
                    chats=chats or None,
                    stop=stop,
                )
            )
    print(json.dumps(batch_summary(result)))
    if stop.is_set():
        err.print(
            f"interrupted: {result.interrupted} session(s) stopped at a checkpoint, "
            f"{result.not_started} not started; run the same command again to "
            f"continue",
            soft_wrap=True,
        )
    if result.failed:
        err.print(
            f"{result.failed} session(s) failed (stored with their errors); "
            f"run the same command again to retry them"
        )
    if stop.is_set():
        raise typer.Exit(130)
