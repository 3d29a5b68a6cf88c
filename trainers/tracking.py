"""The trainers' tracking, through accelerate's trackers as diffusers' training examples do:
`Accelerator(log_with=..., project_dir=...)`, `init_trackers` with the trainer config (flat,
secrets masked), `accelerator.log` each step (loss, learning rate, the trainer's rewards or
accuracies), validation images drawn with the LoRA logged the way each tracker takes them, and
`end_training`. Where each writes: runtime/tracking.py's `location`, under the output dir."""

from __future__ import annotations

# Deliberately lazy: torch, numpy, mlflow and wandb are imported inside the functions that use
# them, so that importing this module (the CLI's --help, the config, a test) does not load them.
import dataclasses
import time
from pathlib import Path
from typing import Any

from artloop.runtime.tracking import flat_params, location
from PIL import Image


@dataclasses.dataclass
class Tracking:
    """What one training run logs to: the tracker, where, and under which names."""

    backend: str  # a tracker of config.TRACKERS other than none
    where: str  # runtime.tracking.location: a URI (MLflow) or a directory
    project: str  # the MLflow experiment, W&B project, TensorBoard folder
    run_name: str

    def accelerator_kwargs(self) -> dict[str, Any]:
        """`Accelerator`'s tracking arguments. TensorBoard writes `project_dir/<run name>`."""
        tensorboard = self.backend == "tensorboard"
        project_dir = Path(self.where) / self.project if tensorboard else None
        return {"log_with": self.backend, "project_dir": project_dir}

    def start(self, accelerator: Any, config: Any) -> None:
        """`init_trackers` with the config as a flat dict, secrets masked."""
        values = flat_params(dataclasses.asdict(config))
        if self.backend == "mlflow":  # accelerate's MLflow tracker logs to the global URI
            import mlflow

            mlflow.set_tracking_uri(self.where)
            project, kwargs = self.project, {"run_name": self.run_name}
        elif self.backend == "wandb":
            Path(self.where).mkdir(parents=True, exist_ok=True)
            project, kwargs = self.project, {"name": self.run_name, "dir": self.where}
        else:  # tensorboard: accelerate names the run's folder after the "project"
            project, kwargs = self.run_name, {}
        accelerator.init_trackers(project, config=values, init_kwargs={self.backend: kwargs})


def tracking_for(cfg: Any, name: str) -> Tracking | None:
    """The tracking a trainer config asks for (`report_to`), None for none."""
    if cfg.report_to == "none":
        return None
    run_name = f"{name}-{Path(cfg.output_dir).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"
    where = location(cfg.report_to, cfg.tracking_uri or None, cfg.output_dir)
    return Tracking(cfg.report_to, where, cfg.tracking_project, run_name)


def validation_images(family: Any, cfg: Any, prompts: list[str]) -> list[Image.Image]:
    """`prompts` drawn by the pipeline with the LoRA as trained so far, at the training
    resolution, seed cfg.seed + i for prompt i (the same images each time it is asked)."""
    import torch

    pipe, denoiser = family.pipe, family.denoiser
    pipe.set_progress_bar_config(disable=True)
    was_training = denoiser.training
    denoiser.eval()
    try:
        with torch.no_grad():
            return [
                pipe(
                    prompt=prompt,
                    num_inference_steps=cfg.validation_inference_steps,
                    height=cfg.resolution,
                    width=cfg.resolution,
                    generator=torch.Generator().manual_seed(cfg.seed + i),
                ).images[0]
                for i, prompt in enumerate(prompts)
            ]
    finally:
        denoiser.train(was_training)


def log_images(accelerator: Any, images: list[Image.Image], prompts: list[str], step: int) -> None:
    """Validation images to each tracker, in its own way (diffusers' examples do the same):
    TensorBoard `add_images`, W&B `wandb.Image`s with the prompts as captions, MLflow image
    artifacts `validation/step-NNNNNN-I.png` with the prompts in `validation/prompts.txt`."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            batch = np.stack([np.asarray(im.convert("RGB")) for im in images])
            tracker.writer.add_images("validation", batch, step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            shown = [
                wandb.Image(im, caption=f"{i}: {p}")
                for i, (im, p) in enumerate(zip(images, prompts, strict=True))
            ]
            tracker.log({"validation": shown}, step=step)
        elif tracker.name == "mlflow":
            from mlflow.tracking import MlflowClient

            client, run_id = MlflowClient(), tracker.tracker.info.run_id
            client.log_text(run_id, "\n".join(prompts), "validation/prompts.txt")
            for i, im in enumerate(images):
                client.log_image(run_id, im, f"validation/step-{step:06d}-{i}.png")
