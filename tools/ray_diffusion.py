"""Diffusion on a Ray cluster, for batch collection past one machine: a diffusion worker per GPU
(a Ray actor holding its own DiffusionTool), called through the local tool's interface.

Images travel as PNG bytes: an input image is read from the driver's store and sent; the result
comes back and is stored by the driver under its content hash, so workers need no shared disk.
Each worker is a threaded actor: concurrent calls from sessions meet in its own batcher.
Each keeps its images in a scratch directory, removed when RayDiffusion is closed (explicitly,
as a context manager, or when the driver exits) and when the actor's process ends cleanly.
"""

from __future__ import annotations

# Deliberately lazy: ray is imported inside the functions that use it, so that importing this module
# (the CLI's --help, the config, a test) does not load them.
import atexit
import contextlib
import itertools
import tempfile
import threading
from typing import Any

from artloop.runtime.accounting import timed
from artloop.tools.diffusion import DiffusionError, DiffusionTool, GenParams
from artloop.tools.images import ImageStore


class DiffusionWorker:
    """What runs inside each actor: a DiffusionTool over a scratch image store."""

    def __init__(
        self, model: str, family: str, device: str, dtype: str, window_ms: float, max_batch: int
    ) -> None:
        # Removed by close(), else when this object is collected or the process exits cleanly.
        self.scratch = tempfile.TemporaryDirectory(prefix="artloop-worker-")
        self.store = ImageStore(self.scratch.name)
        self.tool = DiffusionTool(
            model,
            store=self.store,
            family=family,
            device=device,
            dtype=dtype,
            batch_window_ms=window_ms,
            max_batch=max_batch,
        )

    def call(self, method: str, image: bytes | None, *args: Any) -> bytes:
        """Run `method` (text_to_image, image_to_image, inpaint); the result's PNG bytes."""
        if image is not None:
            args = (self.store.put_bytes(image), *args)
        digest = getattr(self.tool, method)(*args)
        return self.store.path(digest).read_bytes()

    def batch_sizes(self) -> list[int]:
        return self.tool.batch_sizes

    def scratch_dir(self) -> str:
        return self.scratch.name

    def close(self) -> None:
        """Remove the scratch store (the actor is ended next)."""
        self.scratch.cleanup()


class RayDiffusion:
    """The DiffusionTool interface, served by `workers` Ray actors (round robin per call)."""

    def __init__(
        self,
        model: str,
        store: ImageStore,
        *,
        workers: int = 1,
        gpus_per_worker: float = 0.0,
        family: str = "auto",
        device: str = "cpu",
        dtype: str = "float32",
        batch_window_ms: float = 0.0,
        max_batch: int = 16,
    ) -> None:
        import ray

        if not ray.is_initialized():
            raise DiffusionError("Ray is not initialised: call ray.init(address) first")
        self.store = store
        self._local = DiffusionTool(model, store=store, family=family, device=device, dtype=dtype)
        actor = ray.remote(DiffusionWorker).options(num_gpus=gpus_per_worker, max_concurrency=64)
        self._workers = [
            actor.remote(model, family, device, dtype, batch_window_ms, max_batch)
            for _ in range(workers)
        ]
        self._turn = itertools.count()
        self._lock = threading.Lock()
        # Registered after `import ray` registered ray.shutdown, so it runs first: Ray is up.
        atexit.register(self.close)

    def close(self) -> None:
        """Remove the workers' scratch stores and end the actors; calls after this fail."""
        import ray

        atexit.unregister(self.close)
        workers, self._workers = self._workers, []
        if not (workers and ray.is_initialized()):
            return
        for worker, done in [(w, w.close.remote()) for w in workers]:
            with contextlib.suppress(ray.exceptions.RayError):  # a dead actor removes nothing
                ray.get(done, timeout=60)
            ray.kill(worker)

    def __enter__(self) -> RayDiffusion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # What the loop reads without generating: from a local tool that never loads weights.
    @property
    def family(self) -> str:
        return self._local.family

    @property
    def identity(self) -> dict:
        return {**self._local.identity, "ray_workers": len(self._workers)}

    def _call(self, method: str, image: str | None, *args: Any) -> str:
        import ray

        with self._lock:
            if not self._workers:
                raise DiffusionError("this RayDiffusion is closed (its workers were ended)")
            worker = self._workers[next(self._turn) % len(self._workers)]
        data = self.store.path(image).read_bytes() if image is not None else None
        with timed("diffusion"):
            try:
                png = ray.get(worker.call.remote(method, data, *args))
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(e.cause, DiffusionError) else None
                raise cause or DiffusionError(f"{method} on a Ray worker failed: {e}") from None
        return self.store.put_bytes(png)

    def text_to_image(self, prompt: str, negative_prompt: str, params: GenParams) -> str:
        return self._call("text_to_image", None, prompt, negative_prompt, params)

    def image_to_image(
        self, image: str, prompt: str, negative_prompt: str, params: GenParams, strength: float
    ) -> str:
        return self._call("image_to_image", image, prompt, negative_prompt, params, strength)

    def inpaint(
        self,
        image: str,
        box: tuple[int, int, int, int],
        prompt: str,
        negative_prompt: str,
        params: GenParams,
        strength: float,
    ) -> str:
        return self._call("inpaint", image, box, prompt, negative_prompt, params, strength)

    @property
    def batch_sizes(self) -> list[int]:
        import ray

        return [n for w in self._workers for n in ray.get(w.batch_sizes.remote())]
