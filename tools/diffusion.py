"""The diffusion tool: text-to-image, image-to-image, box inpainting and regional prompting
(tools/regional.py) with diffusers.

Images go in and come out as hashes of the ImageStore. One set of weights serves all the
tasks (`from_pipe` shares the components). Loading is lazy (smolagents-style `setup()`), so
building the tool is free and the graph can be assembled without touching torch.
"""

from __future__ import annotations

# Deliberately lazy: torch and diffusers are imported inside the functions that use them, so that
# importing this module (the CLI's --help, the config, a test) does not load them.
import inspect
import json
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from artloop.models.tiny import paired_inpaint_model, resolve_model
from artloop.runtime.accounting import charge, timed
from artloop.runtime.batching import Batcher
from artloop.tools.images import ImageStore, ImageStoreError
from artloop.tools.lora import LoraError, fuse_lora, lora_path, sha256
from artloop.tools.regional import TECHNIQUES, Job, Region, generate
from PIL import Image, ImageDraw, ImageFilter

FAMILIES = ("sd", "sdxl", "flux")
MIN_SIDE, MAX_SIDE = 64, 2048
# Latents are 8x smaller than pixels; FLUX also packs 2x2 latent patches.
SIZE_MULTIPLE = {"sd": 8, "sdxl": 8, "flux": 16}
DTYPES = ("float32", "float16", "bfloat16")
# Told of each denoising step (step, steps) of the images asked for in this context: the refine
# graph's progress events. Read in the caller's thread, so a batched call tells each caller.
on_step: ContextVar[Callable[[int, int], None] | None] = ContextVar("artloop_on_step", default=None)


@dataclass
class GenParams:
    """Generation parameters (all JSON-serialisable)."""

    width: int = 256
    height: int = 256
    num_inference_steps: int = 4
    guidance_scale: float = 5.0  # CFG for SD/SDXL; the distilled guidance for FLUX-dev
    seed: int = 0
    true_cfg_scale: float = 1.0  # FLUX only: > 1 applies the negative prompt (twice the cost)


class DiffusionError(RuntimeError):
    """A generation could not be done; the message names the model, input or parameter."""


class BoxError(DiffusionError, ValueError):
    """Not a usable box; the message says why (a ValueError too: pydantic validators raise it)."""


def check_box(box: Any, *, clip: bool = False) -> list[int]:
    """The one box check. Boxes are [x1, y1, x2, y2], normalised to 0-1000 (Qwen2-VL's
    convention, top-left origin); fractions are rounded. The policy: a model's output is
    repaired (`clip=True`: clipped to 0-1000, corners ordered), anything else (a person's
    answer, a tool call) must already be a box (out of range or inverted: BoxError). A box
    that is not four numbers, or that has no area, is refused either way."""
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise BoxError(f"a box is four numbers [x1, y1, x2, y2], got {box!r}")
    try:
        x1, y1, x2, y2 = (round(float(v)) for v in box)
    except (TypeError, ValueError, OverflowError):
        raise BoxError(f"box coordinates must be numbers, got {box!r}") from None
    if clip:
        x1, x2 = sorted(min(1000, max(0, v)) for v in (x1, x2))
        y1, y2 = sorted(min(1000, max(0, v)) for v in (y1, y2))
    elif not all(0 <= v <= 1000 for v in (x1, y1, x2, y2)):
        raise BoxError(f"box {list(box)} is outside 0-1000 (coordinates normalised to 1000)")
    if x1 >= x2 or y1 >= y2:
        what = "has no area" if clip or x1 == x2 or y1 == y2 else "is inverted"
        raise BoxError(f"box {list(box)} {what}: need x1 < x2 and y1 < y2")
    return [x1, y1, x2, y2]


def box_mask(box: tuple[int, int, int, int], width: int, height: int) -> Image.Image:
    """An L-mode mask, white inside `box` (x1, y1, x2, y2 normalised to 0-1000, as Qwen2-VL)."""
    x1, y1, x2, y2 = check_box(box)
    mask = Image.new("L", (width, height), 0)
    left, top = round(x1 * width / 1000), round(y1 * height / 1000)
    right, bottom = round(x2 * width / 1000), round(y2 * height / 1000)
    # At least one pixel, so that a thin box still masks something.
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    ImageDraw.Draw(mask).rectangle((left, top, right - 1, bottom - 1), fill=255)
    return mask


MAX_REGIONS = 16  # each one is a denoiser row per step: a bound on a call's cost


def check_regions(regions: Any) -> tuple[Region, ...]:
    """Regions as Region, {"box", "prompt", "strength"} dicts or (box, prompt, strength)
    tuples, checked: a box (check_box), a non-empty prompt, a strength in (0, 1]."""
    if not isinstance(regions, list | tuple) or len(regions) > MAX_REGIONS:
        raise DiffusionError(f"regions: a list of at most {MAX_REGIONS} regions, got {regions!r}")
    checked = []
    for region in regions:
        if isinstance(region, Region):
            box, prompt, strength = region.box, region.prompt, region.strength
        elif isinstance(region, dict) and {"box", "prompt"} <= set(region):
            box, prompt, strength = region["box"], region["prompt"], region.get("strength", 1.0)
        elif isinstance(region, list | tuple) and len(region) == 3:
            box, prompt, strength = region
        else:
            raise DiffusionError(f"a region is (box, prompt, strength), got {region!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DiffusionError(f"region {list(box)}: the local prompt is empty")
        if not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
            raise DiffusionError(f"region {list(box)}: strength {strength!r} is outside (0, 1]")
        checked.append(Region(tuple(check_box(box)), prompt, float(strength)))  # type: ignore[arg-type]
    return tuple(checked)


def _lora_list(
    lora: str | Path | Sequence[str | Path] | None, scale: float | Sequence[float]
) -> list[tuple[str | Path, float]]:
    """(LoRA, scale) pairs in the order they are fused: one LoRA and its scale, or a list of
    LoRAs with a list of scales (or one scale for all)."""
    if lora is None:
        return []
    loras = [lora] if isinstance(lora, str | Path) else list(lora)
    scales = [scale] * len(loras) if isinstance(scale, int | float) else list(scale)
    if len(scales) != len(loras):
        raise DiffusionError(f"diffusion.lora: {len(loras)} LoRAs but {len(scales)} scales")
    return [(path, float(s)) for path, s in zip(loras, scales, strict=True)]


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:500]


def detect_family(model_index: dict) -> str:
    """sd / sdxl / flux from a diffusers model_index.json's `_class_name`."""
    name = str(model_index.get("_class_name", ""))
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion") and not name.startswith("StableDiffusion3"):
        return "sd"  # SD 1.x / 2.x; SD3 is a transformer model with other pipelines
    raise DiffusionError(
        f"unsupported pipeline class {name or '(none)'!r}: expected SD, SDXL or FLUX"
    )


class DiffusionTool:
    """Runs one diffusers model for text-to-image, image-to-image and inpainting."""

    def __init__(
        self,
        model: str = "tiny-sd",
        store: ImageStore | None = None,
        family: str = "auto",
        device: str = "cpu",
        dtype: str = "float32",
        max_sequence_length: int | None = None,
        batch_window_ms: float = 0.0,
        max_batch: int = 16,
        inpaint_model: str | None = None,
        lora: str | Path | Sequence[str | Path] | None = None,
        lora_scale: float | Sequence[float] = 1.0,
    ) -> None:
        if store is None:
            raise TypeError("DiffusionTool needs an ImageStore (store=...)")
        if family != "auto" and family not in FAMILIES:
            raise DiffusionError(f"unknown family {family!r}: expected auto or one of {FAMILIES}")
        if dtype not in DTYPES:
            raise DiffusionError(f"unknown dtype {dtype!r}: expected one of {DTYPES}")
        self.model = model
        # Regional edits run this inpainting pipeline (a 9-channel UNet) when there is one:
        # configured, or the model's own companion (tiny-shapes-sd's, looked up on first use:
        # the tiny registry imports torch); else one derived from the text-to-image modules.
        self._inpaint_model = inpaint_model
        # LoRAs fused into the text-to-image model on load, in order (diffusion.lora: one path,
        # or a list with a scale each), and their files' sha256.
        self.lora, self.lora_scale = lora, lora_scale
        self._loras = _lora_list(lora, lora_scale)
        self._lora_files: list[tuple[Path, str]] | None = None
        self.store = store
        self.device = device
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        self._family = None if family == "auto" else family
        self._resolved: str | None = None
        self._pipe: Any = None  # the text-to-image pipeline; the others are made from it
        self._pipes: dict[str, Any] = {}
        # One generation at a time: the pipelines share one scheduler, which holds call state.
        self._lock = threading.RLock()
        self._batcher: Batcher | None = None
        self.set_batching(batch_window_ms, max_batch)

    def set_batching(self, window_ms: float, max_batch: int = 16) -> None:
        """Gather concurrent requests for `window_ms` into shared pipeline calls (0: off).
        The batcher it replaces is closed: what was queued on it still runs, then its thread
        ends."""
        old = self._batcher
        self._batcher = (
            Batcher(self._run_batch, window_ms / 1000, max_batch) if window_ms > 0 else None
        )
        if old is not None:
            old.close()

    def close(self) -> None:
        """Stop batching (and its worker thread); the tool still works, one call at a time."""
        self.set_batching(0)

    @property
    def batch_sizes(self) -> list[int]:
        """The sizes of the latest batched calls (empty without batching)."""
        return list(self._batcher.sizes) if self._batcher else []

    # ---- loading -------------------------------------------------------------------------

    def _resolve(self) -> str:
        if self._resolved is None:
            try:
                self._resolved = resolve_model(self.model)
            except Exception as e:
                raise DiffusionError(
                    f"cannot load diffusion model {self.model!r}: {_one_line(e)}"
                ) from e
        return self._resolved

    def _model_index(self) -> dict:
        resolved = self._resolve()
        try:
            if Path(resolved).is_dir():
                return json.loads((Path(resolved) / "model_index.json").read_text())
            from diffusers import DiffusionPipeline

            return DiffusionPipeline.load_config(resolved)  # model_index.json only
        except Exception as e:
            raise DiffusionError(
                f"cannot load diffusion model {self.model!r}: no readable model_index.json "
                f"({_one_line(e)})"
            ) from e

    @property
    def family(self) -> str:
        if self._family is None:
            self._family = detect_family(self._model_index())
        return self._family

    @property
    def inpaint_model(self) -> str | None:
        """The inpainting pipeline the regional edits run; None: derived from the model."""
        if self._inpaint_model is None:
            self._inpaint_model = paired_inpaint_model(self.model) or ""
        return self._inpaint_model or None

    @inpaint_model.setter
    def inpaint_model(self, name: str | None) -> None:
        self._inpaint_model = name or ""  # set to None: the derived pipeline, no companion

    @property
    def identity(self) -> dict:
        """What produced the images (for trajectories); needs no weights."""
        identity = {
            "model": self.model,
            "family": self.family,
            "resolved": self._resolve(),
            "dtype": self.dtype,
        }
        if self.inpaint_model:
            identity["inpaint_model"] = self.inpaint_model
        if self._loras:  # one LoRA: {path, sha256, scale}; several: a list of them, in order
            loras = [
                {"path": str(path), "sha256": digest, "scale": scale}
                for (path, digest), (_, scale) in zip(
                    self._lora_file_list(), self._loras, strict=True
                )
            ]
            identity["lora"] = loras[0] if len(loras) == 1 else loras
        return identity

    def _lora_name(self, i: int) -> str:
        """How an error names the i-th LoRA: as the config writes it."""
        return "diffusion.lora" if len(self._loras) == 1 else f"diffusion.lora[{i}]"

    def _lora_file_list(self) -> list[tuple[Path, str]]:
        """Each LoRA's file and its sha256 (read once)."""
        if self._lora_files is None:
            files = []
            for i, (lora, _) in enumerate(self._loras):
                try:
                    path = lora_path(lora)
                except LoraError as e:
                    raise DiffusionError(f"{self._lora_name(i)}: {e}") from None
                files.append((path, sha256(path)))
            self._lora_files = files
        return self._lora_files

    def _default_max_sequence_length(self) -> int | None:
        # Tiny models record their build config beside the weights (artloop.models.tiny).
        meta = Path(self._resolve()) / "artloop_tiny.json"
        if meta.is_file():
            return json.loads(meta.read_text()).get("config", {}).get("max_sequence_length")
        return None

    @property
    def pipeline(self) -> Any:
        """The loaded text-to-image pipeline (loaded on first use); trainers start from it."""
        self.setup()
        return self._pipe

    def setup(self) -> None:
        """Load the weights once; later calls do nothing."""
        with self._lock:
            if self._pipe is not None:
                return
            import torch
            from diffusers import AutoPipelineForText2Image

            resolved, family = self._resolve(), self.family
            loras = self._lora_file_list()  # a missing or pickled LoRA fails before any weights
            if self.max_sequence_length is None:
                self.max_sequence_length = self._default_max_sequence_length()
            try:
                pipe = AutoPipelineForText2Image.from_pretrained(
                    resolved,
                    dtype=getattr(torch, self.dtype),  # `torch_dtype` is deprecated
                    use_safetensors=True,  # never unpickle weights
                )
                pipe = pipe.to(self.device)
            except Exception as e:
                where = f"{self.model!r} ({family}, {resolved})"
                raise DiffusionError(f"cannot load diffusion model {where}: {_one_line(e)}") from e
            pipe.set_progress_bar_config(disable=True)
            # Fused one after another: the weights become base + each LoRA's delta at its scale
            # (what peft's weighted adapters sum to), and every derived pipeline draws with them.
            for i, ((path, _), (_, scale)) in enumerate(zip(loras, self._loras, strict=True)):
                try:
                    fuse_lora(pipe, path, scale)
                except LoraError as e:
                    raise DiffusionError(f"{self._lora_name(i)}: {e}") from None
            self._pipe = pipe
            self._pipes = {"t2i": pipe}

    def unload(self) -> None:
        """Drop the loaded pipelines (the next call loads them again): frees their memory."""
        with self._lock:
            self._pipe, self._pipes = None, {}

    def _pipeline(self, task: str) -> Any:
        self.setup()
        with self._lock:
            return self._pipes.get(task) or self._derive(task)

    def _derive(self, task: str) -> Any:
        import torch
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        auto = {"i2i": AutoPipelineForImage2Image, "inpaint": AutoPipelineForInpainting}[task]
        try:
            if task == "inpaint" and self.inpaint_model:
                pipe = auto.from_pretrained(
                    resolve_model(self.inpaint_model),
                    dtype=getattr(torch, self.dtype),
                    use_safetensors=True,
                ).to(self.device)
            else:
                pipe = auto.from_pipe(self._pipe)  # shares the loaded modules: no new weights
        except Exception as e:
            name = self.inpaint_model if task == "inpaint" and self.inpaint_model else self.model
            raise DiffusionError(f"model {name!r} has no {task} pipeline: {_one_line(e)}") from e
        pipe.set_progress_bar_config(disable=True)
        self._pipes[task] = pipe
        return pipe

    # ---- inputs --------------------------------------------------------------------------

    def _size(self, params: GenParams) -> tuple[int, int]:
        multiple = SIZE_MULTIPLE[self.family]
        sides = []
        for name, value in (("width", params.width), ("height", params.height)):
            if not isinstance(value, int | float) or not MIN_SIDE <= value <= MAX_SIDE:
                raise DiffusionError(f"{name} {value!r} is outside {MIN_SIDE}-{MAX_SIDE} pixels")
            sides.append(int(value / multiple + 0.5) * multiple)  # nearest, halves up
        return sides[0], sides[1]

    def _check_params(self, params: GenParams, strength: float | None = None) -> None:
        steps = params.num_inference_steps
        if not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise DiffusionError(f"num_inference_steps {steps!r} is outside 1-1000")
        if strength is not None:
            if not 0.0 < strength <= 1.0:
                raise DiffusionError(f"strength {strength!r} is outside (0, 1]")
            # The pipelines run int(steps * strength) steps and fail on zero.
            if int(steps * strength) < 1:
                raise DiffusionError(
                    f"strength {strength} x {steps} steps leaves no denoising step: "
                    f"raise strength or num_inference_steps"
                )

    def _image(self, digest: str, size: tuple[int, int]) -> Image.Image:
        try:
            image = self.store.get(digest)
        except ImageStoreError as e:
            raise DiffusionError(f"input image {str(digest)[:16]!r}: {e}") from e
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    # ---- generation ----------------------------------------------------------------------

    @dataclass(frozen=True)
    class _Sample:
        """One image to make: what differs between the images of a batched call."""

        prompt: str
        negative_prompt: str | None
        seed: int
        inputs: tuple[tuple[str, Any], ...] = ()  # per-image pipeline inputs (image, mask_image)
        on_step: Callable[[int, int], None] | None = field(default=None, compare=False)

    def _run(
        self,
        task: str,
        prompt: str,
        negative_prompt: str,
        params: GenParams,
        inputs: dict[str, Any] | None = None,
        **shared: Any,
    ) -> Image.Image:
        """One image; with batching on, it shares a pipeline call with concurrent requests that
        agree on everything but prompts, seeds and input images (same seeds: same images)."""
        self.setup()  # first: loading settles max_sequence_length (a tiny model's own)
        sample = self._Sample(
            prompt,
            negative_prompt or None,
            int(params.seed),
            tuple((inputs or {}).items()),
            on_step.get(),
        )
        common = {
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "true_cfg_scale": params.true_cfg_scale,
            "max_sequence_length": self.max_sequence_length,
            **shared,
        }
        with timed("diffusion"):
            batcher = self._batcher  # once: set_batching may replace it meanwhile
            if batcher is None:
                return self._checked(task, self._run_many(task, common, [sample])[0])
            # Negative prompts must be all given or all absent in one call (SDXL treats an
            # absent one as zeros): part of the key.
            key = (task, sample.negative_prompt is None, json.dumps(common, sort_keys=True))
            out = batcher.submit(key, (task, common, sample))
            return self._checked(task, out)

    def _run_batch(self, jobs: list) -> list[Any]:
        task, common, _ = jobs[0].payload
        return self._run_many(task, common, [job.payload[2] for job in jobs])

    def _run_many(self, task: str, common: dict[str, Any], samples: list[_Sample]) -> list:
        """One pipeline call for `samples` (per-image generators): an (H, W, 3) array each."""
        import torch

        if task == "regional":  # the text-to-image pipeline's modules, our own loop
            return self._run_regional(common, samples)
        pipe = self._pipeline(task)
        negatives = [s.negative_prompt for s in samples]
        kwargs: dict[str, Any] = {
            "prompt": [s.prompt for s in samples],
            "negative_prompt": None if negatives[0] is None else negatives,
            "generator": [torch.Generator(self.device).manual_seed(s.seed) for s in samples],
            "output_type": "np",
            **common,
        }
        for name in dict(samples[0].inputs):
            kwargs[name] = [dict(s.inputs)[name] for s in samples]
        if hooks := [s.on_step for s in samples if s.on_step is not None]:

            def step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
                for hook in hooks:
                    hook(step + 1, pipe.num_timesteps)
                return tensors

            kwargs["callback_on_step_end"] = step_end
        # Families differ (FLUX: true_cfg_scale, max_sequence_length; SD img2img: no size):
        # pass what this pipeline names; unset options keep the pipeline's defaults.
        accepted = inspect.signature(pipe.__call__).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted and v is not None}
        return self._locked(task, len(samples), lambda: list(pipe(**kwargs).images))

    def _run_regional(self, common: dict[str, Any], samples: list[_Sample]) -> list:
        """One regional call for `samples` (they have as many regions each: the batch key)."""
        pipe = self._pipeline("t2i")
        jobs = [
            Job(s.prompt, s.negative_prompt, s.seed, **{"init": None, **dict(s.inputs)})
            for s in samples
        ]
        hooks = [s.on_step for s in samples if s.on_step is not None]

        def step(i: int, n: int) -> None:
            for hook in hooks:
                hook(i, n)

        options = {k: v for k, v in common.items() if k != "regions"}
        return self._locked(
            "regional",
            len(samples),
            lambda: generate(pipe, self.family, jobs, on_step=step if hooks else None, **options),
        )

    def _locked(self, task: str, images: int, call: Callable[[], list]) -> list:
        """`call` under the tool's lock (its wait charged), errors as one-line DiffusionErrors."""
        import torch

        waited = time.perf_counter()
        with self._lock:
            charge("diffusion_wait", time.perf_counter() - waited)
            try:
                return call()
            except (torch.OutOfMemoryError, MemoryError) as e:
                raise DiffusionError(
                    f"{task} with {self.model!r} ran out of memory on {images} image(s) "
                    f"({_one_line(e)}): lower the size or diffusion.max_batch"
                ) from e
            except Exception as e:
                raise DiffusionError(f"{task} with {self.model!r} failed: {_one_line(e)}") from e

    def _checked(self, task: str, out: Any) -> Image.Image:
        arr = np.asarray(out, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise DiffusionError(
                f"{task} with {self.model!r} produced NaN/inf pixels (fp16 overflow? try float32)"
            )
        if arr.max() <= 1.0 / 255:
            raise DiffusionError(
                f"{task} with {self.model!r} produced an all-black image (NaNs or a safety checker)"
            )
        return Image.fromarray((arr.clip(0, 1) * 255).round().astype(np.uint8))

    def text_to_image(self, prompt: str, negative_prompt: str, params: GenParams) -> str:
        """Generate from text; returns the stored image's hash."""
        self._check_params(params)
        width, height = self._size(params)
        image = self._run("t2i", prompt, negative_prompt, params, width=width, height=height)
        return self.store.put(image)

    def image_to_image(
        self, image: str, prompt: str, negative_prompt: str, params: GenParams, strength: float
    ) -> str:
        """Re-generate a stored image (resized to the params' size); strength 1 ignores it."""
        self._check_params(params, strength)
        width, height = self._size(params)
        init = self._image(image, (width, height))
        result = self._run(
            "i2i",
            prompt,
            negative_prompt,
            params,
            {"image": init},
            strength=strength,
            width=width,
            height=height,
        )
        return self.store.put(result)

    def inpaint(
        self,
        image: str,
        box: tuple[int, int, int, int],
        prompt: str,
        negative_prompt: str,
        params: GenParams,
        strength: float,
    ) -> str:
        """Repaint the box (0-1000 normalised) of a stored image; pixels away from it are kept."""
        check_box(box)
        self._check_params(params, strength)
        width, height = self._size(params)
        init = self._image(image, (width, height))
        mask = box_mask(box, width, height)
        result = self._run(
            "inpaint",
            prompt,
            negative_prompt,
            params,
            {"image": init, "mask_image": mask},
            strength=strength,
            width=width,
            height=height,
        )
        return self.store.put(_keep_outside(result, init, mask))

    def regional(
        self,
        image: str | None,
        prompt: str,
        negative_prompt: str,
        regions: Any,
        params: GenParams,
        strength: float = 1.0,
        technique: str | None = None,
    ) -> str:
        """Draw `prompt` everywhere and each region's local prompt in its box (0-1000), all in
        one denoiser pass per step (tools/regional.py). `regions`: (box, prompt, strength)
        tuples, dicts or Regions; a region's strength is its local prompt's weight in the box.
        From text (image None; `strength` unused), or from a stored image: its boxes redrawn
        from `strength`'s noise level (each at most its own strength), the rest kept.
        `technique`: "attention" or "blend" (None: the family's default, regional.TECHNIQUE).
        Returns the stored image's hash."""
        checked = check_regions(regions)
        if image is not None and not checked:
            raise DiffusionError("a regional edit of an image needs at least one region")
        if technique is not None and technique not in TECHNIQUES:
            raise DiffusionError(f"regional technique {technique!r} is not one of {TECHNIQUES}")
        self._check_params(params, None if image is None else strength)
        width, height = self._size(params)
        init = None if image is None else self._image(image, (width, height))
        # What the images of one batched call share: a region count too (one layout).
        shared = {"width": width, "height": height, "regions": len(checked)}
        shared["strength"] = None if image is None else strength
        shared["technique"] = technique
        inputs = {"init": init, "regions": checked}
        result = self._run("regional", prompt, negative_prompt, params, inputs, **shared)
        if init is None:
            return self.store.put(result)
        mask = Image.new("L", (width, height), 0)
        for region in checked:
            mask.paste(255, mask=box_mask(region.box, width, height))
        return self.store.put(_keep_outside(result, init, mask))


def _keep_outside(result: Image.Image, init: Image.Image, mask: Image.Image) -> Image.Image:
    """`result` inside the mask, `init` outside it. The VAE round trip alters every pixel a
    little (and all of them with a non-inpainting UNet): the original is pasted back outside
    the boxes, with a soft edge against seams."""
    width, height = init.size
    feather = mask.filter(ImageFilter.GaussianBlur(radius=max(1, min(width, height) // 128)))
    return Image.composite(result, init, feather)
