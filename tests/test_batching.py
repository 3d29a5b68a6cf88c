"""The micro-batcher's failure modes, with plain Python `run_batch` functions: each failure fails
exactly the requests it concerns, the batcher keeps serving, and nothing waits forever (every
wait here is bounded, so a regression fails instead of hanging)."""

from __future__ import annotations

import threading
import time

import pytest
from artloop.runtime import batching
from artloop.runtime.batching import Batcher

WAIT_S = 5.0


def start(batcher: Batcher, key, payload):
    """Submit in a thread; the returned function waits (bounded) for its outcome."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = batcher.submit(key, payload)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def outcome() -> dict:
        thread.join(WAIT_S)
        if thread.is_alive():
            pytest.fail(f"submit({key!r}, {payload!r}) still blocked after {WAIT_S} s")
        return box

    return outcome


def call(batcher: Batcher, key, payload) -> dict:
    return start(batcher, key, payload)()


def double(jobs):
    return [job.payload * 2 for job in jobs]


def test_wrong_result_count_fails_that_batch_and_keeps_serving():
    broken = {"on": True}

    def short(jobs):
        out = double(jobs)
        return out[1:] if broken["on"] else out

    batcher = Batcher(short, window_s=0.05, max_batch=8)
    waits = [start(batcher, "k", i) for i in range(3)]
    for outcome in waits:
        error = outcome()["error"]
        assert isinstance(error, batching.BatchError)
        assert "results for" in str(error) and "jobs" in str(error)
    broken["on"] = False
    assert call(batcher, "k", 4) == {"result": 8}

    batcher.run_batch = lambda jobs: None  # not a list at all
    assert "returned a NoneType" in str(call(batcher, "k", 1)["error"])


def test_unhashable_key_fails_only_its_caller():
    batcher = Batcher(double, window_s=0.05, max_batch=8)
    bad, good = start(batcher, ["not", "hashable"], 1), start(batcher, "k", 2)
    error = bad()["error"]
    assert isinstance(error, TypeError) and "hashable" in str(error)
    assert good() == {"result": 4}
    assert call(batcher, "k", 3) == {"result": 6}


class Touchy:
    """A key that hashes but cannot be compared with another like it."""

    def __hash__(self) -> int:
        return 1

    def __eq__(self, other) -> bool:
        raise ValueError("cannot compare")


def test_key_that_cannot_be_grouped_fails_only_its_job():
    def slow(jobs):
        time.sleep(0.3)
        return double(jobs)

    batcher = Batcher(slow, window_s=0.01, max_batch=8)
    first = start(batcher, "k", 0)
    time.sleep(0.1)  # the first batch runs; these two queue up and are grouped together
    a, b = start(batcher, Touchy(), 1), start(batcher, Touchy(), 2)
    outcomes = [a(), b()]
    assert first() == {"result": 0}
    results = [o["result"] for o in outcomes if "result" in o]
    errors = [o["error"] for o in outcomes if "error" in o]
    assert len(results) == 1 and results[0] in (2, 4)  # the first of the two grouped fine
    assert len(errors) == 1 and str(errors[0]) == "cannot compare"
    assert call(batcher, "k", 5) == {"result": 10}


def test_run_batch_raising_fails_its_batch_only():
    def picky(jobs):
        if jobs[0].key == "bad":
            raise RuntimeError("model exploded")
        return double(jobs)

    batcher = Batcher(picky, window_s=0.05, max_batch=8)
    bad, good = [start(batcher, "bad", i) for i in range(2)], start(batcher, "good", 1)
    for outcome in bad:
        assert str(outcome()["error"]) == "model exploded"
    assert good() == {"result": 2}
    assert call(batcher, "bad", 1)["error"] and call(batcher, "good", 3) == {"result": 6}


def test_a_result_that_is_an_exception_fails_only_its_job():
    def checked(jobs):
        return [ValueError(f"bad {j.payload}") if j.payload < 0 else j.payload * 2 for j in jobs]

    batcher = Batcher(checked, window_s=0.1, max_batch=8)
    bad, good = start(batcher, "k", -1), start(batcher, "k", 1)
    assert str(bad()["error"]) == "bad -1"
    assert good() == {"result": 2}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_that_dies_fails_its_jobs_and_is_replaced(monkeypatch):
    batcher = Batcher(double, window_s=0.01, max_batch=8)
    monkeypatch.setattr(batcher, "CHECK_S", 0.05)
    run = batcher._run

    def dying(jobs):  # a fault the handlers cannot catch: the worker thread ends
        if jobs[0].key == "die":
            time.sleep(0.3)
            raise SystemExit
        run(jobs)

    monkeypatch.setattr(batcher, "_run", dying)
    doomed = start(batcher, "die", 1)
    time.sleep(0.1)
    queued = start(batcher, "k", 2)  # waits in the queue while the worker dies
    error = doomed()["error"]
    assert isinstance(error, batching.BatchError) and "worker stopped" in str(error)
    assert queued() == {"result": 4}  # its caller noticed and started a new worker
    assert call(batcher, "k", 3) == {"result": 6}


def test_close_runs_pending_work_then_refuses_new_work():
    def slow(jobs):
        time.sleep(0.2)
        return double(jobs)

    batcher = Batcher(slow, window_s=0.01, max_batch=8)
    first = start(batcher, "k", 0)
    time.sleep(0.05)
    pending = [start(batcher, key, i) for i, key in enumerate("ab", 1)]
    time.sleep(0.05)
    worker = batcher._worker
    batcher.close(timeout=WAIT_S)
    assert [o() for o in [first, *pending]] == [{"result": 0}, {"result": 2}, {"result": 4}]
    assert batcher.closed and not worker.is_alive()
    error = call(batcher, "k", 1)["error"]
    assert isinstance(error, batching.BatchError) and str(error) == "batcher is closed"
    batcher.close()  # again: nothing more to do


def test_close_before_any_work():
    batcher = Batcher(double, window_s=0.01, max_batch=8)
    batcher.close()
    assert str(call(batcher, "k", 1)["error"]) == "batcher is closed"


def test_sizes_are_bounded():
    batcher = Batcher(double, window_s=0.0, max_batch=8, keep_sizes=4)
    for i in range(10):
        assert call(batcher, "k", i) == {"result": 2 * i}
    assert list(batcher.sizes) == [1, 1, 1, 1] and batcher.batches == 10
    assert batcher.sizes_since(8) == [1, 1] and batcher.sizes_since(10) == []
    assert batcher.sizes_since(0) == [1, 1, 1, 1]  # only the latest are kept


def serving(batcher: Batcher) -> threading.Thread:
    """Give `batcher` a plain run_batch and a running worker; its worker thread."""
    batcher.run_batch = double
    assert call(batcher, "k", 1) == {"result": 2}
    assert batcher._worker.is_alive()
    return batcher._worker


def test_set_batching_closes_the_old_batcher(tmp_path):
    from artloop.tools.diffusion import DiffusionTool
    from artloop.tools.images import ImageStore

    tool = DiffusionTool("tiny-sd", ImageStore(tmp_path))  # weights load on first use only
    tool.set_batching(50)
    old = tool._batcher
    worker = serving(old)
    tool.set_batching(80)
    assert tool._batcher is not old and tool._batcher.window_s == 0.08
    assert old.closed and not worker.is_alive()
    assert str(call(old, "k", 1)["error"]) == "batcher is closed"

    current = tool._batcher
    worker = serving(current)
    tool.close()
    assert tool._batcher is None and current.closed and not worker.is_alive()


def test_inprocess_vlm_closes_its_batcher():
    from artloop.models.inprocess import ChatQwen2VLLocal

    chat = ChatQwen2VLLocal(model="tiny-qwen2vl")  # weights load on first use only
    batcher = chat._batcher()
    worker = serving(batcher)
    chat.close()
    assert batcher.closed and not worker.is_alive() and chat._batch is None
    assert chat._batcher() is not batcher  # a later call gets a fresh one
    chat.close()
