"""One typed config for models, the loop and paths.

Sources, lowest to highest priority: defaults < a TOML file (`--config`) < environment variables
(`ARTLOOP_HOME`, `ARTLOOP_CHAT__MODEL`, `ARTLOOP_LOOP__MAX_ITERS`, ...) < CLI flags.
With nothing configured everything runs on the tiny offline models.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from jinja2 import Environment, TemplateSyntaxError
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    SecretStr,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MAX_PROMPT_CHARS = 2000

# --- secrets: never stored, printed or exported --------------------------------------------------
MASK = "***"
# A name holds a credential when one of its words is one of these: api_key, HF_TOKEN, apiKey,
# X-Api-Key, db-password (not max_new_tokens: whole words only).
SECRET_WORDS = frozenset(
    {
        "key",
        "apikey",
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "cookie",
        "bearer",
        "signature",
    }
)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_MIN_SECRET_CHARS = 4  # a shorter value is not hunted for inside other strings (it would be noise)


def secret_name(name: str) -> bool:
    """Whether a field, argument, header or variable name looks like it holds a credential."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    return any(w in SECRET_WORDS for w in re.split(r"[^a-z0-9]+", words))


def _secret_flag(item: Any) -> tuple[bool, str | None]:
    """Whether a list item is a secret-looking flag (`--hf-token`), and its inline value
    (`--api-key=X`), if any."""
    if not (isinstance(item, str) and item.startswith("-")):
        return False, None
    flag, eq, value = item.partition("=")
    return secret_name(flag), (value if eq else None)


def mask_secrets(data: Any, secrets: Iterable[str] = ()) -> Any:
    """JSON-able `data` made safe to store or show, the one function everything persisted or
    printed goes through: the value under any secret-looking name (at any depth), the argument
    after a secret-looking flag (`--hf-token X`, `--api-key=X`), URL user info
    (`http://***@host`) and every occurrence of each of `secrets` inside any string become ***."""
    wanted = {s for s in secrets if s and len(s) >= _MIN_SECRET_CHARS}
    hunted = sorted(wanted, key=len, reverse=True)  # the longest first: none masks part of one

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: MASK if secret_name(str(k)) and v not in (None, "") else walk(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            out, hide_next = [], False
            for item in value:
                secret_flag, inline = _secret_flag(item)
                if secret_flag:
                    out.append(item if inline is None else item.split("=")[0] + "=" + MASK)
                else:
                    out.append(MASK if hide_next else walk(item))
                hide_next = secret_flag and inline is None
            return out
        if isinstance(value, str):
            value = _URL_USERINFO.sub(MASK + "@", value)
            for secret in hunted:
                value = value.replace(secret, MASK)
        return value

    return walk(data)


def secret_values(data: Any) -> set[str]:
    """The strings `mask_secrets` hides by name, flag or URL password in `data` (SecretStr
    values revealed): what to hunt for by value wherever else they appear."""
    found: set[str] = set()

    def add(value: Any) -> None:  # everything under a secret name
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, dict | list | tuple):
            for v in value.values() if isinstance(value, dict) else value:
                add(v)

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, dict):
            for k, v in value.items():
                add(v) if secret_name(str(k)) else walk(v)
        elif isinstance(value, list | tuple):
            hide_next = False
            for item in value:
                secret_flag, inline = _secret_flag(item)
                add(inline) if secret_flag else (add(item) if hide_next else walk(item))
                hide_next = secret_flag and inline is None
        elif isinstance(value, str) and "://" in value:
            try:
                password = urlsplit(value).password
            except ValueError:  # not a URL after all
                password = None
            if password:
                found.add(password)

    walk(data)
    return found


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatConfig(_Section):
    backend: Literal["inprocess", "openai", "scripted", "custom"] = Field(
        "inprocess",
        description="inprocess: Qwen2-VL under transformers; openai: an "
        "OpenAI-compatible server such as vLLM; scripted: fixed answers per schema "
        "(custom_kwargs.scripts; for tests, demos and studies); custom: any langchain "
        "chat model class",
    )
    model: str = Field(
        "tiny-shapes-qwen2vl",
        description="Model id/path (inprocess) or served name; tiny-shapes-qwen2vl is trained "
        "to be the agents in the shapes world",
    )
    family: Literal["auto", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"] = Field(
        "auto",
        description="The model's family: its box convention (0-1000, or pixels of the resized "
        "input for qwen2.5-vl), image limits and template quirks; auto: from the model's "
        "config.json or its id (models/families.py)",
    )
    base_url: str | None = Field(None, description="Server URL for the openai backend, .../v1")
    api_key: SecretStr = Field(SecretStr("EMPTY"), description="API key; never stored")
    custom_class: str | None = Field(None, description="'package.module:ClassName' (custom)")
    custom_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        repr=False,
        description="kwargs (custom, scripted: {scripts = {...}}); masked when stored",
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_new_tokens: int = Field(1024, ge=16, le=16384)
    timeout_s: float = Field(120.0, gt=0, description="Per request, for servers")
    max_retries: int = Field(
        3, ge=0, le=20, description="Retries after a connection error, a 5xx or a timeout"
    )
    retry_backoff_s: float = Field(1.0, ge=0.0, le=60.0, description="First retry wait; doubles")
    structured_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="Calls per agent step when the answer is invalid (repair + retry)",
    )
    image_max_side: int = Field(768, ge=64, le=4096, description="Images sent are resized")
    image_format: Literal["png", "jpeg"] = Field("png", description="How images are sent")
    max_concurrent_calls: int = Field(
        16,
        ge=1,
        le=1024,
        description="Agent calls in flight at "
        "once from concurrent sessions (a server batches them; "
        "the in-process model runs up to this many as one batch)",
    )
    batch_window_ms: float = Field(
        0.0,
        ge=0.0,
        le=10_000.0,
        description="In-process model: "
        "gather calls from concurrent sessions this long into one "
        "generate (calls already waiting are always batched)",
    )
    prefix_cache_tokens: int = Field(
        32768,
        ge=0,
        le=10_000_000,
        description="In-process model: prompt tokens of KV cache kept "
        "(the last 8 prompts at most) so that a prompt sharing a prefix with one prefills "
        "only the rest (0: off)",
    )
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DiffusionLora(_Section):
    """A LoRA applied to the diffusion model (tools/diffusion.py fuses it in on load)."""

    path: Path = Field(
        description="The LoRA: a .safetensors file, or the directory `artloop train` wrote "
        "(its pytorch_lora_weights.safetensors); safetensors only"
    )
    scale: float = Field(
        1.0,
        ge=-10.0,
        le=10.0,
        allow_inf_nan=False,
        description="Its strength: 1 is the trained strength (alpha / rank), 0 the base model",
    )

    @field_validator("path")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class DiffusionLoras(RootModel[list[DiffusionLora]]):
    """Two or more LoRAs on the diffusion model, fused into its weights in this order (one LoRA
    is a DiffusionLora). `path` and `scale` are the lists of each, in order, as DiffusionTool
    takes them (`lora=`, `lora_scale=`)."""

    root: list[DiffusionLora] = Field(min_length=2, max_length=16)

    def __iter__(self):  # type: ignore[override]  # the LoRAs, not the model's fields
        return iter(self.root)

    def __len__(self) -> int:
        return len(self.root)

    @property
    def path(self) -> list[Path]:
        return [lora.path for lora in self.root]

    @property
    def scale(self) -> list[float]:
        return [lora.scale for lora in self.root]


def lora_entries(lora: DiffusionLora | DiffusionLoras | None) -> list[DiffusionLora]:
    """diffusion.lora as a list of LoRAs, in the order they are applied (none: empty)."""
    if lora is None:
        return []
    return list(lora) if isinstance(lora, DiffusionLoras) else [lora]


def _lora_forms(value: Any) -> Any:
    """A path alone is a LoRA at its trained strength; a list of one is that LoRA."""
    if isinstance(value, str | Path):
        return {"path": value}
    if isinstance(value, list | tuple):
        value = [{"path": v} if isinstance(v, str | Path) else v for v in value]
        return value[0] if len(value) == 1 else value
    return value


def _lora_kind(value: Any) -> str:
    return "many" if isinstance(value, list | tuple | DiffusionLoras) else "one"


def _untagged(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Errors located as the file writes the field (diffusion.lora.scale, diffusion.lora.1.path),
    without the union's tag. An empty list is no LoRA."""
    if isinstance(value, list | tuple) and not value:
        return None
    try:
        return handler(_lora_forms(value))
    except ValidationError as e:
        errors = []
        for err in e.errors():  # loc[0] is the tag
            line = {"type": err["type"], "loc": err["loc"][1:], "input": err["input"]}
            if "ctx" in err:
                line["ctx"] = err["ctx"]
            errors.append(line)
        raise ValidationError.from_exception_data(e.title, errors) from None  # type: ignore[arg-type]


# diffusion.lora: one LoRA ("dir", {path, scale}) or several in order ([{path, scale}, ...]).
LoraSetting = Annotated[
    Annotated[DiffusionLora, Tag("one")] | Annotated[DiffusionLoras, Tag("many")],
    Discriminator(_lora_kind),
    WrapValidator(_untagged),
]


# A tiny model trained at one size draws at it, with its own steps, unless the config says
# otherwise (the published pipelines' sizes are the user's to set).
NATIVE_IMAGE_SETTINGS = {"tiny-shapes-sd": {"width": 64, "height": 64, "steps": 20}}
# The shapes world's loop, unless the config says otherwise: its exact judge watches each
# iteration (for the report; no agent sees it); edits carry over (a fresh image each iteration
# repeats the same repaint: the loop's ceiling is +0.13 instead of +0.29); no enhancer (the
# model draws only the world's captions, so the best enhancement is none: the caption is drawn
# as it is, then each plan's prompts).
WORLD_LOOP_SETTINGS = {
    "tiny-shapes-sd": {"watch_scorers": ["shapes"], "carry_edits": True, "enhancer": False}
}


class DiffusionConfig(_Section):
    model: str = Field(
        "tiny-shapes-sd",
        description="tiny-shapes-sd (trained on the shapes world: 64 px, 20 steps unless set), "
        "tiny-sd, tiny-flux, a hub id or a local path",
    )
    lora: LoraSetting | None = Field(
        None,
        description='A LoRA on the model, e.g. {path = "loras/sft", scale = 1.0} or just the '
        'path, or several fused in order: [{path = "r1", scale = 1.0}, {path = "r2", scale = '
        "0.8}]: what `artloop train` made, drawn in the loop (text-to-image and the pipelines "
        "derived from it; a separate inpaint_model does not get them). Each one's sha256 and "
        "scale are in the model identity stored with each run",
    )
    family: Literal["auto", "sd", "sdxl", "flux"] = "auto"
    inpaint_model: str | None = Field(
        None,
        description="An inpainting pipeline for the regional edits (e.g. stable-diffusion-v1-5/"
        "stable-diffusion-inpainting); none: the model's own companion where it has one "
        "(tiny-shapes-sd's), else derived from the model",
    )
    width: int = Field(256, ge=64, le=2048)
    height: int = Field(256, ge=64, le=2048)
    steps: int = Field(4, ge=1, le=200)
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    seed: int = Field(0, ge=0, lt=2**63)
    edit_strength: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="img2img strength when the plan asks for a global edit without saying how much",
    )
    batch_window_ms: float = Field(
        0.0,
        ge=0.0,
        le=10_000.0,
        description="Gather diffusion "
        "requests from concurrent sessions this long and run those "
        "that agree in shape as one batch; 0: no batching",
    )
    max_batch: int = Field(16, ge=1, le=1024, description="Images per batched pipeline call")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="before")
    @classmethod
    def _native_settings(cls, data: Any) -> Any:
        """The model's own width, height and steps where the config leaves them out."""
        if not isinstance(data, dict):
            return data
        model = data.get("model", cls.model_fields["model"].default)
        return {**NATIVE_IMAGE_SETTINGS.get(model, {}), **data}


# The loop's parts a variant switches (docs/architecture.md, "Variants"): the critics in the order
# they run (or "merged": one call answers for all three), and the edit modes the edit node applies.
Critic = Literal["data_cot", "concept_cot", "thesis_cot"]
CRITICS: tuple[str, ...] = get_args(Critic)
EditMode = Literal["img2img", "inpaint", "regional", "tone"]
ALL_EDIT_MODES: tuple[str, ...] = get_args(EditMode)
# The default modes, and the plan parts' modes the planner is told of (agents/thesis_cot.py):
# regional applies the same part as inpaint (the box edits), in one regional-prompting pass.
EDIT_MODES: tuple[str, ...] = ("img2img", "inpaint", "tone")


def _distinct_in_order(value: Any, known: tuple[str, ...], what: str, also: str = "") -> Any:
    """A list of names from `known` without repeats, put in `known`'s order; anything else is
    left to the field's type to refuse."""
    if not isinstance(value, list | tuple):
        return value
    for name in value:
        if name not in known:
            raise PydanticCustomError(
                "unknown_name",
                "'{name}' is not {what} (one of {known}{also})",
                {"name": str(name), "what": what, "known": ", ".join(known), "also": also},
            )
        if list(value).count(name) > 1:
            raise PydanticCustomError("repeated_name", "'{name}' is listed twice", {"name": name})
    return [name for name in known if name in value]


class LoopConfig(_Section):
    max_iters: int = Field(3, ge=1, le=50, description="Iterations before giving up")
    accept_score: float = Field(7.0, ge=0.0, le=10.0, description="Validator score to accept")
    plateau_patience: int = Field(
        2, ge=1, le=50, description="Stop after this many iterations without a better score"
    )
    plateau_min_delta: float = Field(0.25, ge=0.0, le=10.0, description="What counts as better")
    max_vlm_tokens: int | None = Field(
        None,
        ge=1,
        description="A token budget: stop the session (status budget, the best image so far "
        "kept) after the iteration whose VLM calls bring its prompt + completion tokens to this "
        "many or more; None: no limit",
    )
    max_seconds: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="A time budget: stop the session (status budget, the best image so far "
        "kept) after the iteration that brings its running time (its nodes' seconds, not time "
        "paused for a person) to this many or more; None: no limit",
    )
    judge: str = Field(
        "vlm",
        description="Who validates: vlm (the validator agent) or a "
        "reward with a declared range, e.g. darkness: score = that reward "
        "mapped onto 0-10 (checked by graphs/context.check_judge)",
    )
    fact_scorers: list[str] = Field(
        default_factory=list,
        description="Rewards whose scores of each image go to Data-CoT as measured facts beside "
        "the image statistics, and into the step record (e.g. aesthetic, pickscore; "
        "checked by graphs/context.check_judge)",
    )
    carry_edits: bool = Field(
        False,
        description="Each iteration after the first edits the best image so far instead of "
        "drawing a fresh one, its edits drawn with seed + iteration: edits accumulate "
        "(ArtAug's rounds); off: every iteration starts from text-to-image with the same seed",
    )
    watch_scorers: list[str] = Field(
        default_factory=list,
        description="Rewards that score each iteration's image and edit against the prompt for "
        "the step record and the report only: no agent sees them (e.g. shapes, the shapes "
        "world's exact judge)",
    )
    # --- the variant: which agents run, how images are edited and chosen, what is remembered ---
    enhancer: bool = Field(
        True,
        description="Run the prompt enhancer each iteration; off: the user's prompt is drawn "
        "first, then each plan's revised and negative prompts (the compose node)",
    )
    critics: list[Critic] | Literal["merged"] = Field(
        default_factory=lambda: list(CRITICS),
        description="Which of data_cot, concept_cot, thesis_cot run (in that order; a critic "
        "left out is not a node, and the next one works without its output), or merged: one "
        "critic call answers facts -> critique -> plan, the image sent once. Without "
        "thesis_cot there is no plan: set edit_modes = [] (each iteration is then drawn and "
        "judged; with no enhancer either, it re-rolls the seed)",
    )
    edit_modes: list[EditMode] = Field(
        default_factory=lambda: list(EDIT_MODES),
        description="The plan's edits the edit node applies: img2img (a global pass), inpaint "
        "(its box edits, one inpainting pass each) or regional (its box edits and the earlier "
        "iterations' still standing, in one regional-prompting pass: tools/regional.py), tone "
        "(exposure, contrast, saturation); [] = no edit node: the validator judges the "
        "generated image alone (the rater, or a reward's score)",
    )
    best_of: int = Field(
        1,
        ge=1,
        le=16,
        description="Text-to-image candidates per iteration, seeds seed, seed+1, ...; the "
        "best_of_judge keeps the best (the pick node); all are recorded in the step",
    )
    best_of_judge: str = Field(
        "vlm",
        min_length=1,
        description="Who picks among best_of candidates: vlm (the rater agent's 0-10 score) or "
        "a reward name, e.g. aesthetic or composite:mine (checked by graphs/context.check_judge)",
    )
    memory: Literal["last", "history"] = Field(
        "last",
        description="What the enhancer sees of earlier iterations: last (the last plan's prompt "
        "and the last verdict's reasons) or history (every earlier attempt: its prompt, score, "
        "verdict and reasons, oldest first)",
    )

    @field_validator("critics", mode="before")
    @classmethod
    def _critics_named(cls, value: Any) -> Any:
        if value == "merged" or (isinstance(value, list | tuple) and list(value) == ["merged"]):
            return "merged"
        if isinstance(value, list | tuple) and "merged" in value:
            raise PydanticCustomError(
                "merged_alone",
                "merged replaces data_cot, concept_cot and thesis_cot: give it alone",
            )
        if isinstance(value, str):
            raise PydanticCustomError(
                "critics", "'{value}' is not a list of critics or merged", {"value": value}
            )
        value = _distinct_in_order(value, CRITICS, "a critic", "; or merged, alone")
        if "thesis_cot" not in value and (unread := [c for c in value if c in CRITICS]):
            raise PydanticCustomError(
                "critic_unread",
                "{names} without thesis_cot: nothing would read its output (thesis_cot makes "
                "the plan; [] runs no critic)",
                {"names": " and ".join(unread)},
            )
        return value

    @field_validator("edit_modes", mode="before")
    @classmethod
    def _edit_modes_named(cls, value: Any) -> Any:
        value = _distinct_in_order(value, ALL_EDIT_MODES, "an edit mode")
        if isinstance(value, list) and {"inpaint", "regional"} <= set(value):
            raise PydanticCustomError(
                "box_edits_twice",
                "inpaint and regional both apply the plan's box edits: list one of them",
            )
        return value

    @model_validator(mode="after")
    def _parts_fit(self) -> LoopConfig:
        if self.edit_modes and not self.plans:
            raise PydanticCustomError(
                "edits_without_plan",
                "edit_modes {modes} apply a plan, and without thesis_cot there is none: set "
                "edit_modes = [] or add thesis_cot to critics",
                {"modes": ", ".join(self.edit_modes)},
            )
        if self.carry_edits and not self.edit_modes:
            raise PydanticCustomError(
                "carry_without_edits",
                "carry_edits: with edit_modes = [] there are no edits to carry",
            )
        if self.memory == "history" and not self.enhancer:
            raise PydanticCustomError(
                "memory_unread",
                "memory = history is what the enhancer reads, and enhancer = false",
            )
        return self

    @property
    def plans(self) -> bool:
        """Whether an iteration makes an edit plan (thesis_cot, alone or merged)."""
        return self.critics == "merged" or "thesis_cot" in self.critics

    @property
    def rerolls(self) -> bool:
        """Whether nothing can change the prompt between iterations (no enhancer, no plan): each
        iteration then draws new seeds instead of the same image again."""
        return not self.enhancer and not self.plans


class ServeConfig(_Section):
    """`artloop serve vlm`: a vLLM server for Qwen2-VL (vLLM lives in its own environment)."""

    model: str = Field(
        "Qwen/Qwen2-VL-7B-Instruct", description="Model id or path (or tiny-qwen2vl)"
    )
    served_model_name: str | None = Field(None, description="Name clients use; default: model")
    host: str = Field("127.0.0.1", description="Bind address; loopback unless told otherwise")
    port: int = Field(8000, ge=1, le=65535)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(8192, ge=256, le=1_048_576)
    max_images_per_prompt: int = Field(
        2,
        ge=0,
        le=16,
        description="--limit-mm-per-prompt image; the validator sends 2 (BEFORE, then AFTER)",
    )
    max_image_pixels: int | None = Field(
        None, ge=3136, description="Cap image tokens (mm_processor_kwargs max_pixels)"
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    structured_outputs_backend: Literal["auto", "guidance", "xgrammar", "outlines"] = Field(
        "guidance", description="guidance: xgrammar lets control characters into bounded strings"
    )
    compact_json: bool = Field(
        True,
        description="No whitespace between JSON tokens: a model "
        "(a random one surely) can otherwise emit it without end",
    )
    enforce_eager: bool = Field(False, description="No CUDA graphs / compilation (needed on CPU)")
    api_key: SecretStr | None = Field(
        None,
        description="Clients must send it; required for "
        "a non-loopback host (env ARTLOOP_SERVE__API_KEY)",
    )
    vllm: str = Field("vllm", description="The vllm executable: a path, or a name on PATH")
    extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` flags")
    env: dict[str, str] = Field(
        default_factory=dict,
        repr=False,
        description="Extra environment variables; masked when stored",
    )
    startup_timeout_s: float = Field(900.0, gt=0, description="Wait this long for /health")


_PLUGIN = re.compile(
    r"^(?:[\w-]+=)?[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$"
)


class ScorersConfig(_Section):
    """The scorers (rewards that load a model: CLIP score, aesthetic, PickScore, ...): where they
    run, which weights they load, the composite presets and the third-party scorers. Read by
    artloop.rewards.registry (`scorer_device`, `scorer_model`); resolved there, not here."""

    device: str = Field(
        "auto", description="auto: cuda if available, else cpu; or a torch device (cuda:1)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(16, ge=1, le=4096, description="Images per scorer forward pass")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Scorer name -> weights (a hub id, a local directory or a tiny-* name) in "
        'place of its default, e.g. {clip = "openai/clip-vit-base-patch32"}',
    )
    composites: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Named weight presets for composite:<name>, e.g. "
        "{mine = {clip = 0.7, aesthetic = 0.3}} (each part range-normalised)",
    )
    plugins: list[str] = Field(
        default_factory=list,
        description="Third-party scorers, 'package.module:function' (registered under the "
        "function's name) or 'name=package.module:function'; imported at first lookup",
    )
    canaries: Literal["once", "agreement", "off"] | int | None = Field(
        None,
        description="When the VLM judges (the vlm and synartifact rewards, the loop's "
        "validator) are shown their canaries, control images whose answer is known: once (on "
        "the first call, the outcome cached), agreement (once a judge gives one answer for "
        "different images), N (the first call and every N calls after) or off (never: the "
        "judge is trusted unchecked, e.g. a random tiny VLM); unset: once for the rewards, "
        "agreement for the validator (rewards/vlm.py)",
    )

    @field_validator("canaries", mode="before")
    @classmethod
    def _canary_schedule(cls, value: Any) -> Any:
        # The schedules rewards/vlm.py's Canaries accepts (config.py may not import it).
        if value is None or value in ("once", "agreement", "off"):
            return value
        if isinstance(value, str) and value.strip().isdigit():  # from the environment
            value = int(value)
        if type(value) is int and value >= 1:
            return value
        raise PydanticCustomError(
            "canary_schedule",
            "'{value}' is not once, agreement, off or a number of calls N >= 1",
            {"value": str(value)},
        )

    @field_validator("plugins")
    @classmethod
    def _plugins_named(cls, value: list[str]) -> list[str]:
        for spec in value:
            if not _PLUGIN.match(spec):
                raise PydanticCustomError(
                    "plugin_spec",
                    "'{spec}' is not 'package.module:function' (or 'name=package.module:function')",
                    {"spec": spec},
                )
        return value


# The templates in prompts/ (tests/test_agents.py checks this list against the files: config.py
# may not import prompts/, the same layer).
TEMPLATES = (
    "system",
    "enhance",
    "data_cot",
    "concept_cot",
    "thesis_cot",
    "validate",
    "rate",
    "artifacts",
    "vqa_questions",
    "vqa_answer",
    "critic",
)


class AgentsConfig(_Section):
    """The agents' prompts: a template file in place of a packaged one, per agent."""

    templates: dict[str, Path] = Field(
        default_factory=dict,
        description="Agent name -> a Jinja file that replaces prompts/<name>.jinja (StrictUndefined: "
        'it may use only the variables the agent passes), e.g. {data_cot = "my/data_cot.jinja"}; '
        '"system" replaces the system message all agents share',
    )

    @field_validator("templates")
    @classmethod
    def _templates_exist(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name, path in value.items():
            if name not in TEMPLATES:
                raise PydanticCustomError(
                    "template_name",
                    "unknown agent '{name}' (one of {known})",
                    {"name": name, "known": ", ".join(TEMPLATES)},
                )
            path = path.expanduser()
            try:
                Environment().parse(path.read_text(encoding="utf-8"))
            except OSError as e:
                raise PydanticCustomError(
                    "template_file",
                    "{name}: cannot read {path}: {why}",
                    {"name": name, "path": str(path), "why": e.strerror or str(e)},
                ) from None
            except TemplateSyntaxError as e:
                raise PydanticCustomError(
                    "template_syntax",
                    "{name}: {path} line {line}: {why}",
                    {"name": name, "path": str(path), "line": e.lineno, "why": e.message},
                ) from None
        return {name: path.expanduser() for name, path in value.items()}


Tracker = Literal["none", "mlflow", "tensorboard", "wandb"]  # runtime/tracking.py writes to each
TRACKERS: tuple[str, ...] = get_args(Tracker)


class TrackingConfig(_Section):
    """Where a finished session's metrics and final image are logged (runtime/tracking.py):
    nowhere unless `backend` names a tracker."""

    backend: Tracker = Field(
        "none",
        description="none (default) | mlflow (a local file store, HOME/mlruns, unless `uri` "
        "names another) | tensorboard (event files under HOME/tensorboard) | wandb (W&B; "
        "WANDB_MODE=offline writes HOME/wandb only)",
    )
    uri: str | None = Field(
        None,
        description="mlflow: a tracking URI (file:DIR, http://server); "
        "tensorboard, wandb: a directory. Unset: under the home",
    )
    experiment: str = Field(
        "artloop",
        min_length=1,
        description="The MLflow experiment, W&B project or TensorBoard folder the runs go to",
    )


def default_home() -> Path:
    return Path.home() / ".artloop"


_toml_file: ContextVar[Path | None] = ContextVar("artloop_toml_file", default=None)


class ArtloopConfig(BaseSettings):
    """Everything configurable. Build it with `load_config`."""

    model_config = SettingsConfigDict(
        env_prefix="ARTLOOP_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(default_factory=default_home, description="Store, checkpoints, reports")
    chat: ChatConfig = Field(default_factory=ChatConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    scorers: ScorersConfig = Field(default_factory=ScorersConfig)
    agents: AgentsConfig = Field(default_factory=AgentsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tags: list[str] = Field(
        default_factory=list,
        description="Labels stored with each run (`artloop export --tag` selects by them)",
    )
    checkpointer: SecretStr | None = Field(
        None,
        description="Where sessions' checkpoints live: "
        "unset = SQLite in the home; a postgresql:// URL for "
        "a shared server (env ARTLOOP_CHECKPOINTER)",
    )
    ui_url: str | None = Field(
        None,
        description="Where `artloop serve ui` is reached, e.g. "
        "http://127.0.0.1:7860: the pauses of server runs link their "
        "images there (env ARTLOOP_UI_URL)",
    )

    @model_validator(mode="before")
    @classmethod
    def _world_loop(cls, data: Any) -> Any:
        """The diffusion model's world's loop settings where the config leaves them out."""
        if not isinstance(data, dict):
            return data
        diffusion, loop = data.get("diffusion") or {}, data.get("loop") or {}
        if not isinstance(diffusion, dict | DiffusionConfig) or not isinstance(loop, dict):
            return data
        model = (
            diffusion.model
            if isinstance(diffusion, DiffusionConfig)
            else diffusion.get("model", DiffusionConfig.model_fields["model"].default)
        )
        if model not in WORLD_LOOP_SETTINGS:
            return data
        return {**data, "loop": {**WORLD_LOOP_SETTINGS[model], **loop}}

    @field_validator("home", mode="before")
    @classmethod
    def _home_named(cls, value: Any) -> Any:
        """An empty home would be the working directory: refused. `~` is expanded."""
        if isinstance(value, str | Path) and not str(value).strip():
            raise PydanticCustomError("home_empty", "is empty; name a directory")
        return Path(value).expanduser() if isinstance(value, str | Path) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        if (path := _toml_file.get()) is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def secrets(self) -> set[str]:
        """Every secret configured (API keys, the checkpointer URL and its password, whatever
        custom_kwargs, serve.env and serve.extra_args hold under a secret-looking name)."""
        found = secret_values(self.model_dump())  # SecretStr values stay objects: revealed there
        if self.checkpointer:  # a URL with a password in it: both are secret
            found |= {self.checkpointer.get_secret_value()}
            found |= secret_values(self.checkpointer.get_secret_value())
        found.discard("EMPTY")  # chat.api_key's placeholder for servers without a key
        return found

    def __repr_args__(self):  # a config in a log or traceback shows no secret either
        return list(self.public_dict().items())

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-able data, secrets masked by name and by value: safe to store with
        a trajectory or print."""
        data = self.model_dump(mode="json")
        data["checkpointer"] = MASK if self.checkpointer else None
        return mask_secrets(data, self.secrets())


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""


def _deep_set(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ArtloopConfig:
    """Build the config from a TOML file, the environment and dotted overrides
    (e.g. {"loop.max_iters": 2}); None-valued overrides are ignored."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
    init: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _deep_set(init, key, value)
    token = _toml_file.set(path)
    try:
        return ArtloopConfig(**init)
    except ValidationError as e:
        msgs = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid config: " + "; ".join(msgs)) from None
    except Exception as e:  # e.g. a TOML syntax error
        raise ConfigError(f"invalid config file {path}: {e}") from None
    finally:
        _toml_file.reset(token)


def ensure_home(home: Path) -> Path:
    """Create the home directory and prove it is writable, or raise ConfigError saying so."""
    home = home.expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"home directory {home} is not writable: {e.strerror or e}") from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise ConfigError(f"home directory {home} is not writable")
    return home


def validate_prompt(prompt: str) -> str:
    """Reject empty and overlong prompts with a message naming the problem."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ConfigError(f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    try:  # bytes that were not UTF-8 arrive from argv as lone surrogates
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"prompt is not UTF-8 text (a bad byte at position {e.start})") from None
    return prompt.strip()
