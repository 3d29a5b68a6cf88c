"""One typed config for models, the loop and paths.

Sources, lowest to highest priority: defaults < a TOML file (`--config`) < environment variables
(`ARTLOOP_HOME`, `ARTLOOP_CHAT__MODEL`, `ARTLOOP_LOOP__MAX_ITERS`, ...) < CLI flags.
With nothing configured everything runs on the tiny offline models.
"""

from __future__ import annotations

import os
import tempfile
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MAX_PROMPT_CHARS = 2000


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatConfig(_Section):
    backend: Literal["inprocess", "openai", "custom"] = Field(
        "inprocess", description="inprocess: Qwen2-VL under transformers; openai: an "
        "OpenAI-compatible server such as vLLM; custom: any langchain chat model class")  # fmt: skip
    model: str = Field("tiny-qwen2vl", description="Model id/path (inprocess) or served name")
    base_url: str | None = Field(None, description="Server URL for the openai backend, .../v1")
    api_key: SecretStr = Field(SecretStr("EMPTY"), description="API key; never stored")
    custom_class: str | None = Field(None, description="'package.module:ClassName' (custom)")
    custom_kwargs: dict[str, Any] = Field(default_factory=dict, description="kwargs (custom)")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_new_tokens: int = Field(1024, ge=16, le=16384)
    timeout_s: float = Field(120.0, gt=0, description="Per request, for servers")
    max_retries: int = Field(3, ge=0, le=20, description="Retries after a connection error, "
                             "a 5xx or a timeout")  # fmt: skip
    retry_backoff_s: float = Field(1.0, ge=0.0, le=60.0, description="First retry wait; doubles")
    structured_attempts: int = Field(3, ge=1, le=10, description="Calls per agent step when "
                                     "the answer is invalid (repair + retry)")  # fmt: skip
    image_max_side: int = Field(768, ge=64, le=4096, description="Images sent are resized")
    image_format: Literal["png", "jpeg"] = Field("png", description="How images are sent")
    max_concurrent_calls: int = Field(16, ge=1, le=1024, description="Agent calls in flight at "
                                      "once from concurrent sessions (a server batches them; "
                                      "the in-process model runs up to this many as one batch)")  # fmt: skip
    batch_window_ms: float = Field(0.0, ge=0.0, le=10_000.0, description="In-process model: "
                                   "gather calls from concurrent sessions this long into one "
                                   "generate (calls already waiting are always batched)")  # fmt: skip
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DiffusionConfig(_Section):
    model: str = Field("tiny-sd", description="tiny-sd, tiny-flux, a hub id or a local path")
    family: Literal["auto", "sd", "sdxl", "flux"] = "auto"
    width: int = Field(256, ge=64, le=2048)
    height: int = Field(256, ge=64, le=2048)
    steps: int = Field(4, ge=1, le=200)
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    seed: int = Field(0, ge=0, lt=2**63)
    edit_strength: float = Field(0.5, gt=0.0, le=1.0, description="img2img strength when the "
                                 "plan asks for a global edit without saying how much")  # fmt: skip
    batch_window_ms: float = Field(0.0, ge=0.0, le=10_000.0, description="Gather diffusion "
                                   "requests from concurrent sessions this long and run those "
                                   "that agree in shape as one batch; 0: no batching")  # fmt: skip
    max_batch: int = Field(16, ge=1, le=1024, description="Images per batched pipeline call")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class LoopConfig(_Section):
    max_iters: int = Field(3, ge=1, le=50, description="Iterations before giving up")
    accept_score: float = Field(7.0, ge=0.0, le=10.0, description="Validator score to accept")
    plateau_patience: int = Field(2, ge=1, le=50, description="Stop after this many "
                                  "iterations without a better score")  # fmt: skip
    plateau_min_delta: float = Field(0.25, ge=0.0, le=10.0, description="What counts as better")
    judge: str = Field("vlm", description="Who validates: vlm (the validator agent) or a "
                       "reward with a declared range, e.g. darkness: score = that reward "
                       "mapped onto 0-10")  # fmt: skip

    @field_validator("judge")
    @classmethod
    def _known_judge(cls, value: str) -> str:
        from artloop.tools.rewards import judge_reward

        if value != "vlm":
            judge_reward(value)  # a reward judges only on a declared scale: ValueError says why
        return value


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
    max_images_per_prompt: int = Field(1, ge=0, le=16, description="--limit-mm-per-prompt image")
    max_image_pixels: int | None = Field(
        None, ge=3136, description="Cap image tokens (mm_processor_kwargs max_pixels)"
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    structured_outputs_backend: Literal["auto", "guidance", "xgrammar", "outlines"] = Field(
        "guidance", description="guidance: xgrammar lets control characters into bounded strings"
    )
    compact_json: bool = Field(True, description="No whitespace between JSON tokens: a model "
                               "(a random one surely) can otherwise emit it without end")  # fmt: skip
    enforce_eager: bool = Field(False, description="No CUDA graphs / compilation (needed on CPU)")
    api_key: SecretStr | None = Field(None, description="Clients must send it; required for "
                                      "a non-loopback host (env ARTLOOP_SERVE__API_KEY)")  # fmt: skip
    vllm: str = Field("vllm", description="The vllm executable: a path, or a name on PATH")
    extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` flags")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables")
    startup_timeout_s: float = Field(900.0, gt=0, description="Wait this long for /health")


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
    tags: list[str] = Field(default_factory=list, description="Labels stored with each run "
                            "(`artloop export --tag` selects by them)")  # fmt: skip
    checkpointer: SecretStr | None = Field(None, description="Where sessions' checkpoints live: "
                                           "unset = SQLite in the home; a postgresql:// URL for "
                                           "a shared server (env ARTLOOP_CHECKPOINTER)")  # fmt: skip

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

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-able data, secrets masked: safe to store with a trajectory."""
        data = self.model_dump(mode="json")
        data["chat"]["api_key"] = "***"
        data["checkpointer"] = "***" if self.checkpointer else None
        return data


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
