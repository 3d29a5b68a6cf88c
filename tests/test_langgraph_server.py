"""LangGraph-native serving: `langgraph dev` (the LangGraph CLI's local server) runs the refine
graph from langgraph.json, and the official langgraph-sdk client drives a session through a
pause: create a thread, run to the first interrupt, resume with an edit, run to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from artloop.tools.store import TrajectoryStore
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "ARTLOOP_HOME": str(tmp_path / "home"), "ARTLOOP_LOOP__MAX_ITERS": "1",
           "LANGSMITH_TRACING": "false"}  # fmt: skip
    log = (tmp_path / "langgraph.log").open("w")
    # --allow-blocking: the nodes run models (blocking by nature) in the server's worker threads.
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("langgraph")), "dev", "--host", "127.0.0.1",
         "--port", str(port), "--no-browser", "--no-reload", "--allow-blocking",
         "--config", str(ROOT / "langgraph.json")],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/ok", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(
                    f"langgraph dev did not start:\n{(tmp_path / 'langgraph.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
    yield url, TrajectoryStore(tmp_path / "home")
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_sdk_drives_a_session_through_a_pause(server):
    from langgraph_sdk import get_sync_client

    url, store = server
    client = get_sync_client(url=url)
    assert [a["graph_id"] for a in client.assistants.search()] == ["refine"]
    thread = client.threads.create()["thread_id"]
    client.runs.wait(thread, "refine", input={"prompt": "a red fox", "pause_at": ["plan"]})
    state = client.threads.get_state(thread)
    assert state["next"] == ["review_plan"]
    pause = state["interrupts"][0]["value"]
    assert pause["pause"] == "plan" and pause["image"] in store.images
    run_id = pause["run_id"]
    assert store.get_run(run_id)["status"] == "running"  # registered by the graph's begin node

    edit = {"action": "edit", "regions": [{"box": [100, 100, 600, 600], "prompt": "a red hat"}]}
    client.runs.wait(thread, "refine", command={"resume": edit})
    state = client.threads.get_state(thread)
    assert state["next"] == [] and state["values"]["status"] in ("accepted", "max_iters")
    run = store.get_run(run_id)
    assert run["status"] == state["values"]["status"] and len(run["steps"]) == 1
    step = run["steps"][0]
    assert step["decided_by"]["plan"] == "human" and step["image"] == pause["image"]
    assert [op["box"] for op in step["edits"] if op["op"] == "inpaint"] == [[100, 100, 600, 600]]
