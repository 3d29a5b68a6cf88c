"""LangGraph-native serving: `langgraph dev` (the LangGraph CLI's local server) runs the refine
graph from langgraph.json, and the official langgraph-sdk client drives sessions: through a
pause with the tiny VLM; with the scripted chat, bad answers asked again, the client's settings
honoured or refused, progress as custom events, and the store's status of every way a server
run ends (paused, cancelled, failed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from artloop.store.trajectories import TrajectoryStore
from conftest import free_port

pytestmark = pytest.mark.slow  # each test starts `langgraph dev`
ROOT = Path(__file__).resolve().parents[1]
ARTLOOP = str(Path(sys.executable).with_name("artloop"))
# The scripted chat backend (tests/fakes' model) and tiny images: fast sessions. The model is
# named: the default's world (tiny-shapes-sd) turns the enhancer off, which the server's graph
# (the default loop's) does not run.
SCRIPTED = {
    "ARTLOOP_CHAT__BACKEND": "scripted",
    "ARTLOOP_DIFFUSION__MODEL": "tiny-sd",
    "ARTLOOP_DIFFUSION__WIDTH": "64",
    "ARTLOOP_DIFFUSION__HEIGHT": "64",
    "ARTLOOP_DIFFUSION__STEPS": "2",
}


@contextmanager
def langgraph_dev(tmp_path: Path, **env: str):
    """`langgraph dev` on a free port, its home under `tmp_path`; yields (url, store, process)."""
    port = free_port()
    env = {
        **os.environ,
        "ARTLOOP_HOME": str(tmp_path / "home"),
        "ARTLOOP_LOOP__MAX_ITERS": "1",
        "LANGSMITH_TRACING": "false",
        **env,
    }
    log_path = tmp_path / "langgraph.log"
    log = log_path.open("w")
    # --allow-blocking: the nodes run models (blocking by nature) in the server's worker threads.
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("langgraph")),
            "dev",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-browser",
            "--no-reload",
            "--allow-blocking",
            "--config",
            str(ROOT / "langgraph.json"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/ok", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"langgraph dev did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, TrajectoryStore(tmp_path / "home"), proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def server(tmp_path):
    """The configured defaults, the shapes world (tiny-shapes-qwen2vl in-process, tiny-shapes-sd),
    with the enhancer on: the server's graph runs the default loop's nodes (README)."""
    with langgraph_dev(tmp_path, ARTLOOP_LOOP__ENHANCER="true") as (url, store, _):
        yield url, store


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """One server for the scripted-chat tests. Its sessions are judged by a measured reward
    (darkness: the scripted validator's one answer would trip the broken-judge check)."""
    with langgraph_dev(
        tmp_path_factory.mktemp("scripted"),
        **SCRIPTED,
        ARTLOOP_LOOP__JUDGE="darkness",
        ARTLOOP_UI_URL=UI,
    ) as (url, store, _):
        from langgraph_sdk import get_sync_client

        yield get_sync_client(url=url), store


UI = "http://127.0.0.1:7860"  # where `artloop serve ui` would be: pauses link images there


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ARTLOOP, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )


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
    # The store says where the session waits, and so do the CLI's commands.
    run = store.get_run(run_id)
    assert (run["status"], run["pause"]["pause"]) == ("paused", "plan")
    assert run["config"]["thread_id"] == thread
    shown = json.loads(cli("session", "show", run_id, "--home", str(store.home)).stdout)
    assert shown["status"] == "paused" and shown["pause"]["pause"] == "plan"
    assert shown["pause"]["image_path"] == str(store.images.path(pause["image"]))
    assert "paused at plan" in cli("list", "--home", str(store.home)).stdout

    edit = {"action": "edit", "regions": [{"box": [100, 100, 600, 600], "prompt": "a red hat"}]}
    client.runs.wait(thread, "refine", command={"resume": edit})
    state = client.threads.get_state(thread)
    assert state["next"] == [] and state["values"]["status"] in ("accepted", "max_iters")
    run = store.get_run(run_id)
    assert run["status"] == state["values"]["status"] and len(run["steps"]) == 1
    assert run["pause"] is None
    step = run["steps"][0]
    assert step["decided_by"]["plan"] == "human" and step["image"] == pause["image"]
    assert [op["box"] for op in step["edits"] if op["op"] == "inpaint"] == [[100, 100, 600, 600]]


def test_a_bad_answer_is_asked_again(scripted):
    """Each invalid answer re-asks (the error in the pause's payload), nothing changes, and the
    next valid answer goes on: the thread is never wedged. The payload says how to answer."""
    import jsonschema

    client, store = scripted
    thread = client.threads.create()["thread_id"]
    stream = client.runs.stream(
        thread, "refine", stream_mode="custom", input={"prompt": "a red fox", "pause_at": "plan"}
    )  # one point: a str
    events = [part.data for part in stream if part.event == "custom"]
    started = [e["node"] for e in events if e["event"] == "node_started"]
    assert started == [
        "begin",
        "enhance",
        "review_prompt",
        "generate",
        "data_cot",
        "concept_cot",
        "thesis_cot",
        "review_plan",
    ]
    assert [e["node"] for e in events if e["event"] == "node_finished"] == started[:-1]
    steps = [(e["step"], e["steps"]) for e in events if e["event"] == "diffusion_step"]
    assert steps == [(1, 2), (2, 2)]  # generate: step i of n

    pause = client.threads.get_state(thread)["interrupts"][0]["value"]
    run_id, schema = pause["run_id"], pause["answer_schema"]
    assert Path(pause["image_path"]).is_file()
    assert pause["image_url"] == f"{UI}/gradio_api/file={pause['image_path']}"  # Gradio's route
    assert pause["edited_image"] is pause["edited_image_url"] is None  # not edited yet
    assert set(pause["actions"]) == {"agent", "edit"} and pause["error"] is None
    valid = {"action": "edit", "regions": [{"box": [100, 100, 600, 600], "prompt": "a red hat"}]}
    jsonschema.validate(valid, schema)
    bad = [
        (
            {"action": "edit", "regions": [{"box": [0, 0, 1200, 500], "prompt": "x"}]},
            "regions.0.box: Value error, box [0, 0, 1200, 500] is outside 0-1000",
        ),
        ({"action": "edit", "regions": "a hat, top left"}, "regions: Input should be a valid list"),
        ({"action": "accept"}, "'accept' is not an action at the plan pause"),
    ]
    for answer, message in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(answer, schema)  # the schema says so beforehand too
        client.runs.wait(thread, "refine", command={"resume": answer})
        state = client.threads.get_state(thread)
        assert state["next"] == ["review_plan"], state
        assert message in state["interrupts"][0]["value"]["error"]
        run = store.get_run(run_id)
        assert (run["status"], run["steps"]) == ("paused", [])
        assert message in run["pause"]["error"]

    client.runs.wait(thread, "refine", command={"resume": valid})
    state = client.threads.get_state(thread)
    assert state["next"] == [] and state["values"]["status"] in ("accepted", "max_iters")
    run = store.get_run(run_id)
    assert run["status"] == state["values"]["status"] and len(run["steps"]) == 1
    step = run["steps"][0]
    assert step["decided_by"]["plan"] == "human" and step["human"]["plan"]["action"] == "edit"
    assert [op["box"] for op in step["edits"] if op["op"] == "inpaint"] == [[100, 100, 600, 600]]

    # A new input on the finished thread starts another session, not the old one again.
    client.runs.wait(thread, "refine", input={"prompt": "a lighthouse", "pause_at": "prompt"})
    again = client.threads.get_state(thread)["interrupts"][0]["value"]
    assert again["run_id"] != run_id and again["iteration"] == 0
    assert store.get_run(again["run_id"])["prompt"] == "a lighthouse"
    assert store.get_run(run_id)["status"] == run["status"]  # the finished one is untouched


def test_client_settings_are_honoured_or_refused(scripted):
    """A run's `context` sets the loop and image settings for its session (later runs keep
    them); an unknown or out-of-range setting, like a bad pause point, is refused by name
    before anything is stored."""
    client, store = scripted
    before = store.list_runs(limit=-1)
    thread = client.threads.create()["thread_id"]
    for context, message in [
        ({"loop": {"max_iters": 99}}, "loop.max_iters: Input should be"),
        ({"lop": {"max_iters": 2}}, "lop: Extra inputs are not permitted"),
        ({"diffusion": {"model": "x"}}, "diffusion.model: Extra inputs"),
    ]:
        with pytest.raises(Exception, match="invalid context: " + message):
            client.runs.wait(thread, "refine", input={"prompt": "a fox"}, context=context)
    with pytest.raises(Exception, match=r"unknown pause point\(s\) \['sometimes'\]"):
        client.runs.wait(thread, "refine", input={"prompt": "a fox", "pause_at": ["sometimes"]})
    with pytest.raises(Exception, match="params: not an input"):
        client.runs.wait(thread, "refine", input={"prompt": "a fox", "params": {"width": 13}})
    # The server's graph is the default loop's: a variant with other nodes is refused by name.
    with pytest.raises(Exception, match="loop: this variant runs other nodes .*adds critic"):
        variant = {"loop": {"critics": "merged"}}
        client.runs.wait(thread, "refine", input={"prompt": "a fox"}, context=variant)
    assert store.list_runs(limit=-1) == before  # nothing half-made, no `running` row

    # The server's config says 1 iteration; this session asks for 2, at 72 px.
    settings = {"loop": {"max_iters": 2, "accept_score": 10.0}, "diffusion": {"width": 72}}
    thread = client.threads.create()["thread_id"]
    client.runs.wait(
        thread, "refine", input={"prompt": "a fox", "pause_at": ["plan"]}, context=settings
    )
    for iteration in (0, 1):  # the later runs come without a context: the session keeps it
        pause = client.threads.get_state(thread)["interrupts"][0]["value"]
        assert (pause["pause"], pause["iteration"]) == ("plan", iteration)
        client.runs.wait(thread, "refine", command={"resume": {"action": "agent"}})
    run = store.get_run(pause["run_id"])
    assert (run["status"], len(run["steps"])) == ("max_iters", 2)
    assert run["config"]["loop"]["max_iters"] == 2
    assert {s["params"]["width"] for s in run["steps"]} == {72}


def test_cancelled_server_run_reads_cancelled(scripted):
    client, store = scripted
    thread = client.threads.create()["thread_id"]
    long = {"loop": {"max_iters": 50, "plateau_patience": 50, "accept_score": 10.0}}
    run = client.runs.create(thread, "refine", input={"prompt": "a long fox"}, context=long)
    run_id = wait_for(
        lambda: next(
            (
                r["run_id"]
                for r in store.list_runs()
                if r["prompt"] == "a long fox" and r["iterations"]
            ),
            None,
        )
    )
    assert store.get_run(run_id)["status"] == "running"
    client.runs.cancel(thread, run["run_id"], wait=True)
    assert client.runs.get(thread, run["run_id"])["status"] == "interrupted"  # the server's word
    assert store.get_run(run_id)["status"] == "cancelled"
    listed = cli("list", "--home", str(store.home)).stdout
    assert any(run_id in line and "cancelled" in line for line in listed.splitlines()), listed

    # Run again, it is running again (from its checkpoint), until cancelled again.
    again = client.runs.create(thread, "refine", input=None)
    wait_for(lambda: store.get_run(run_id)["status"] == "running")
    client.runs.cancel(thread, again["run_id"], wait=True)
    assert store.get_run(run_id)["status"] == "cancelled"
    assert len(store.get_run(run_id)["steps"]) >= 1


def test_failed_and_crashed_server_runs_read_what_they_are(tmp_path):
    """A model whose answers never parse fails the run: the store says so and why. A server
    killed mid-run leaves its session reading `interrupted`, not `running` for ever."""
    from artloop.models.scripted import DEFAULTS

    critique = ["not json"] * 3 + [DEFAULTS["Critique"]]  # the first session's 3 attempts fail
    scripts = json.dumps({"scripts": {"Critique": critique}})
    with langgraph_dev(tmp_path, **SCRIPTED, ARTLOOP_CHAT__CUSTOM_KWARGS=scripts) as (
        url,
        store,
        proc,
    ):
        from langgraph_sdk import get_sync_client

        client = get_sync_client(url=url)
        with pytest.raises(Exception, match="Critique"):
            client.runs.wait(
                client.threads.create()["thread_id"], "refine", input={"prompt": "a fox"}
            )
        (failed,) = store.list_runs()
        assert failed["status"] == "failed"
        assert "StructuredOutputError: concept_cot: no valid Critique" in failed["error"]
        listed = cli("list", "--home", str(store.home)).stdout
        assert any(
            failed["run_id"] in line and "failed: StructuredOutputError" in line
            for line in listed.splitlines()
        ), listed

        long = {
            "loop": {
                "max_iters": 50,
                "plateau_patience": 50,
                "judge": "darkness",
                "accept_score": 10.0,
            }
        }
        client.runs.create(
            client.threads.create()["thread_id"],
            "refine",
            input={"prompt": "a long fox"},
            context=long,
        )
        run_id = wait_for(
            lambda: next(
                (
                    r["run_id"]
                    for r in store.list_runs()
                    if r["prompt"] == "a long fox" and r["iterations"]
                ),
                None,
            )
        )
        assert store.get_run(run_id)["status"] == "running"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
        run = store.get_run(run_id)
        assert run["status"] == "interrupted" and "process working on it is gone" in run["error"]
        assert [r["status"] for r in store.list_runs() if r["run_id"] == run_id] == ["interrupted"]


def wait_for(condition, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting")
        time.sleep(0.2)
    return value
