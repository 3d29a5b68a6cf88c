"""What the LoRA trainers share: config files and the CLI generated from a config dataclass,
the base pipeline, the LoRA adapter, and the training run itself at the standard of diffusers'
training examples (train_text_to_image_lora.py): AdamW with an LR schedule and warm-up
(`diffusers.optimization.get_scheduler`, prepared by accelerate), gradient clipping, gradient
accumulation, mixed precision, trackers, validation images, and `checkpoint-{step}` directories
under the output dir with a total limit and `resume_from_checkpoint` ("latest" or a path).

Checkpoints are safetensors + JSON, never a pickle: `accelerator.save_state` writes the
optimizer, the LR schedule and the RNG states with torch.save, and `load_state` reads them back
with torch.load (unpickling, even if restricted by weights_only), so the run does not use them.
Ours write the LoRA and AdamW's moments as safetensors and the step, AdamW's param groups and the
schedule's state (plain numbers) as JSON; randomness needs no saved state, since every generator
is seeded from (seed, step, micro-batch, process).

The shared run (`run_training`) takes a trainer's `train_step(run)`: one optimizer step's work.
`train_lora` builds it from a per-batch `loss_at` (sft, dpo); DDPO has its own (trainers/ddpo.py)."""

from __future__ import annotations

# Deliberately lazy: torch, diffusers, peft and accelerate are imported inside the functions that
# use them, so that importing this module (the CLI's --help, the config, a test) does not load them.
import dataclasses
import json
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from artloop.runtime.tracking import TrackingError, require_backend
from artloop.tools.diffusion import SIZE_MULTIPLE, DiffusionError, DiffusionTool
from artloop.tools.images import ImageStore
from artloop.tools.lora import trained_weight
from artloop.trainers.checkpoints import (
    CHECKPOINT,
    checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from artloop.trainers.families import FAMILIES, Cond, Family
from artloop.trainers.tracking import log_images, tracking_for, validation_images
from PIL import Image

if TYPE_CHECKING:  # torch is imported where it runs: the CLI starts without it
    import torch


C = TypeVar("C")
T = TypeVar("T")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# diffusers.optimization's schedules that need nothing beyond warm-up and length
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


class TrainerConfigError(ValueError):
    """A trainer config value is invalid; the message names the field."""


def help_field(default: Any = dataclasses.MISSING, *, help: str, **kw: Any) -> Any:
    """A dataclass field that carries its help text (shown by the generated CLI)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def load_trainer_config(cls: type[C], path: str | Path | None, overrides: dict[str, Any]) -> C:
    """`cls` from a TOML file (top-level keys = field names), overridden by non-None flags."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise TrainerConfigError(f"cannot read trainer config {path}: {e}") from None
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - names):
        raise TrainerConfigError(f"unknown {cls.__name__} field(s) in {path}: {', '.join(unknown)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**data)
    except TypeError as e:  # a missing required field
        raise TrainerConfigError(f"{cls.__name__}: {e}") from None


# --- LoRA ---------------------------------------------------------------------------------------
def add_lora(unet: torch.nn.Module, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Freeze the denoiser `unet` (a UNet or a FLUX transformer), add a trainable LoRA to its
    attention projections; its parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS
        )
    )
    return [p for p in unet.parameters() if p.requires_grad]


LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers saves and loads


def lora_file(lora: str | Path) -> Path:
    """A LoRA's weights, given as the file itself or as the directory diffusers saved it in."""
    path = Path(lora)
    return path if path.is_file() else path / LORA_FILE


def check_lora(lora: str | Path, field: str) -> None:
    """A LoRA is a readable safetensors file of LoRA tensors (its header is read, nothing
    loaded): a missing, corrupt or other file is a TrainerConfigError naming `field` and the file."""
    from safetensors import safe_open

    path = lora_file(lora)
    if not path.is_file():
        raise TrainerConfigError(f"{field}: no {LORA_FILE} in {lora}")
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise TrainerConfigError(f"{field}: {path} is not a readable LoRA ({e})") from None
    # diffusers' own test: every tensor of a LoRA (PEFT, diffusers or kohya layout) names "lora".
    others = [k for k in keys if "lora" not in k.lower()]
    if not keys or others:
        what = f"e.g. {others[0]!r}" if others else "it holds no tensors"
        raise TrainerConfigError(
            f"{field}: {path} is not a LoRA ({len(others)} of its "
            f"{len(keys)} tensors are not LoRA weights, {what})"
        )


def load_lora(pipe: Any, lora: str | Path, adapter_name: str, field: str) -> float:
    """Load a checked LoRA onto `pipe` as `adapter_name`; the adapter weight that gives it its
    trained strength (tools/lora.trained_weight). One that does not fit the model is a TrainerConfigError."""
    import logging

    path = lora_file(lora)
    peft_log = logging.getLogger("diffusers.loaders.peft")  # logs the whole error, then raises
    level = peft_log.level
    peft_log.setLevel(logging.CRITICAL)
    try:
        pipe.load_lora_weights(str(path), adapter_name=adapter_name, use_safetensors=True)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:  # shapes or names do not match
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [repr(e)]
        reason = lines[0]
        if reason.endswith(":") and len(lines) > 1:  # torch: "Error(s) in loading ...:", a list
            reason = lines[1] + (f" and {len(lines) - 2} more" if len(lines) > 2 else "")
        raise TrainerConfigError(f"{field}: {path} does not fit this model ({reason})") from None
    finally:
        peft_log.setLevel(level)
    if adapter_name not in {a for names in pipe.get_list_adapters().values() for a in names}:
        raise TrainerConfigError(
            f"{field}: {path} holds no weights for this model (a LoRA for another model family?)"
        )
    return trained_weight(path)


def fuse_preset_lora(pipe: Any, preset: str, field: str) -> None:
    """ArtAug's differential training: fold a preset LoRA into the base weights, so that the
    LoRA trained on top learns only the difference (and is used alone at inference)."""
    scale = load_lora(pipe, preset, "preset", field)
    pipe.fuse_lora(adapter_names=["preset"], lora_scale=scale)
    pipe.unload_lora_weights()


# --- the shared config and training loop -----------------------------------------------------
@dataclasses.dataclass
class LoRATrainConfig:
    """Fields every LoRA trainer has (each trainer's config adds its own)."""

    data: str = help_field("", help="Dataset: an `artloop export` directory or a parquet file")
    output_dir: str = help_field("artloop-lora", help="Where the LoRA and checkpoints go")
    model: str = help_field(
        "tiny-sd",
        help="Base model: a tiny name (tiny-sd, tiny-sdxl, "
        "tiny-flux), or an SD 1.5 / SDXL / FLUX id or path",
    )
    resolution: int = help_field(256, help="Training resolution (images are resized + cropped)")
    rank: int = help_field(8, help="LoRA rank")
    lora_alpha: float = help_field(8.0, help="LoRA alpha (scale = alpha / rank)")
    learning_rate: float = help_field(1e-4, help="AdamW learning rate")
    train_steps: int = help_field(200, help="Optimizer steps")
    batch_size: int = help_field(4, help="Examples per step (per device)")
    gradient_accumulation_steps: int = help_field(1, help="Micro-batches per optimizer step")
    lr_scheduler: str = help_field(
        "constant",
        help="Learning-rate schedule (diffusers' get_scheduler; constant is diffusers' default): "
        + " | ".join(LR_SCHEDULERS),
    )
    lr_warmup_steps: int = help_field(
        0, help="Optimizer steps of linear warm-up from 0 (not with constant)"
    )
    max_grad_norm: float = help_field(
        1.0, help="Clip the gradients' total norm to this before each step (0: no clipping)"
    )
    seed: int = help_field(0, help="Seed for the LoRA's init, batches, noise and timesteps")
    checkpoint_every: int = help_field(
        100,
        help="Save a resumable checkpoint, output_dir/checkpoint-STEP, every N steps and at the "
        "end (diffusers' --checkpointing_steps)",
    )
    checkpoints_total_limit: int = help_field(
        0, help="Keep only the N newest checkpoint-STEP directories (0: keep all)"
    )
    resume_from_checkpoint: str = help_field(
        "latest",
        help="latest: continue from output_dir's newest checkpoint-STEP when there is one; a "
        "checkpoint directory (a path, or a name under output_dir); none: start afresh",
    )
    preset_lora: str | None = help_field(
        None,
        help="ArtAug differential mode: a LoRA (its "
        "directory or .safetensors file) fused into the base "
        "first; the new LoRA learns the rest",
    )
    mixed_precision: str = help_field("no", help="no | fp16 | bf16 (accelerate)")
    report_to: str = help_field(
        "none",
        help="Log the loss, learning rate, rewards and validation images to: none | mlflow (a "
        "local file store, output_dir/mlruns, unless tracking_uri names another) | tensorboard "
        "(output_dir/tensorboard) | wandb (W&B; WANDB_MODE=offline writes output_dir/wandb only)",
    )
    tracking_uri: str = help_field(
        "",
        help="mlflow: a tracking URI (file:DIR, http://server); tensorboard, "
        "wandb: a directory. Empty: under output_dir",
    )
    tracking_project: str = help_field(
        "artloop-train", help="The MLflow experiment, W&B project or TensorBoard folder"
    )
    validation_prompts: list[str] = help_field(
        default_factory=list,
        help="Prompts drawn with the LoRA and logged to the tracker (repeat); default: the "
        "data's first prompt. Only with report_to",
    )
    validation_every: int = help_field(
        0, help="Draw the validation images every N steps too (0: at the end only)"
    )
    validation_inference_steps: int = help_field(20, help="Inference steps of a validation image")

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not self.data:
            raise TrainerConfigError(f"{name}.data: required (an export directory or a parquet)")
        checks = {
            "resolution": self.resolution >= 64,
            "rank": self.rank >= 1,
            "learning_rate": self.learning_rate > 0,
            "train_steps": self.train_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
            "checkpoints_total_limit": self.checkpoints_total_limit >= 0,
            "lr_scheduler": self.lr_scheduler in LR_SCHEDULERS,
            "lr_warmup_steps": self.lr_warmup_steps >= 0,
            "max_grad_norm": self.max_grad_norm >= 0,
            "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
            "mixed_precision": self.mixed_precision in ("no", "fp16", "bf16"),
            "validation_every": self.validation_every >= 0,
            "validation_inference_steps": self.validation_inference_steps >= 1,
            "tracking_project": bool(self.tracking_project),
        }
        for field, ok in checks.items():
            if not ok:
                raise TrainerConfigError(f"{name}.{field}: invalid value {getattr(self, field)!r}")
        try:  # an unknown tracker, or one whose library is missing
            require_backend(self.report_to)
        except TrackingError as e:
            raise TrainerConfigError(f"{name}.report_to: {e}") from None
        if self.preset_lora:
            check_lora(self.preset_lora, f"{name}.preset_lora")
        if self.resume_from_checkpoint not in ("latest", "none", ""):
            resume_path(self)  # a named checkpoint must be there


@dataclasses.dataclass
class DenoisingTrainConfig(LoRATrainConfig):
    """A trainer on the denoising loss (sft, dpo)."""

    caption_dropout: float = help_field(
        0.1,
        help="Share of examples trained with the empty "
        "prompt, so that the unconditional prediction, which "
        "guidance subtracts, learns the change too (diffusers' "
        "--proportion_empty_prompts)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.caption_dropout < 1.0:
            raise TrainerConfigError(
                f"{type(self).__name__}.caption_dropout: {self.caption_dropout} is not in [0, 1)"
            )


def drop_captions(cond: Cond, empty: Cond, p: float, g: torch.Generator) -> Cond:
    """Replace each example's prompt encoding (every tensor of `cond`, batch first) by the empty
    prompt's `empty` (batch 1) with probability p."""
    import torch

    dropped = torch.rand(next(iter(cond.values())).shape[0], generator=g) < p  # (B,)
    return {
        k: torch.where(dropped.view(-1, *[1] * (v.ndim - 1)).to(v.device), empty[k].to(v), v)
        for k, v in cond.items()
    }


def parquet_rows(data: str, columns: set[str], owner: str) -> Any:
    """The `datasets` rows of an export directory (its data/*.parquet) or of a parquet file; a
    file that is not parquet, or that `datasets` cannot read, is a TrainerConfigError naming it."""
    import datasets
    import pyarrow.parquet as pq

    path = Path(data)
    files = sorted((path / "data").glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise TrainerConfigError(f"{owner}.data: no parquet data at {data}")
    rows = 0
    for f in files:
        try:
            rows += pq.read_metadata(f).num_rows  # the footer: a garbage or cut file fails here
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise TrainerConfigError(
                f"{owner}.data: {f} is not a readable parquet file ({e})"
            ) from None
    if not rows:
        raise TrainerConfigError(f"{owner}.data: {data} holds no rows")
    try:
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        cause = e.__cause__ or e  # DatasetGenerationError wraps the reader's own error
        raise TrainerConfigError(f"{owner}.data: cannot read {data} ({cause})") from None
    if missing := columns - set(ds.column_names):
        raise TrainerConfigError(f"{owner}.data: {data} lacks column(s) {sorted(missing)}")
    return ds


def read_rows(ds: Any, read: Callable[[dict], T | None], owner: str, data: str) -> list[T]:
    """`read(row)` for every row of `ds` (None: skip it). A row that cannot be read, such as an
    image that does not decode or a value of the wrong type, is a TrainerConfigError naming it."""
    from PIL import Image

    out: list[T] = []
    index = 0
    try:
        for row in ds:  # `datasets` decodes a row's images as it is drawn
            if (value := read(row)) is not None:
                out.append(value)
            index += 1
    # PIL's UnidentifiedImageError is an OSError; its DecompressionBombError neither.
    except (OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
        raise TrainerConfigError(
            f"{owner}.data: row {index} of {data} is unreadable ({e})"
        ) from None
    return out


def as_image(value: Any) -> Image.Image:
    """An RGB image from a parquet cell: a decoded image, encoded bytes, or {"bytes": ...}."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes):
        try:
            value = Image.open(io.BytesIO(value))
        except UnidentifiedImageError:  # its own message names only the BytesIO object
            raise ValueError("its image bytes are in no format PIL reads") from None
    if not isinstance(value, Image.Image):
        raise TypeError(f"expected an image, got {type(value).__name__}")
    return value.convert("RGB")


def as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value


def load_prompts(data: str, field: str) -> list[str]:
    """The prompts of a prompts export (its prompts.txt) or of a text file, one per line;
    errors name the config `field` that gave `data`."""
    path = Path(data)
    path = path / "prompts.txt" if path.is_dir() else path
    if not path.is_file():
        raise TrainerConfigError(f"{field}: no prompts at {data} (a prompts export or .txt)")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise TrainerConfigError(f"{field}: {path} holds no prompts")
    return prompts


def load_base(cfg: LoRATrainConfig) -> Family:
    """The base model (SD 1.5, SDXL or FLUX) as its training family, with the preset LoRA fused
    in when one is given."""
    name = type(cfg).__name__
    tool = DiffusionTool(model=cfg.model, store=ImageStore(Path(cfg.output_dir) / ".unused"))
    try:
        family = tool.family
    except DiffusionError as e:
        raise TrainerConfigError(f"{name}.model: {e}") from None
    if cfg.resolution % SIZE_MULTIPLE[family]:
        raise TrainerConfigError(
            f"{name}.resolution: {cfg.resolution} is not a multiple of "
            f"{SIZE_MULTIPLE[family]} ({family} latents)"
        )
    pipe = tool.pipeline
    if cfg.preset_lora:
        fuse_preset_lora(pipe, cfg.preset_lora, f"{name}.preset_lora")
    return FAMILIES[family](pipe, tool.max_sequence_length)


@dataclasses.dataclass
class Run:
    """A training run's moving parts, prepared by accelerate: what a trainer's `train_step`
    works with. `step` counts the optimizer steps done."""

    cfg: LoRATrainConfig
    accelerator: Any
    family: Family
    unet: Any  # the denoiser with its LoRA, as accelerate wrapped it
    params: list  # the LoRA's parameters (what AdamW trains and the clipping bounds)
    optimizer: Any
    lr_scheduler: Any
    step: int
    grad_norm: float | None = None  # the last optimizer step's norm before clipping

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses (the schedule's)."""
        return float(self.lr_scheduler.get_last_lr()[0])

    def generator(self, step: int, micro: int) -> torch.Generator:
        """The generator of (seed, step, micro-batch, process): every draw a step makes comes
        from one, so a resumed run matches an unbroken one. Each process draws its own batches
        (data parallel); one process matches the runs before data parallelism."""
        import torch

        index = self.accelerator.process_index
        return torch.Generator().manual_seed(
            self.cfg.seed * 1_000_003 + step * 101 + micro + index * 7_919
        )

    def backward(self, loss: torch.Tensor) -> None:
        """Inside `accelerator.accumulate(run.unet)`: the loss's gradients, and, where accumulate
        syncs them (the last micro-batch of an optimizer step), clipped to max_grad_norm, then
        the optimizer and the LR schedule step. Between syncs accelerate makes both a no-op."""
        accelerator = self.accelerator
        accelerator.backward(loss)
        if accelerator.sync_gradients and self.cfg.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.grad_norm = float(norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()


@dataclasses.dataclass
class CheckpointedState:
    """A trainer's own state that a resumed run needs (DDPO's sampled batch, its reward
    statistics): `save()` gives (JSON-able dict, tensors) for a checkpoint; `load(meta, tensors)`
    restores them."""

    save: Callable[[], tuple[dict, dict[str, Any]]]
    load: Callable[[dict, dict[str, Any]], None]


def train_lora(
    cfg: LoRATrainConfig,
    family: Family,
    examples: int,
    loss_at: Callable[[Any, torch.Tensor, torch.Generator, int], torch.Tensor],
    name: str,
    progress: bool = True,
    extra: dict | None = None,
    *,
    prompts: Sequence[str] = (),
    metrics: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The shared run (`run_training`) on a per-batch loss: `loss_at(denoiser, idx, g, step)` is
    the trainer's loss on the examples `idx`; `g` supplies all its randomness. Each optimizer
    step takes gradient_accumulation_steps micro-batches of batch_size examples, drawn with
    replacement. `metrics()` after the step: what else the tracker gets (rewards, accuracies)."""

    def train_step(run: Run) -> dict[str, float]:
        import torch

        for micro in range(cfg.gradient_accumulation_steps):
            g = run.generator(run.step, micro)
            idx = torch.randint(0, examples, (cfg.batch_size,), generator=g)
            with run.accelerator.accumulate(run.unet):
                loss = loss_at(run.unet, idx, g, run.step)
                run.backward(loss)
        return {"loss": loss.item(), **(metrics() if metrics else {})}

    return run_training(
        cfg,
        family,
        name,
        train_step,
        progress=progress,
        extra={"examples": examples, **(extra or {})},
        prompts=prompts,
    )


def run_training(
    cfg: LoRATrainConfig,
    family: Family,
    name: str,
    train_step: Callable[[Run], dict[str, float]],
    *,
    progress: bool = True,
    extra: dict | Callable[[], dict] | None = None,
    prompts: Sequence[str] = (),
    accumulation_steps: int | None = None,
    state: CheckpointedState | None = None,
) -> dict[str, Any]:
    """The run every trainer shares: a LoRA on the denoiser (UNet or transformer), AdamW with
    the LR schedule, accelerate, checkpoints, tracking; `train_step(run)` does one optimizer
    step's work (its micro-batches under `accelerator.accumulate`, each ending in
    `run.backward(loss)`) and returns its numbers, "loss" among them.

    `accumulation_steps`: accelerate's backward passes per optimizer step, when it is not
    cfg.gradient_accumulation_steps (DDPO: one per micro-batch and trained timestep). `state`:
    the trainer's own state, saved in each checkpoint and restored on resume. `extra` (or what
    it returns, at the end) joins the summary.

    With `cfg.report_to` a tracker gets each step's numbers, the learning rate the step used
    and the gradient norm before clipping, and validation images (`cfg.validation_prompts`,
    else the first of `prompts`) at the end and every `cfg.validation_every` steps.
    """
    import torch
    from accelerate import Accelerator

    tracking = tracking_for(cfg, name)
    # cpu=True where there is no GPU: only then does accelerate read torchrun's environment as
    # several CPU processes (gloo) instead of one.
    accelerator = Accelerator(
        gradient_accumulation_steps=accumulation_steps or cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
        **(tracking.accelerator_kwargs() if tracking else {}),
    )
    if tracking:
        tracking.start(accelerator, cfg)
    shown = list(cfg.validation_prompts or prompts[:1]) if tracking else []
    try:
        run = _prepare(accelerator, cfg, family, state)
        return _loop(run, train_step, name, progress, extra, shown, state)
    finally:
        accelerator.end_training()  # ends the trackers' runs (without trackers: nothing)


def _prepare(
    accelerator: Any, cfg: LoRATrainConfig, family: Family, state: CheckpointedState | None
) -> Run:
    """The LoRA, AdamW and its schedule, restored from the checkpoint to resume from, prepared."""
    import torch
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    family.pipe.to(accelerator.device)
    unet = family.denoiser
    torch.manual_seed(cfg.seed)  # the LoRA's initial weights
    params = add_lora(unet, cfg.rank, cfg.lora_alpha)
    # diffusers' examples cast the frozen base to fp16/bf16 under mixed precision and the LoRA
    # back to fp32, which AdamW and fp16's gradient scaler need. Our base loads in fp32
    # (load_base), so its LoRA is fp32 already; this keeps it so for a base in half precision.
    cast_training_params(unet, dtype=torch.float32)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    # A prepared schedule steps once per process at each optimizer step (accelerate, unless
    # split_batches): diffusers' examples scale its lengths by the process count, as here.
    processes = accelerator.num_processes
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * processes,
        num_training_steps=cfg.train_steps * processes,
    )
    step = 0
    if (ckpt := resume_path(cfg)) is not None:
        meta, tensors = load_checkpoint(ckpt, unet, optimizer, lr_scheduler)
        step = meta["step"]
        if state:
            state.load(meta.get("extra", {}), tensors)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    unet.train()
    return Run(cfg, accelerator, family, unet, params, optimizer, lr_scheduler, step)


def _loop(
    run: Run,
    train_step: Callable[[Run], dict[str, float]],
    name: str,
    progress: bool,
    extra: dict | Callable[[], dict] | None,
    prompts: list[str],
    state: CheckpointedState | None,
) -> dict[str, Any]:
    """run_training's loop; validation images of `prompts` (none without a tracker) go to the
    trackers."""
    import math
    import time

    import torch
    from tqdm.auto import tqdm

    accelerator, cfg, family = run.accelerator, run.cfg, run.family
    out = Path(cfg.output_dir)
    first_step, losses, lrs = run.step, [], []
    main = accelerator.is_main_process  # with `accelerate launch`, only it writes files
    bar = tqdm(total=cfg.train_steps, initial=run.step, desc=name, disable=not (progress and main))
    started = time.perf_counter()
    while run.step < cfg.train_steps:
        lrs.append(run.lr)  # the rate this step's update uses
        run.grad_norm = None
        logs = train_step(run)
        run.step += 1
        step = run.step
        losses.append(logs["loss"])
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if accelerator.trackers:  # report_to: this step's numbers to the tracker
            norm = {} if run.grad_norm is None else {"grad_norm": run.grad_norm}
            accelerator.log({"loss": losses[-1], "lr": lrs[-1], **logs, **norm}, step)
        if (step % cfg.checkpoint_every == 0 or step == cfg.train_steps) and main:
            meta, tensors = state.save() if state else ({}, {})
            unet = accelerator.unwrap_model(run.unet)
            ckpt = out / f"{CHECKPOINT}{step}"
            save_checkpoint(ckpt, step, unet, run.optimizer, run.lr_scheduler, meta, tensors)
            prune_checkpoints(out, cfg.checkpoints_total_limit)
        every = cfg.validation_every
        if prompts and main and (step == cfg.train_steps or (every and step % every == 0)):
            log_images(accelerator, validation_images(family, cfg, prompts), prompts, step)
    bar.close()
    loop_s = time.perf_counter() - started
    # Each process's LoRA norm, gathered: equal in all processes iff gradients were synced.
    lora_norm = torch.stack([p.detach().float().norm() for p in run.params])
    norms = accelerator.gather(lora_norm.norm()[None].to(accelerator.device)).tolist()
    accelerator.wait_for_everyone()
    lora = out / LORA_FILE
    if main:
        family.save_lora(accelerator.unwrap_model(run.unet), out)
    summary = {
        "steps": run.step,
        "trained_steps": run.step - first_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "lrs": lrs,
        "loop_s": loop_s,
        "steps_per_s": (run.step - first_step) / loop_s if loop_s > 0 else math.nan,
        "lora": str(lora),
        "family": family.name,
        "lora_norm_per_process": norms,
        "processes": accelerator.num_processes,
        "main_process": main,
        **((extra() if callable(extra) else extra) or {}),
        "config": dataclasses.asdict(cfg),
    }
    if main:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# --- where a run continues from (trainers/checkpoints.py writes and reads them) ----------------
def resume_path(cfg: LoRATrainConfig) -> Path | None:
    """The checkpoint a run continues from (`cfg.resume_from_checkpoint`): the newest under the
    output dir for "latest" (None if there is none yet), None for "none", else the directory it
    names (a path, or a name under the output dir); one that is not there is a
    TrainerConfigError."""
    value = cfg.resume_from_checkpoint
    if value in ("none", ""):
        return None
    if value == "latest":
        found = checkpoints(Path(cfg.output_dir))
        return found[-1] if found else None
    for path in (Path(value), Path(cfg.output_dir) / value):
        if (path / "state.json").is_file():
            return path
    raise TrainerConfigError(
        f"{type(cfg).__name__}.resume_from_checkpoint: no checkpoint at {value} (a "
        f"{CHECKPOINT}STEP directory this trainer saved, 'latest' or 'none')"
    )
