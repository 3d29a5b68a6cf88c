"""Batched tiny-SD diffusion alone vs while the vLLM CPU server decodes, on the same cores.

Why `--chat vllm` batch collection gains less than the in-process VLM on a small CPU machine:
8 clients keep the server busy from another process (so no GIL is shared with this one) while
8 concurrent text-to-image requests run here as one batch, at each torch thread count.

    .venv/bin/python bench/vllm_contention.py [--threads 2 1]   (minutes: the loaded runs crawl)

Prints the seconds and the slowdown for each thread count; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from artloop.serve.vlm import VLMServer, tiny_cpu_config
from artloop.tools.diffusion import DiffusionTool, GenParams
from artloop.tools.images import ImageStore

LOAD = """
import sys, threading
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="x")
def ask():
    while True:
        client.chat.completions.create(model="tiny-qwen2vl", max_tokens=200, messages=[
            {"role": "user", "content": "tell me a long story " * 50}])
        print("done", flush=True)
for _ in range(8):
    threading.Thread(target=ask).start()
"""


def batch_of_eight(tool: DiffusionTool) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: tool.text_to_image(f"a fox {i}", "", GenParams(128, 128, seed=i)),
                range(8),
            )
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--vllm", default=".venv-vllm/bin/vllm")
    args = parser.parse_args()
    tool = DiffusionTool("tiny-sd", store=ImageStore(Path(tempfile.mkdtemp())), batch_window_ms=100)
    tool.setup()
    result: dict = {"alone": {}, "loaded": {}, "vlm_answers_per_s": {}}
    for n in args.threads:
        torch.set_num_threads(n)
        result["alone"][n] = batch_of_eight(tool)
    server = VLMServer(tiny_cpu_config(args.vllm, port=8769)).start()
    load = subprocess.Popen([sys.executable, "-c", LOAD, server.base_url], stdout=subprocess.PIPE)
    answers = [0]  # answers the clients got so far

    def count() -> None:
        for _ in load.stdout:  # one line per answer
            answers[0] += 1

    threading.Thread(target=count, daemon=True).start()
    try:
        time.sleep(5)  # the server is decoding
        for n in args.threads:
            torch.set_num_threads(n)
            before = answers[0]
            result["loaded"][n] = batch_of_eight(tool)
            result["vlm_answers_per_s"][n] = (answers[0] - before) / result["loaded"][n]
    finally:
        load.kill()
        server.stop()
    for n in args.threads:
        print(
            f"torch threads {n}: 8 images batched alone {result['alone'][n]:.2f} s, while the "
            f"server decodes {result['loaded'][n]:.1f} s "
            f"({result['loaded'][n] / result['alone'][n]:.0f}x slower)"
        )
    out = Path("bench/results/vllm_contention.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
