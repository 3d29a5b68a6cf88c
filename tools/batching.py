"""A micro-batcher: requests from concurrent callers (threads) that arrive within a short window
and share a key run as one batch; each caller blocks until its own result is ready.

Used by the diffusion tool, so that concurrent sessions share pipeline calls: one call on B
images costs much less than B calls on one (the model's weights are read once per step).
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
    """Gathers jobs for `window_s` after the first one arrives, then runs each group of jobs with
    the same key (at most `max_batch` at a time) through `run_batch`, on one worker thread."""

    def __init__(self, run_batch: RunBatch, window_s: float, max_batch: int) -> None:
        self.run_batch, self.window_s, self.max_batch = run_batch, window_s, max_batch
        self.sizes: list[int] = []  # every batch's size, for tests and benchmarks
        self._queue: queue.Queue[Job] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, key: Hashable, payload: Any) -> Any:
        """Run `payload` in a batch with others of the same key; its result (or its error).
        The time from submitting to its batch starting is charged as diffusion_wait."""
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
                charge("diffusion_wait", job.started - job.submitted)

    def _gather(self) -> list[Job]:
        """The first job, those arriving within the window after it, and every job already
        waiting (while the last batch ran, many may have queued up past their window)."""
        jobs = [self._queue.get()]
        deadline = jobs[0].submitted + self.window_s
        while True:
            left = deadline - time.perf_counter()
            try:
                jobs.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
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
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
