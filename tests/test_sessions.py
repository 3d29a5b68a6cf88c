"""Interactive sessions on the tiny SD pipeline with a scripted chat model: pauses and answers,
bad answers, forking from an earlier checkpoint, deleting."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from artloop.graphs import sessions
from artloop.graphs.human import HumanActionError
from artloop.graphs.runner import open_checkpointer, run_session
from artloop.store.trajectories import StoreError, TrajectoryStore
from conftest import make_ctx, scripted_stack, verdict
from fakes import ScriptedChat


def test_a_person_takes_every_decision(store, sd_tool):
    chat = ScriptedChat(scripts={"Verdict": [verdict("revise", 4.0)]})
    ctx = make_ctx(store, sd_tool, chat, max_iters=2)
    s = run_session(ctx, prompt="a red fox", pause_at=["all"])
    assert s.status == "paused" and s.pause["pause"] == "prompt"
    assert s.pause["proposal"]["prompt"] and list(s.pause["actions"]) == ["agent", "edit"]
    assert store.get_run(s.run_id)["status"] == "paused"

    s = run_session(
        ctx,
        run_id=s.run_id,
        answer={"action": "edit", "prompt": "a blue fox at dusk", "params": {"seed": 7}},
    )
    assert s.pause["pause"] == "plan" and s.pause["image"] in store.images
    s = run_session(
        ctx,
        run_id=s.run_id,
        answer={
            "action": "edit",
            "prompt": "a blue fox wearing a red hat",
            "regions": [{"box": [0, 0, 500, 400], "prompt": "a red woollen hat", "strength": 0.5}],
        },
    )
    assert s.pause["pause"] == "verdict" and s.pause["proposal"]["verdict"] == "revise"
    assert s.pause["edited_image"] in store.images
    s = run_session(ctx, run_id=s.run_id, answer={"action": "accept", "note": "lovely"})
    assert (s.status, s.iterations) == ("accepted", 1)  # the person overruled "revise"

    step = store.get_run(s.run_id)["steps"][0]
    assert step["decided_by"] == {"prompt": "human", "plan": "human", "verdict": "human"}
    assert step["prompt"] == "a blue fox at dusk" and step["params"]["seed"] == 7
    inpaint = [op for op in step["edits"] if op["op"] == "inpaint"]
    assert [(op["box"], op["prompt"]) for op in inpaint] == [
        ([0, 0, 500, 400], "a red woollen hat")
    ]
    assert step["plan"]["revised_prompt"] == "a blue fox wearing a red hat"
    assert step["human"]["verdict"] == {"action": "accept", "note": "lovely"}
    assert step["verdict"] == "accept" and step["agents"]["validate"]["verdict"] == "revise"

    # A finished session exports like any other, with the person's decisions in each step.
    from artloop.store.export import ExportFilters, export_dataset

    export_dataset(store, store.home.parent / "raw", "raw", ExportFilters(run_ids=(s.run_id,)))
    lines = (store.home.parent / "raw" / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"]["decided_by"]["plan"] for line in lines] == ["human"]


def test_letting_the_agent_decide(store, sd_tool):
    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    ctx = make_ctx(store, sd_tool, chat)
    s = run_session(ctx, prompt="a red fox", pause_at=["plan"])
    assert s.pause["pause"] == "plan"
    s = run_session(ctx, run_id=s.run_id, answer=None)  # no answer: the agent's plan stands
    assert s.status == "accepted"
    step = store.get_run(s.run_id)["steps"][0]
    assert step["decided_by"] == {"prompt": "agent", "plan": "agent", "verdict": "agent"}
    assert step["plan"]["revised_prompt"] == step["agents"]["thesis_cot"]["revised_prompt"]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"action": "edit", "regions": [{"box": [600, 0, 500, 500], "prompt": "x"}]}, "inverted"),
        (
            {"action": "edit", "regions": [{"box": [0, 0, 1200, 500], "prompt": "x"}]},
            "outside 0-1000",
        ),
        ({"action": "accept"}, "'accept' is not an action at the plan pause"),
        ({"action": "edit", "params": {"seed": 1}}, "params cannot be set at the plan pause"),
        ({"action": "edit", "prompt": ""}, "prompt"),
        ({"action": "edit", "colour": "red"}, "colour"),
    ],
)
def test_a_bad_answer_is_a_clear_error_and_changes_nothing(store, sd_tool, answer, message):
    ctx = make_ctx(store, sd_tool, ScriptedChat())
    s = run_session(ctx, prompt="a red fox", pause_at=["plan"])
    with pytest.raises(HumanActionError, match=message):
        run_session(ctx, run_id=s.run_id, answer=answer)
    still = sessions.view(store, s.run_id)
    assert still.pause["pause"] == "plan" and still.next == ["review_plan"]
    with pytest.raises(HumanActionError, match="unknown pause point"):
        run_session(ctx, prompt="a fox", pause_at=["sometimes"])


def test_fork_from_an_earlier_checkpoint(store, sd_tool):
    chat = ScriptedChat(scripts={"Verdict": [verdict("revise", 4.0), verdict("revise", 5.0)]})
    ctx = make_ctx(store, sd_tool, chat, max_iters=2, plateau_patience=5)
    parent = run_session(ctx, prompt="a red fox")
    before = store.get_run(parent.run_id)
    points = sessions.history(store, parent.run_id)
    # Forked where the second iteration's plan is about to be applied.
    at = next(p for p in points if p["iteration"] == 1 and p["next"] == ["edit"])
    child_id = sessions.fork(store, parent.run_id, at["checkpoint_id"])
    child = store.get_run(child_id)
    assert child["config"]["forked_from"] == {
        "run_id": parent.run_id,
        "checkpoint_id": at["checkpoint_id"],
    }
    assert child["steps"] == before["steps"][:1]  # the iteration finished before the fork
    assert sessions.view(store, child_id).next == ["edit"]

    chat.scripts["Verdict"] = [verdict("accept", 9.5)]  # the fork goes another way
    done = run_session(ctx, run_id=child_id)
    assert (done.status, done.scores) == ("accepted", [4.0, 9.5])
    assert store.get_run(parent.run_id) == before  # the original is untouched
    # The fork re-ran only from the checkpoint: its second image is the parent's.
    assert store.get_run(child_id)["steps"][1]["image"] == before["steps"][1]["image"]
    with pytest.raises(StoreError, match="no checkpoint"):
        sessions.fork(store, parent.run_id, points[-1]["checkpoint_id"])  # the finished state


def test_fork_from_the_start_of_an_iteration(store, sd_tool):
    """The web UI's "fork from here": the iterations before it kept, it drawn again."""
    chat = ScriptedChat(scripts={"Verdict": [verdict("revise", 4.0), verdict("revise", 5.0)]})
    ctx = make_ctx(store, sd_tool, chat, max_iters=2, plateau_patience=5)
    parent = run_session(ctx, prompt="a red fox")
    before = store.get_run(parent.run_id)
    child_id = sessions.fork_iteration(store, parent.run_id, 1)
    assert store.get_run(child_id)["steps"] == before["steps"][:1]
    assert sessions.view(store, child_id).next == ["enhance"]  # the iteration's first node
    chat.scripts["Verdict"] = [verdict("accept", 9.5)]
    assert run_session(ctx, run_id=child_id).scores == [4.0, 9.5]
    first = sessions.fork_iteration(store, parent.run_id, 0)  # nothing kept
    assert store.get_run(first)["steps"] == [] and sessions.view(store, first).iteration == 0
    with pytest.raises(StoreError, match="no start of iteration 3"):
        sessions.fork_iteration(store, parent.run_id, 2)


def test_delete_removes_the_session_and_its_checkpoints(store, sd_tool):
    ctx = make_ctx(store, sd_tool, ScriptedChat())
    s = run_session(ctx, prompt="a red fox", pause_at=["prompt"])
    keep = run_session(ctx, prompt="a lighthouse", pause_at=["prompt"])
    sessions.delete(store, s.run_id)
    with pytest.raises(StoreError, match="no run"):
        sessions.view(store, s.run_id)
    assert [r["run_id"] for r in store.list_runs()] == [keep.run_id]
    assert sessions.view(store, keep.run_id).pause["pause"] == "prompt"
    with pytest.raises(StoreError, match="no run"):
        sessions.delete(store, s.run_id)


# --- the terminal flow (the installed CLI, in fresh processes) ----------------------------------
ARTLOOP = str(Path(sys.executable).with_name("artloop"))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "500"}


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [ARTLOOP, *args], input=stdin, capture_output=True, text=True, timeout=600, env=ENV
    )


def in_process(*args: str):
    """The same command through the CLI's app in this process (no process start)."""
    from artloop.cli import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "500"})


@pytest.mark.slow  # CLI processes
def test_terminal_session_asks_at_each_pause(tmp_path):
    home = str(tmp_path / "home")
    fast = ["--config", str(scripted_stack(tmp_path / "artloop.toml"))]
    # prompt pause: edit -> prompt, negative (kept), seed 7, steps and guidance (kept);
    # plan pause: the agent's plan; verdict pause: accept.
    done = cli(
        "session",
        "new",
        "a red fox",
        "--home",
        home,
        "--max-iters",
        "2",
        *fast,
        stdin="e\na blue fox\n\n7\n\n\na\ny\n",
    )
    assert done.returncode == 0, done.stderr
    for point in ("prompt", "plan", "verdict"):
        assert f"paused at {point}" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "accepted"
    step = TrajectoryStore(home).get_run(summary["run_id"])["steps"][0]
    assert (step["prompt"], step["params"]["seed"]) == ("a blue fox", 7)
    assert step["decided_by"] == {"prompt": "human", "plan": "agent", "verdict": "human"}
    shown = json.loads(in_process("session", "show", summary["run_id"], "--home", home).stdout)
    assert shown["steps"][0]["human"]["verdict"] == {"action": "accept"}


@pytest.mark.slow
def test_a_killed_session_resumes_at_its_pause(tmp_path):
    home = str(tmp_path / "home")
    fast = ["--config", str(scripted_stack(tmp_path / "artloop.toml"))]
    proc = subprocess.Popen(
        [
            ARTLOOP,
            "session",
            "new",
            "a red fox",
            "--home",
            home,
            "--pause-at",
            "plan",
            "--max-iters",
            "1",
            *fast,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    seen = []
    for line in proc.stdout:  # until the session shows its pause and waits for an answer
        seen.append(line)
        if "image:" in line and any("paused at plan" in s for s in seen):
            break
    proc.kill()  # SIGKILL while a person is deciding
    proc.wait()
    watchdog.cancel()
    text = "".join(seen)
    assert "paused at plan" in text, text[-2000:]
    run_id = re.search(r"paused at plan \(run ([0-9a-f]{16})", text).group(1)
    image = re.search(r"image: \S*/([0-9a-f]{64})\.png", text).group(1)
    # The killed process is gone: the rest is the CLI again, in this process (the session is
    # on disk; a fresh process for each command would only add its ~4 s start).
    listed = [
        json.loads(line)
        for line in in_process("session", "list", "--home", home).stdout.splitlines()
    ]
    assert [(r["run_id"], r["status"]) for r in listed] == [(run_id, "paused")]

    answer = {"action": "edit", "regions": [{"box": [100, 100, 600, 600], "prompt": "a red hat"}]}
    resume = ("session", "resume", run_id, "--home", home, "--no-wait", *fast, "--answer")
    bad = in_process(
        *resume, '{"action": "edit", "regions": [{"box": [600, 0, 100, 50], "prompt": "x"}]}'
    )
    assert bad.exit_code == 2 and "inverted" in bad.stderr
    done = in_process(*resume, json.dumps(answer))
    assert done.exit_code == 0, (done.stderr, done.exception)
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] in ("accepted", "max_iters")
    step = TrajectoryStore(home).get_run(run_id)["steps"][0]
    assert step["image"] == image  # nothing before the pause was redone
    assert step["decided_by"]["plan"] == "human"
    assert [op["box"] for op in step["edits"] if op["op"] == "inpaint"] == [[100, 100, 600, 600]]
    # History and fork from the CLI (one command each; their logic is tested above).
    history = in_process("session", "history", run_id, "--home", home).stdout
    points = [json.loads(p) for p in history.splitlines()]
    index = next(p["index"] for p in points if p["next"] == ["review_plan"])
    forked = json.loads(in_process("session", "fork", run_id, str(index), "--home", home).stdout)
    forked = forked["run_id"]
    assert TrajectoryStore(home).get_run(forked)["config"]["forked_from"]["run_id"] == run_id
    assert json.loads(in_process("session", "delete", forked, "--home", home).stdout) == {
        "deleted": forked
    }


# --- sessions on a shared server: the Postgres checkpointer -------------------------------------
@pytest.mark.postgres
def test_sessions_in_postgres(postgres_url, tmp_path, sd_tool):
    home = tmp_path / "home"
    ctx = make_ctx(
        TrajectoryStore(home, checkpointer=postgres_url),
        sd_tool,
        ScriptedChat(scripts={"Verdict": [verdict("revise", 4.0)]}),
        max_iters=1,
    )
    s = run_session(ctx, prompt="a red fox", pause_at=["plan"])
    assert s.status == "paused"
    # Another process (another UI on the shared server) sees the same pause ...
    other = TrajectoryStore(home, checkpointer=postgres_url)
    assert sessions.view(other, s.run_id).pause["pause"] == "plan"
    assert not (home / "checkpoints.sqlite").exists()  # ... from Postgres, not the home
    done = run_session(ctx, run_id=s.run_id, answer={"action": "edit", "prompt": "a blue fox"})
    assert done.status == "max_iters"
    points = sessions.history(other, s.run_id)
    at = next(p for p in points if p["next"] == ["review_plan"])
    child = sessions.fork(other, s.run_id, at["checkpoint_id"])
    assert sessions.view(other, child).next == ["review_plan"]
    thread = {"configurable": {"thread_id": child, "checkpoint_ns": ""}}
    with open_checkpointer(other) as saver:
        assert saver.get_tuple(thread) is not None
    sessions.delete(other, child)
    with open_checkpointer(other) as saver:
        assert saver.get_tuple(thread) is None  # its checkpoints are gone from Postgres


def test_an_unreachable_postgres_is_a_clear_error(tmp_path, store):
    from artloop.graphs.runner import CheckpointerError

    bad = TrajectoryStore(tmp_path / "h", checkpointer="postgresql://me:s3cret@127.0.0.1:1/db")
    with pytest.raises(
        CheckpointerError, match=r"cannot use the checkpointer at postgresql://me:\*\*\*@"
    ) as e:
        bad.create_run("0123456789abcdef", "a fox", {}, {}, "v")
        sessions.view(bad, "0123456789abcdef")
    assert "s3cret" not in str(e.value)


# --- boxes: one check, one policy ------------------------------------------------------------
@pytest.mark.parametrize(
    ("box", "clipped", "refused"),
    [
        ([-50, 20, 1500, 400], [0, 20, 1000, 400], "is outside 0-1000"),
        ([600, 0, 500, 500.4], [500, 0, 600, 500], "is inverted"),
    ],
)
def test_model_boxes_are_clipped_and_a_persons_refused(sd_tool, box, clipped, refused):
    """One function checks every box: a model's output is repaired, a person's answer (and a
    direct tool call) with the same box is refused, with the same message."""
    from artloop.agents.schemas import RegionalEdit
    from artloop.graphs.human import Region, check_action
    from artloop.tools.diffusion import GenParams, check_box

    assert check_box(box, clip=True) == clipped
    assert RegionalEdit(box=box, prompt="x", strength=0.5).box == clipped
    for refuse in (
        lambda: check_box(box),
        lambda: Region(box=box, prompt="x"),
        lambda: sd_tool.inpaint("0" * 64, tuple(box), "x", "", GenParams(), 0.5),
    ):
        with pytest.raises(ValueError, match=rf"box \[.*\] {refused}"):
            refuse()
    answer = {"action": "edit", "regions": [{"box": box, "prompt": "x"}]}
    with pytest.raises(HumanActionError, match=f"regions.0.box: Value error, box .* {refused}"):
        check_action("plan", answer)
