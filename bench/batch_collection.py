"""Batch collection on the tiny stack, side by side in one run:

(a) the framework's share of one session's wall time (goal <= 5%): wall time minus what the
    nodes spent in diffusion, VLM calls and waiting, over the wall time;
(b) 16 sessions with --concurrency 16 (batched diffusion) vs the same 16 one at a time
    (goal >= 3x), with the chat backend chosen: `inprocess` (the tiny Qwen2-VL, concurrent calls
    batched into one generate), `scripted` (no VLM cost: diffusion-bound) or `vllm` (c: the real
    vLLM CPU server from CI's setup, which batches concurrent requests).

    .venv/bin/python bench/batch_collection.py [--chat inprocess|scripted|vllm] [--sessions 16]

Prints the ratios, writes JSON and a plot of the per-step time breakdown (bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path

from artloop.config import ChatConfig, DiffusionConfig, LoopConfig
from artloop.graphs.batch import BatchItem, run_batch
from artloop.graphs.context import RefineContext
from artloop.graphs.runner import run_session
from artloop.models.chat import build_chat_model
from artloop.runtime.accounting import add_up
from artloop.store.trajectories import TrajectoryStore
from artloop.tools.diffusion import DiffusionTool

PROMPTS = [
    "a red fox in the snow",
    "a lighthouse at dusk",
    "a bowl of fruit",
    "a city street",
    "a mountain lake",
    "a cat on a sofa",
    "an old steam train",
    "a field of tulips",
]


def context(chat_kind: str, base_url: str | None) -> RefineContext:
    store = TrajectoryStore(Path(tempfile.mkdtemp(prefix="artloop-bench-")))
    if chat_kind == "scripted":
        from artloop.models.scripted import ScriptedChat

        cfg, chat = ChatConfig(backend="custom"), ScriptedChat()
    else:
        cfg = (
            ChatConfig(backend="openai", base_url=base_url, model="tiny-qwen2vl")
            if chat_kind == "vllm"
            else ChatConfig()
        )
        chat = build_chat_model(cfg)
    diffusion = DiffusionTool("tiny-sd", store=store.images)
    return RefineContext(
        chat=chat,
        diffusion=diffusion,
        store=store,
        chat_config=cfg,
        loop=LoopConfig(max_iters=1),
        vlm_slots=threading.BoundedSemaphore(64),
        diffusion_config=DiffusionConfig(width=128, height=128, steps=4),
    )


def overhead(ctx: RefineContext) -> dict:
    """(a): one session; the framework = wall - (diffusion + VLM + waiting) in its nodes."""
    summary = run_session(ctx, prompt=PROMPTS[0])
    steps = ctx.store.get_run(summary.run_id)["steps"]
    spent = add_up([b for s in steps for b in s["accounting"].values()])
    busy = spent["diffusion"] + spent["vlm"] + spent["wait"]
    return {
        "wall_s": summary.seconds,
        **spent,
        "framework_s": summary.seconds - busy,
        "framework_share": (summary.seconds - busy) / summary.seconds,
    }


def batchers(ctx: RefineContext) -> dict:
    """The batchers in use: the diffusion tool's and the in-process VLM's (None: not batching)."""
    return {
        "diffusion": getattr(ctx.diffusion, "_batcher", None),
        "vlm": getattr(ctx.chat, "_batch", None),
    }


def throughput(ctx: RefineContext, sessions: int, concurrency: int, name: str) -> dict:
    items = [BatchItem(prompt=f"{PROMPTS[i % len(PROMPTS)]}, take {i}") for i in range(sessions)]
    before = {k: (b.batches, b.busy_s) for k, b in batchers(ctx).items() if b}
    start = time.perf_counter()
    result = asyncio.run(run_batch(ctx, items, name=name, concurrency=concurrency))
    seconds = time.perf_counter() - start
    assert result.done == sessions, result.errors
    runs = [ctx.store.get_run(r) for r in result.run_ids]
    parts = add_up([b for r in runs for s in r["steps"] for b in s["accounting"].values()])
    out = {
        "sessions": sessions,
        "concurrency": concurrency,
        "seconds": seconds,
        "sessions_per_min": sessions / seconds * 60,
        "spent": parts,
    }
    for kind, b in batchers(ctx).items():
        n, busy = before.get(kind, (0, 0.0))
        # Busy share: the fraction of the wall time the model was running a batch.
        out[kind] = (
            {"batch_sizes": b.sizes_since(n), "busy_share": (b.busy_s - busy) / seconds}
            if b
            else None
        )
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {
        "one session": result["overhead"],
        "16 one at a time": result["sequential"]["spent"],
        "16 at once": result["concurrent"]["spent"],
    }
    fig, ax = plt.subplots(figsize=(7, 2.8))
    for i, spent in enumerate(rows.values()):
        total, left = sum(spent[k] for k in ("diffusion", "vlm", "wait", "framework")), 0.0
        for kind, colour in (
            ("diffusion", "#4c72b0"),
            ("vlm", "#dd8452"),
            ("wait", "#bbbbbb"),
            ("framework", "#c44e52"),
        ):
            share = spent[kind] / total
            ax.barh(i, share, left=left, color=colour, label=kind if i == 0 else None)
            left += share
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xlabel("share of the nodes' time")
    ax.legend(ncols=4, loc="upper center", bbox_to_anchor=(0.5, 1.3), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chat", choices=["inprocess", "scripted", "vllm"], default="inprocess")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=100.0)
    parser.add_argument("--vllm", default=".venv-vllm/bin/vllm")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or f"bench/results/batch_collection_{args.chat}.json")
    server = None
    if args.chat == "vllm":
        from artloop.serve.vlm import VLMServer, tiny_cpu_config

        server = VLMServer(tiny_cpu_config(args.vllm, port=8766)).start()
    try:
        base_url = server.base_url if server else None
        ctx = context(args.chat, base_url)
        run_session(ctx, prompt="warm-up")  # loads the models
        result = {
            "chat": args.chat,
            "overhead": overhead(ctx),
            "sequential": throughput(ctx, args.sessions, 1, "seq"),
        }
        ctx.diffusion.set_batching(args.window_ms)  # concurrent requests share pipeline calls
        if hasattr(ctx.chat, "set_batching"):  # the in-process model: and share generate calls
            ctx.chat.set_batching(args.window_ms)
        result["concurrent"] = throughput(ctx, args.sessions, args.sessions, "conc")
    finally:
        if server is not None:
            server.stop()
    o, s, c = result["overhead"], result["sequential"], result["concurrent"]
    result["speedup"] = s["seconds"] / c["seconds"]
    print(
        f"(a) one session ({args.chat}): wall {o['wall_s']:.2f} s, framework "
        f"{o['framework_s']:.3f} s = {o['framework_share']:.1%} (goal <= 5%)"
    )
    print(
        f"(b) {args.sessions} sessions: one at a time {s['seconds']:.1f} s, {args.sessions} at "
        f"once {c['seconds']:.1f} s -> {result['speedup']:.2f}x (goal >= 3x)"
    )
    for kind in ("diffusion", "vlm"):
        if c[kind]:
            print(
                f"    {kind}: busy {c[kind]['busy_share']:.0%} of the concurrent run, batches "
                f"{sorted(c[kind]['batch_sizes'], reverse=True)[:8]}"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
