"""A micro-batcher: requests from concurrent callers (threads) that arrive within a short window
and share a key run as one batch; each caller blocks until its own result is ready.

Used by the diffusion tool and the in-process VLM, so that concurrent sessions share model
calls: one call on B inputs costs much less than B calls on one (the weights are read once per
step).

A failure fails exactly the requests it concerns: `run_batch` raising (its batch), an exception
among its results (that request), a wrong number of results (its batch), a key that cannot be
grouped (that request). The worker thread survives all of these; should it stop anyway, the
requests it held fail and a waiting caller starts a new one, so no caller waits forever.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, InvalidStateError, wait
from dataclasses import dataclass, field
from typing import Any

from artloop.runtime.accounting import charge


class BatchError(RuntimeError):
    """The batcher itself could not serve a request (closed, a bad `run_batch`, a dead worker)."""


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
    CHECK_S = 0.5  # how often a waiting caller checks that the worker is still there

    def __init__(
        self,
        run_batch: RunBatch,
        window_s: float,
        max_batch: int,
        wait_kind: str = "diffusion_wait",
        keep_sizes: int = 4096,
    ) -> None:
        self.run_batch, self.window_s, self.max_batch = run_batch, window_s, max_batch
        self.wait_kind = wait_kind  # the ledger entry a caller's queueing time is charged to
        # The latest batches' sizes (bounded: a long-lived server runs batches forever) and how
        # many batches ran in all; `sizes_since` pairs them up for tests and benchmarks.
        self.sizes: deque[int] = deque(maxlen=keep_sizes)
        self.batches = 0
        self.busy_s = 0.0  # seconds spent running batches (the model's busy time)
        self._queue: queue.Queue[Job | None] = queue.Queue()  # None: stop, once drained
        self._worker: threading.Thread | None = None
        self._closed = False
        # Guards starting the worker, closing, enqueueing and the counts: every job queued
        # before close() precedes the stop marker, so the worker serves it before it stops.
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, key: Hashable, payload: Any) -> Any:
        """Run `payload` in a batch with others of the same key; its result (or its error).
        The time from submitting to its batch starting is charged as `wait_kind`."""
        try:
            hash(key)
        except TypeError as e:
            raise TypeError(f"batch key must be hashable, not {type(key).__name__}") from e
        job = Job(key, payload)
        with self._lock:
            if self._closed:
                raise BatchError("batcher is closed")
            self._supervise()
            self._queue.put(job)
        try:
            while wait([job.future], timeout=self.CHECK_S).not_done:
                with self._lock:
                    self._supervise()
            return job.future.result()
        finally:
            if job.started is not None:
                charge(self.wait_kind, job.started - job.submitted)

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new work; what was already submitted still runs. Waits up to `timeout`
        seconds for the worker to finish it. Calling it again does nothing more."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)
        with self._lock:
            self._supervise()  # closed: fails whatever a worker that is gone left queued

    def sizes_since(self, batches: int) -> list[int]:
        """The sizes of the batches run after the first `batches` (those still kept)."""
        with self._lock:
            n = self.batches - batches
            return list(self.sizes)[-n:] if n > 0 else []

    def _supervise(self) -> None:
        """With the lock held: start a worker unless one is running. Once closed, no new
        worker: the jobs a stopped worker left queued fail instead."""
        if self._worker is not None and self._worker.is_alive():
            return
        if not self._closed:
            self._worker = threading.Thread(target=self._loop, name="batcher", daemon=True)
            self._worker.start()
            return
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _settle(job, BatchError("batcher is closed"))

    def _gather(self, jobs: list[Job]) -> bool:
        """Into `jobs`: the first job, every job already waiting (while the last batch ran,
        many may have queued up), and those that keep arriving less than a window apart:
        concurrent sessions starting one after another join one batch. Gathering stops at
        max_batch jobs, after a window with no arrival, or MAX_WINDOWS windows after the first
        job. True when the stop marker came: the batcher is closed, nothing follows."""
        first = self._queue.get()
        if first is None:
            return True
        jobs.append(first)
        cap = first.submitted + self.MAX_WINDOWS * self.window_s
        while len(jobs) < self.max_batch:
            left = min(jobs[-1].submitted + self.window_s, cap) - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return True
            jobs.append(job)
        while True:  # whatever else already waits: a batch of another key, or the next batch
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            jobs.append(job)

    def _groups(self, jobs: list[Job]) -> Iterator[list[Job]]:
        """The jobs by key, at most max_batch at a time. A key that cannot be grouped (its
        hash or comparison raises) fails its own job only."""
        groups: dict[Hashable, list[Job]] = {}
        for job in jobs:
            try:
                groups.setdefault(job.key, []).append(job)
            except Exception as e:
                _settle(job, e)
        for group in groups.values():
            for i in range(0, len(group), self.max_batch):
                yield group[i : i + self.max_batch]

    def _loop(self) -> None:
        jobs: list[Job] = []  # those taken off the queue and not yet answered
        try:
            while True:
                stop = False
                try:
                    stop = self._gather(jobs)
                    for group in self._groups(jobs):
                        self._run(group)
                except Exception as e:  # a bug here must not take the worker down
                    _fail(jobs, BatchError(f"the batcher failed: {e}"), e)
                jobs.clear()
                if stop:
                    return
        except BaseException as e:  # SystemExit and the like: the worker stops, no job hangs
            _fail(jobs, BatchError(f"the batcher's worker stopped: {e!r}"), e)
            raise

    def _run(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.started = now
        with self._lock:
            self.sizes.append(len(jobs))
            self.batches += 1
        try:
            results = self.run_batch(jobs)
        except BaseException as e:  # the whole call failed: every caller gets the error
            results = [e] * len(jobs)
        self.busy_s += time.perf_counter() - now
        if not isinstance(results, list | tuple) or len(results) != len(jobs):
            got = (
                f"{len(results)} results"
                if isinstance(results, list | tuple)
                else f"a {type(results).__name__}"
            )
            results = [BatchError(f"run_batch returned {got} for {len(jobs)} jobs")] * len(jobs)
        for job, result in zip(jobs, results, strict=True):
            _settle(job, result)


def _settle(job: Job, result: Any) -> None:
    """Give `job` its result, or raise `result` to its caller if it is an exception."""
    try:
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)
    except InvalidStateError:  # already answered
        pass


def _fail(jobs: list[Job], error: BatchError, cause: BaseException) -> None:
    """Fail every job not yet answered with `error` (caused by `cause`)."""
    error.__cause__ = cause
    for job in jobs:
        if not job.future.done():
            _settle(job, error)
