"""A micro-batcher: requests from concurrent callers (threads) that arrive within a short window
and share a key run as one batch; each caller blocks until its own result is ready.

Used by the diffusion tool and the in-process VLM, so that concurrent sessions share model
calls: one call on B inputs costs much less than B calls on one (the weights are read once per
step).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from artloop.tools.accounting import charge


@dataclass
class Job:
    """One request: its batch key, its own inputs, and where its result goes."""

    key: Hashable
    payload: Any
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None


RunBatch = Callable[
    [list[Job]], list[Any]
]  # results in the jobs' order; an item may be an exception


class Batcher:
    """Gathers jobs while they keep arriving within `window_s` of each other, then runs each
    group of jobs with the same key (at most `max_batch` at a time) through `run_batch`, on one
    worker thread."""

    MAX_WINDOWS = 4

    def __init__(
        self,
        run_batch: RunBatch,
        window_s: float,
        max_batch: int,
        wait_kind: str = "diffusion_wait",
    ) -> None:
        self.run_batch, self.window_s, self.max_batch = run_batch, window_s, max_batch
        self.wait_kind = wait_kind  # the ledger entry a caller's queueing time is charged to
        self.sizes: list[int] = []  # every batch's size, for tests and benchmarks
        self.busy_s = 0.0  # seconds spent running batches (the model's busy time)
        self._queue: queue.Queue[Job] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, key: Hashable, payload: Any) -> Any:
        """Run `payload` in a batch with others of the same key; its result (or its error).
        The time from submitting to its batch starting is charged as `wait_kind`."""
        with self._start_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="batcher", daemon=True)
                self._worker.start()
        job = Job(key, payload)
        self._queue.put(job)
        try:
            return job.future.result()
        finally:
            if job.started is not None:
                charge(self.wait_kind, job.started - job.submitted)

    def _gather(self) -> list[Job]:
        """The first job, every job already waiting (while the last batch ran, many may have
        queued up), and those that keep arriving less than a window apart: concurrent sessions
        starting one after another join one batch. Gathering stops at max_batch jobs, after a
        window with no arrival, or MAX_WINDOWS windows after the first job."""
        jobs = [self._queue.get()]
        cap = jobs[0].submitted + self.MAX_WINDOWS * self.window_s
        while len(jobs) < self.max_batch:
            now = time.perf_counter()
            left = min(jobs[-1].submitted + self.window_s, cap) - now
            try:
                jobs.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        while True:  # whatever else already waits: a batch of another key, or the next batch
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                return jobs

    def _loop(self) -> None:
        while True:
            groups: dict[Hashable, list[Job]] = {}
            for job in self._gather():
                groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                for i in range(0, len(jobs), self.max_batch):
                    self._run(jobs[i : i + self.max_batch])

    def _run(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.started = now
        self.sizes.append(len(jobs))
        try:
            results = self.run_batch(jobs)
        except BaseException as e:  # the whole call failed: every caller gets the error
            results = [e] * len(jobs)
        self.busy_s += time.perf_counter() - now
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
