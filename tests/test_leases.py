"""One session at a time per run (store/leases.py): two `artloop resume` of one run at once,
a holder killed with SIGKILL, a lapsed or dead holder, a session in the same process, a lost
lease. Real SQLite, real CLI processes, the tiny SD pipeline with a (slowed) scripted chat."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from artloop.graphs.runner import open_checkpointer, run_session
from artloop.store import leases
from artloop.store.leases import HOST, RunBusyError, hold_run
from artloop.store.trajectories import TrajectoryStore
from conftest import make_ctx
from fakes import ScriptedChat

ARTLOOP = str(Path(sys.executable).with_name("artloop"))
TESTS = str(Path(__file__).parent)
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
    "COLUMNS": "500",
}


def _config(tmp_path: Path, delay_s: float) -> Path:
    """The CLI's stack: a scripted chat taking `delay_s` per answer, tiny SD at 64 px, 2 steps."""
    cfg = tmp_path / "artloop.toml"
    cfg.write_text(
        f'home = "{tmp_path / "home"}"\n[chat]\nbackend = "custom"\ncustom_class = "fakes:SlowChat"\n'
        f"[chat.custom_kwargs]\ndelay_s = {delay_s}\n"
        '[diffusion]\nmodel = "tiny-sd"\nwidth = 64\nheight = 64\nsteps = 2\n'
        "[loop]\nmax_iters = 2\nplateau_patience = 5\n"
    )
    return cfg


def _interrupted_run(store: TrajectoryStore, sd_tool) -> str:
    """A run stopped before its first node: resuming it does all its work (under the loop
    stored with it, the one `_config` gives the CLI)."""
    ctx = make_ctx(store, sd_tool, ScriptedChat(), max_iters=2, plateau_patience=5)
    s = run_session(ctx, prompt="a red fox", interrupt_before=["enhance"])
    assert s.status == "interrupted"
    return s.run_id


def _branches(store: TrajectoryStore, run_id: str) -> int:
    """How many checkpoints have more than one child (0: one linear history)."""
    with open_checkpointer(store) as saver:
        points = list(saver.list({"configurable": {"thread_id": run_id}}))
    parents = [p.parent_config["configurable"]["checkpoint_id"] for p in points if p.parent_config]
    return len(parents) - len(set(parents))


@pytest.mark.slow  # `artloop resume` processes
def test_two_resumes_at_once_one_works_the_other_names_the_holder(tmp_path, sd_tool):
    store = TrajectoryStore(tmp_path / "home")
    rid = _interrupted_run(store, sd_tool)
    cfg = _config(tmp_path, delay_s=0.5)  # ~5 s of work: the two processes overlap
    args = [ARTLOOP, "resume", rid, "--config", str(cfg), "--json"]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert json.loads(outs[winner][0])["status"] == "max_iters"
    message = outs[loser][1].strip()
    assert len(message.splitlines()) == 1, message  # one line, no traceback
    assert f"run {rid} is being worked on by pid {procs[winner].pid} on {HOST}" in message
    run = store.get_run(rid)
    assert run["status"] == "max_iters" and [s["iteration"] for s in run["steps"]] == [0, 1]
    assert _branches(store, rid) == 0  # one history, not two interleaved
    assert not _leases(store)  # released when the winner finished


def _leases(store: TrajectoryStore) -> list[tuple]:
    with sqlite3.connect(store.db_path) as db:
        return db.execute("SELECT run_id, pid, host FROM leases").fetchall()


@pytest.mark.slow
def test_a_sigkilled_holder_does_not_block_the_run(tmp_path, sd_tool):
    store = TrajectoryStore(tmp_path / "home")
    rid = _interrupted_run(store, sd_tool)
    cfg = _config(tmp_path, delay_s=0.2)  # ~2 s of work: killed at its first sign of holding
    args = [ARTLOOP, "resume", rid, "--config", str(cfg), "--json"]
    holder = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 300
    while not _leases(store):  # until it holds the run and works on it
        assert holder.poll() is None and time.monotonic() < deadline, "the resume never started"
        time.sleep(0.1)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert _leases(store) == [(rid, holder.pid, HOST)]  # its lease outlives it ...
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr  # ... but blocks nothing: taken over at once
    assert json.loads(done.stdout)["status"] == "max_iters"
    assert [s["iteration"] for s in store.get_run(rid)["steps"]] == [0, 1]
    assert not _leases(store)


def _put_lease(store: TrajectoryStore, rid: str, pid: int, host: str, expires_in: float) -> None:
    now = time.time()
    with sqlite3.connect(store.db_path) as db:
        db.execute(
            "INSERT OR REPLACE INTO leases VALUES (?, 'someone', ?, ?, ?, ?)",
            (rid, pid, host, now, now + expires_in),
        )


def test_a_dead_or_lapsed_holder_is_taken_over_a_live_one_is_named(store):
    rid = "0123456789abcdef"
    dead = subprocess.Popen(["true"])
    dead.wait()
    _put_lease(store, rid, dead.pid, HOST, expires_in=3600)  # this host, its process gone
    with hold_run(store, rid):
        assert _leases(store) == [(rid, os.getpid(), HOST)]
    assert not _leases(store)
    _put_lease(store, rid, 4242, "elsewhere", expires_in=3600)  # another host: cannot tell
    busy = rf"run {rid} is being worked on by pid 4242 on elsewhere \(since \d{{4}}-"
    with pytest.raises(RunBusyError, match=busy), hold_run(store, rid):
        pass
    _put_lease(store, rid, 4242, "elsewhere", expires_in=-1)  # ... until its lease lapses
    with hold_run(store, rid):
        assert _leases(store) == [(rid, os.getpid(), HOST)]


def test_a_second_session_in_the_same_process_is_refused_and_changes_nothing(store, sd_tool):
    rid = _interrupted_run(store, sd_tool)
    ctx = make_ctx(store, sd_tool, ScriptedChat(), max_iters=1)
    errors: list[Exception] = []
    started = threading.Event()

    def second(name: str, update: dict) -> None:
        if started.is_set():
            return
        started.set()
        before = store.get_run(rid)
        try:
            run_session(ctx, run_id=rid)
        except RunBusyError as e:
            errors.append(e)
        assert store.get_run(rid) == before  # the refused one changed nothing

    done = run_session(ctx, run_id=rid, on_update=second)
    assert done.status == "max_iters"
    assert len(errors) == 1 and f"pid {os.getpid()} on {HOST}" in str(errors[0])
    assert _branches(store, rid) == 0


def test_a_session_that_lost_its_lease_stops_without_marking_the_run(store, sd_tool, monkeypatch):
    monkeypatch.setattr(leases, "LEASE_S", 0.3)  # renewed every 0.1 s
    rid = _interrupted_run(store, sd_tool)

    def stall(name: str, update: dict) -> None:  # as if this process froze past its lease ...
        with sqlite3.connect(store.db_path) as db:  # ... and another session took the run
            db.execute("UPDATE leases SET owner = 'other', pid = 4242, host = 'elsewhere'")
        time.sleep(0.5)

    with pytest.raises(RunBusyError, match=r"taken over by pid 4242 on elsewhere"):
        run_session(make_ctx(store, sd_tool, ScriptedChat()), run_id=rid, on_update=stall)
    assert store.get_run(rid)["status"] == "running"  # left to the new holder, not "failed"
    assert _leases(store) == [(rid, 4242, "elsewhere")]  # and its lease is not touched
