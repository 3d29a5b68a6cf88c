"""Experiment tracking: one run's parameters, metrics (single values and per-step series) and
images logged to MLflow, TensorBoard or W&B. A finished session logs itself through
`log_metrics` (graphs/tracking.py) when the config's `[tracking]` names a backend; the
experiment harness calls it per variant; the trainers log through accelerate's trackers and
share `location`, `flat_params` and `require_backend` with it.

MLflow's default is a local file store (`file:<base>/mlruns`, no server): MLflow 3 keeps that
store in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE is true, which
`location` sets for a file store (a user's own value wins). Nothing config-like is logged
without `mask_secrets`.
"""

from __future__ import annotations

# Deliberately lazy: mlflow, torch's tensorboard writer and wandb are imported inside the
# functions that use them, so that importing this module (the config, the CLI) stays cheap.
import importlib.util
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from artloop.config import TRACKERS, TrackingConfig, mask_secrets
from PIL import Image

# The package each backend imports, and what installs it.
PACKAGES = {
    "mlflow": ("mlflow", "mlflow-skinny"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "artloop[wandb]"),
}
_LOCK = threading.Lock()  # sessions finish in threads (a batch): one run is logged at a time


class TrackingError(ValueError):
    """A tracking backend that is unknown or not installed; the message says which and why."""


def require_backend(backend: str) -> None:
    """`backend` is one of TRACKERS and its library is installed, else TrackingError."""
    if backend not in TRACKERS:
        raise TrackingError(f"unknown tracker {backend!r} (one of {', '.join(TRACKERS)})")
    if backend != "none":
        module, install = PACKAGES[backend]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(f"tracker {backend} needs {module}: pip install '{install}'")


def location(backend: str, uri: str | None, base: str | Path) -> str:
    """Where `backend` writes: `uri` when given, else under `base` (a session's home, a
    trainer's output dir): MLflow's local file store `file:///<base>/mlruns`, TensorBoard's
    event files in `<base>/tensorboard`, W&B's run folders in `<base>/wandb`. An MLflow URI
    that is a plain path becomes a file store."""
    if backend == "mlflow":
        if uri and (uri.startswith("file:") or re.match(r"^[a-z][\w+.-]*://", uri)):
            where = uri
        else:
            where = Path(uri or Path(base) / "mlruns").expanduser().resolve().as_uri()
        if where.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return where
    default = "tensorboard" if backend == "tensorboard" else ""
    return str(Path(uri).expanduser() if uri else Path(base) / default)


def flat_params(data: Mapping[str, Any], secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Config-like `data` as one flat dict of scalars that every tracker takes, secrets masked
    first: nested dicts become dotted keys, lists and None JSON text."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value, default=str)

    walk("", mask_secrets(dict(data), secrets))
    return out


def _name(key: str) -> str:
    """A metric or parameter name every tracker accepts (MLflow's are the strictest)."""
    return re.sub(r"[^\w\-. /]", "_", key)


def _image(value: str | Path | Image.Image) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    with Image.open(value) as im:
        return im.convert("RGB")


def log_metrics(
    tracking: TrackingConfig,
    run_name: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float | None] | None = None,
    series: Mapping[str, Sequence[float | None]] | None = None,
    images: Mapping[str, str | Path | Image.Image] | None = None,
    home: str | Path = ".",
    secrets: Iterable[str] = (),
) -> str | None:
    """Log one run to `tracking.backend` under the experiment `tracking.experiment`, named
    `run_name`: `params` (config-like, flattened and secrets masked, `secrets` hunted by value
    too), `metrics` (single values, at step 0), `series` (per step: item i is step i + 1, None
    skipped; e.g. a session's score per iteration) and `images` (files or PIL images, by name).
    None values are left out. `tracking.uri` unset, the files go under `home` (`location`).

    Returns the run's identity: the MLflow run id, the TensorBoard run directory or the W&B
    run id; None where the backend is none. A missing library is a TrackingError."""
    backend = tracking.backend
    if backend == "none":
        return None
    require_backend(backend)
    where = location(backend, tracking.uri, home)
    values = {_name(k): float(v) for k, v in (metrics or {}).items() if v is not None}
    steps: dict[str, list[tuple[int, float]]] = {
        _name(k): [(i, float(v)) for i, v in enumerate(vs, 1) if v is not None]
        for k, vs in (series or {}).items()
    }
    pictures = {_name(k): _image(v) for k, v in (images or {}).items()}
    flat = {_name(k): v for k, v in flat_params(params or {}, secrets).items()}
    write = {"mlflow": _mlflow, "tensorboard": _tensorboard, "wandb": _wandb}[backend]
    with _LOCK:
        return write(where, tracking.experiment, run_name, flat, values, steps, pictures)


def _mlflow(where, experiment, run_name, params, values, steps, pictures) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    client = MlflowClient(where)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in values.items()]
        metrics += [Metric(k, v, now, i) for k, pairs in steps.items() for i, v in pairs]
        items = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for at in range(0, len(items), 100):  # MLflow takes 100 params per batch
            client.log_batch(run_id, params=items[at : at + 100])
        for at in range(0, len(metrics), 1000):  # ... and 1000 metrics
            client.log_batch(run_id, metrics=metrics[at : at + 1000])
        for name, picture in pictures.items():
            client.log_image(run_id, picture, f"images/{name}.png")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def _tensorboard(where, experiment, run_name, params, values, steps, pictures) -> str:
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    logdir = Path(where) / experiment / run_name.replace(os.sep, "_")
    with SummaryWriter(str(logdir)) as writer:
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        writer.add_text("params", "| parameter | value |\n|---|---|\n" + table, 0)
        for k, v in values.items():
            writer.add_scalar(k, v, 0)
        for k, pairs in steps.items():
            for i, v in pairs:
                writer.add_scalar(k, v, i)
        for name, picture in pictures.items():
            writer.add_image(name, np.asarray(picture), 0, dataformats="HWC")
    return str(logdir)


def _wandb(where, experiment, run_name, params, values, steps, pictures) -> str:
    import wandb

    Path(where).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=experiment, name=run_name, dir=where, config=params, reinit="create_new"
    )
    try:
        by_step: dict[int, dict[str, float]] = {}
        for k, pairs in steps.items():
            for i, v in pairs:
                by_step.setdefault(i, {})[k] = v
        for i in sorted(by_step):
            run.log(by_step[i], step=i)
        if pictures:
            last = max(by_step, default=0)
            run.log({k: wandb.Image(p, caption=k) for k, p in pictures.items()}, step=last)
        run.summary.update(values)
    finally:
        run.finish()
    return run.id
