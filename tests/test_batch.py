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
from artloop.config import MAX_PROMPT_CHARS
from artloop.graphs.batch import BatchError, item_run_id, read_prompts, run_batch
from artloop.runtime.accounting import add_up
from artloop.store.trajectories import TrajectoryStore
from artloop.tools.diffusion import GenParams
from conftest import make_ctx, scripted_stack, verdict
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
    edits = [
        sd_tool.inpaint(a, (100, 100, 600, 700), "a hat", "", q, 0.6)
        for a, q in zip(alone, params, strict=True)
    ]
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
    f = tmp_path / "p.txt"  # a text file: a line is a prompt, or a JSON object
    f.write_text('a red fox\n\n{"prompt": "a lighthouse", "seed": 7, "tags": ["sea"]}\n')
    items = read_prompts(f)
    assert [(i.prompt, i.seed, i.tags) for i in items] == [
        ("a red fox", None, []),
        ("a lighthouse", 7, ["sea"]),
    ]
    assert (
        item_run_id("b", 0, items[0])
        == item_run_id("b", 0, items[0])
        != item_run_id("b", 1, items[0])
    )
    f.write_text('a fox\n{"prompt": "x", "seed": -1}\n')
    with pytest.raises(BatchError, match=r"p.txt:2: seed"):
        read_prompts(f)
    f.write_text('{"prompt": "x", "colour": 1}\n')
    with pytest.raises(BatchError, match="p.txt:1: colour"):
        read_prompts(f)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"prompt": "a fox"}\nan owl\n',
            "p.jsonl:2: not JSON (Expecting value at column 1); each "
            "line of a .jsonl file is one JSON object",
        ),
        (
            '{"prompt": "a fox"}\n["an owl"]\n',
            "p.jsonl:2: an array, not a JSON object with a prompt",
        ),
        ('"an owl"\n', "p.jsonl:1: a string, not a JSON object with a prompt"),
        ('{"prompt": "a fox"}\n{"prompt": "  "}\n', "p.jsonl:2: prompt: is empty"),
        ('{"prompt": 7}\n', "p.jsonl:1: prompt: Input should be a valid string"),
        (
            '{"prompt": "%s"}\n' % ("x" * (MAX_PROMPT_CHARS + 1)),
            f"p.jsonl:1: prompt: is {MAX_PROMPT_CHARS + 1} characters; the limit is {MAX_PROMPT_CHARS}",
        ),
    ],
)
def test_jsonl_lines_are_json_objects(tmp_path, text, message):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    with pytest.raises(BatchError) as caught:
        read_prompts(f)
    assert str(caught.value) == f"{f}:{message.partition(':')[2]}"


def test_prompts_file_encodings_and_limits(tmp_path):
    f = tmp_path / "p.jsonl"  # a byte-order mark (Windows editors) is not part of the prompt
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "a fox", "seed": 3}\r\n{"prompt": "an owl"}\r\n')
    assert [(i.prompt, i.seed) for i in read_prompts(f)] == [("a fox", 3), ("an owl", None)]
    f.write_text(json.dumps({"prompt": "a fox\u2028in the snow"}, ensure_ascii=False))
    assert [i.prompt for i in read_prompts(f)] == ["a fox\u2028in the snow"]  # one line
    t = tmp_path / "p.txt"  # the limit `artloop run` has, for plain lines too
    t.write_text("\ufeff" + "x" * MAX_PROMPT_CHARS + "\n" + "y" * (MAX_PROMPT_CHARS + 1) + "\n")
    with pytest.raises(BatchError, match=f"p.txt:2: prompt: is {MAX_PROMPT_CHARS + 1} characters"):
        read_prompts(t)
    t.write_text("\ufeff" + "x" * MAX_PROMPT_CHARS + "\n")
    assert [len(i.prompt) for i in read_prompts(t)] == [MAX_PROMPT_CHARS]


def test_cli_checks_every_line_before_any_session(tmp_path):
    """A bad line anywhere: exit 2 naming file:line, and no session ran (nothing stored)."""
    from artloop.cli import app
    from typer.testing import CliRunner

    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "a fox"}\n{"prompt": "an owl"}\n' + "x" * 2500 + "\n")
    home = tmp_path / "home"
    TrajectoryStore(home)
    result = CliRunner().invoke(app, ["batch", str(f), "--home", str(home)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: {f}:3: not JSON (Expecting value at column 1); each line of a "
        ".jsonl file is one JSON object"
    ], result.stderr
    assert TrajectoryStore(home).list_runs() == []


def test_concurrent_resumable_and_failures_isolated(store, batching, tmp_path):
    marker = tmp_path / "poison"
    marker.touch()  # while it exists, sessions about "unlucky" prompts lose the chat server
    chat = PoisonedChat(
        poison="unlucky", marker=str(marker), scripts={"Verdict": [verdict("accept", 9.0)]}
    )
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
        spent["total"], rel=1e-6
    )

    marker.unlink()  # the server is back: a re-run skips the four and finishes the failed one
    again = asyncio.run(run_batch(ctx, items, name="t", concurrency=5))
    assert (again.done, again.failed, again.skipped) == (1, 0, 4)
    assert store.get_run(bad)["status"] == "accepted"
    assert len(store.list_runs()) == 5  # nothing duplicated


@pytest.mark.slow  # `artloop batch` processes
def test_cli_batch(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text('a red fox\n{"prompt": "a lighthouse", "seed": 3}\n')
    artloop = str(Path(sys.executable).with_name("artloop"))
    args = [
        artloop,
        "batch",
        str(f),
        "--concurrency",
        "2",
        "--max-iters",
        "1",
        "--batch-window-ms",
        "50",
        "--home",
        str(tmp_path / "home"),
        "--config",
        str(scripted_stack(tmp_path / "artloop.toml")),
    ]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600, env=os.environ)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["done"] == 2
    # The rest through the same CLI in this process (a fresh process each only adds its start).
    from artloop.cli import app
    from typer.testing import CliRunner

    again = CliRunner().invoke(app, args[1:])
    assert again.exit_code == 0, (again.stderr, again.exception)
    assert json.loads(again.stdout)["skipped"] == 2
    runs = TrajectoryStore(tmp_path / "home").list_runs()
    assert len(runs) == 2
    lighthouse = next(r for r in runs if r["prompt"] == "a lighthouse")
    step = TrajectoryStore(tmp_path / "home").get_run(lighthouse["run_id"])["steps"][0]
    assert step["params"]["seed"] == 3
    shown = CliRunner().invoke(
        app, ["show", lighthouse["run_id"], "--home", str(tmp_path / "home")]
    )
    assert "time spent: diffusion" in shown.stdout
    bad = CliRunner().invoke(app, ["batch", str(tmp_path / "none.txt")])
    assert bad.exit_code == 2 and "cannot read prompts file" in bad.stderr


def test_batcher_takes_everything_that_queued_while_it_was_busy():
    import time

    from artloop.runtime.batching import Batcher

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


@pytest.mark.slow
def test_ctrl_c_stops_the_batch_and_its_summary_agrees_with_the_store(tmp_path):
    """SIGINT to a real `artloop batch` mid-run: no more sessions start, the running ones stop at
    a checkpoint (`interrupted`), and the summary it prints counts what the store holds; running
    the command again finishes every session exactly once."""
    import signal
    import time

    from artloop.store.trajectories import FINAL_STATUSES

    config = scripted_stack(tmp_path / "artloop.toml", home=tmp_path / "home", max_iters=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a red fox, take {i}\n" for i in range(8)))
    batch = [
        str(Path(sys.executable).with_name("artloop")),
        "batch",
        str(prompts),
        "--concurrency",
        "2",
        "--config",
        str(config),
    ]
    proc = subprocess.Popen(
        batch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    store, deadline = TrajectoryStore(tmp_path / "home"), time.monotonic() + 300
    while not any(r["status"] in FINAL_STATUSES for r in store.list_runs(limit=-1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    time.sleep(0.3)  # the next sessions are mid-way
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    summary = json.loads(out)
    statuses = [r["status"] for r in store.list_runs(limit=-1)]
    assert summary["done"] == sum(s in FINAL_STATUSES for s in statuses) >= 1
    assert summary["interrupted"] == statuses.count("interrupted") >= 1
    assert summary["failed"] == statuses.count("failed") == 0
    assert len(statuses) == summary["done"] + summary["interrupted"]  # nothing else was begun
    assert summary["not_started"] == 8 - len(statuses) > 0
    assert "Traceback" not in err and f"interrupted: {summary['interrupted']} session(s)" in err

    # Again through the same CLI in this process (a second process would only add its start).
    from artloop.cli import app
    from typer.testing import CliRunner

    again = CliRunner().invoke(app, batch[1:])
    assert again.exit_code == 0, (again.stderr, again.exception)
    rerun = json.loads(again.stdout)
    assert (rerun["skipped"], rerun["done"]) == (summary["done"], 8 - summary["done"])
    runs = store.list_runs(limit=-1)
    assert len(runs) == 8 and all(r["status"] in FINAL_STATUSES for r in runs)
