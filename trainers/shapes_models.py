"""`artloop models train-shapes`: the shapes world's three models from one seed, in the order
each needs the one before: tiny-shapes-sd (text-to-image), its inpainting companion (starts from
it), and tiny-shapes-qwen2vl (half its BEFORE images are the new SD model's samples). Each stage
is its own command too (train-shapes-sd, train-shapes-inpaint, train-shapes-vlm) with every
setting; here their defaults, scaled by `scale` for a quick or a longer run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from artloop.models.tiny.shapes_sd import ShapesSDTraining, train_shapes_sd
from artloop.trainers.common import help_field
from artloop.trainers.shapes_inpaint import ShapesInpaintTraining
from artloop.trainers.shapes_vlm import ShapesVLMTraining


@dataclass
class ShapesTraining:
    """Train the shapes world's models from one seed (CPU: about 2.5 h on 2 cores)."""

    output_dir: str = help_field("shapes-models", help="Directory of the three model directories")
    seed: int = help_field(0, help="Seed of every stage")
    scale: float = help_field(
        1.0, help="Multiplies every stage's steps, data and evaluation sizes (0.001: a smoke run)"
    )

    def check(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, not {self.scale}")

    def stages(self) -> tuple[ShapesSDTraining, ShapesInpaintTraining, ShapesVLMTraining]:
        """Each stage's settings: its defaults, sizes scaled, chained by directory."""
        out = Path(self.output_dir)
        sd_dir, inpaint_dir = out / "tiny-shapes-sd", out / "tiny-shapes-sd-inpaint"

        sd = ShapesSDTraining(output_dir=str(sd_dir), seed=self.seed)
        inpaint = ShapesInpaintTraining(
            output_dir=str(inpaint_dir), base=str(sd_dir), seed=self.seed
        )
        vlm = ShapesVLMTraining(
            output_dir=str(out / "tiny-shapes-qwen2vl"), seed=self.seed, sd_model=str(sd_dir)
        )
        sizes = [
            (sd, ("vae_steps", "scenes", "unet_steps")),
            (inpaint, ("scenes", "steps")),
            (vlm, ("episodes", "copy_steps", "see_steps", "look_steps", "steps", "pictures")),
        ]
        for stage, names in sizes:
            for name in names:  # at least 2 of each
                setattr(stage, name, max(2, round(getattr(stage, name) * self.scale)))
            # Evaluation may scale to none; warm-up no longer than the steps.
            stage.eval_scenes = round(stage.eval_scenes * self.scale)
            stage.warmup = min(stage.warmup, max(1, round(stage.warmup * self.scale)))
        return sd, inpaint, vlm


def train_shapes(cfg: ShapesTraining, log: Callable[[str], None] = print) -> dict:
    """The three stages in order; each one's summary."""
    from artloop.trainers.shapes_inpaint import train_shapes_inpaint
    from artloop.trainers.shapes_vlm import train_shapes_vlm

    cfg.check()
    sd, inpaint, vlm = cfg.stages()
    summary = {}
    for name, stage, train in (
        ("tiny-shapes-sd", sd, train_shapes_sd),
        ("tiny-shapes-sd-inpaint", inpaint, train_shapes_inpaint),
        ("tiny-shapes-qwen2vl", vlm, train_shapes_vlm),
    ):
        log(f"--- {name} -> {stage.output_dir}")
        stage.check()
        done = train(stage, log=log)
        summary[name] = {k: v for k, v in done.items() if k not in ("arch", "training", "config")}
    return summary
