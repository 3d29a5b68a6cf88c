"""Batch collection on the tiny SD pipeline with a scripted chat model: concurrent sessions,
batched diffusion equal to unbatched, resumability, failure isolation, time accounting."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from artloop.graphs.batch import BatchError, item_run_id, read_prompts, run_batch
from artloop.tools.accounting import add_up
from artloop.tools.diffusion import GenParams
from artloop.tools.store import TrajectoryStore
from conftest import make_ctx, verdict
from fakes import PoisonedChat


@pytest.fixture
def batching(sd_tool):
    sd_tool.set_batching(150)
    yield sd_tool
    sd_tool.set_batching(0)


def test_batched_images_equal_unbatched(store, sd_tool):
    params = [GenParams(width=64, height=64, num_inference_steps=2, seed=s) for s in range(4)]
    prompts = ["a red fox", "a lighthouse", "a city street", "a bowl of fruit"]
    alone = [sd_tool.text_to_image(p, "", q) for p, q in zip(prompts, params, strict=True)]
    edits = [sd_tool.inpaint(a, (100, 100, 600, 700), "a hat", "", q, 0.6)
             for a, q in zip(alone, params, strict=True)]  # fmt: skip
    sd_tool.set_batching(300)
    try:
        together, edited = [None] * 4, [None] * 4

        def one(i: int) -> None:
            together[i] = sd_tool.text_to_image(prompts[i], "", params[i])
            edited[i] = sd_tool.inpaint(
                together[i], (100, 100, 600, 700), "a hat", "", params[i], 0.6
            )

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert max(sd_tool.batch_sizes) > 1  # requests shared pipeline calls ...
        assert together == alone and edited == edits  # ... and gave the same images (hashes)
    finally:
        sd_tool.set_batching(0)


def test_prompts_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('a red fox\n\n{"prompt": "a lighthouse", "seed": 7, "tags": ["sea"]}\n')
    items = read_prompts(f)
    assert [(i.prompt, i.seed, i.tags) for i in items] == [("a red fox", None, []),
                                                         ("a lighthouse", 7, ["sea"])]  # fmt: skip
    assert (
        item_run_id("b", 0, items[0])
        == item_run_id("b", 0, items[0])
        != item_run_id("b", 1, items[0])
    )
    f.write_text('a fox\n{"prompt": "x", "seed": -1}\n')
    with pytest.raises(BatchError, match=r"p.jsonl:2: seed"):
        read_prompts(f)
    f.write_text('{"prompt": "x", "colour": 1}\n')
    with pytest.raises(BatchError, match="p.jsonl:1: colour"):
        read_prompts(f)


def test_concurrent_resumable_and_failures_isolated(store, batching, tmp_path):
    marker = tmp_path / "poison"
    marker.touch()  # while it exists, sessions about "unlucky" prompts lose the chat server
    chat = PoisonedChat(poison="unlucky", marker=str(marker),
                        scripts={"Verdict": [verdict("accept", 9.0)]})  # fmt: skip
    ctx = make_ctx(store, batching, chat, max_iters=2)
    f = tmp_path / "prompts.txt"
    f.write_text("a red fox\nan unlucky black cat\na lighthouse\na city street\na bowl of fruit\n")
    items = read_prompts(f)
    seen = []
    first = asyncio.run(run_batch(ctx, items, name="t", concurrency=5, on_progress=seen.append))
    assert (first.done, first.accepted, first.failed, first.skipped) == (4, 4, 1, 0)
    bad = item_run_id("t", 1, items[1])
    assert list(first.errors) == [bad] and "ChatServerError" in first.errors[bad]
    assert store.get_run(bad)["status"] == "failed" and store.get_run(bad)["error"]
    assert max(batching.batch_sizes) > 1  # concurrent sessions shared diffusion calls
    assert seen[-1].done + seen[-1].failed == 5
    run = store.get_run(item_run_id("t", 0, items[0]))
    assert "batch:t" in run["config"]["tags"]
    spent = add_up(list(run["steps"][0]["accounting"].values()))
    assert spent["diffusion"] > 0 and spent["vlm"] > 0 and spent["framework"] >= 0
    assert sum(spent[k] for k in ("diffusion", "vlm", "wait", "framework")) == pytest.approx(
        spent["total"], rel=1e-6)  # fmt: skip

    marker.unlink()  # the server is back: a re-run skips the four and finishes the failed one
    again = asyncio.run(run_batch(ctx, items, name="t", concurrency=5))
    assert (again.done, again.failed, again.skipped) == (1, 0, 4)
    assert store.get_run(bad)["status"] == "accepted"
    assert len(store.list_runs()) == 5  # nothing duplicated


def test_cli_batch(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text('a red fox\n{"prompt": "a lighthouse", "seed": 3}\n')
    artloop = str(Path(sys.executable).with_name("artloop"))
    args = [artloop, "batch", str(f), "--concurrency", "2", "--max-iters", "1",
            "--batch-window-ms", "50", "--home", str(tmp_path / "home")]  # fmt: skip
    first = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["done"] == 2
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ)
    assert json.loads(again.stdout)["skipped"] == 2
    runs = TrajectoryStore(tmp_path / "home").list_runs()
    assert len(runs) == 2
    lighthouse = next(r for r in runs if r["prompt"] == "a lighthouse")
    step = TrajectoryStore(tmp_path / "home").get_run(lighthouse["run_id"])["steps"][0]
    assert step["params"]["seed"] == 3
    shown = subprocess.run([artloop, "show", lighthouse["run_id"], "--home", str(tmp_path / "home")],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "time spent: diffusion" in shown.stdout
    bad = subprocess.run(
        [artloop, "batch", str(tmp_path / "none.txt")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "cannot read prompts file" in bad.stderr


def test_batcher_takes_everything_that_queued_while_it_was_busy():
    import time

    from artloop.tools.batching import Batcher

    def slow(jobs):
        time.sleep(0.3)
        return [job.payload * 2 for job in jobs]

    batcher = Batcher(slow, window_s=0.01, max_batch=4)
    results = {}

    def call(i: int) -> None:
        results[i] = batcher.submit("k", i)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    time.sleep(0.1)  # the first batch is running; six more arrive, past any window
    rest = [threading.Thread(target=call, args=(i,)) for i in range(1, 7)]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join()
    assert results == {i: 2 * i for i in range(7)}
    assert list(batcher.sizes) == [1, 4, 2]  # max_batch splits the six that waited
