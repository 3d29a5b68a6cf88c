"""What the refine graph's nodes run with: the models, the tools, the store and the loop rules.

Passed as LangGraph's runtime context, so graph state stays small and serialisable (hashes,
prompts, agent outputs) and the heavy objects are built once per process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from artloop.config import (
    AgentsConfig,
    ArtloopConfig,
    ChatConfig,
    ConfigError,
    DiffusionConfig,
    LoopConfig,
    TrackingConfig,
    load_config,
    lora_entries,
)
from artloop.models.chat import chat_identity, shared_chat_model
from artloop.models.families import chat_family
from artloop.models.structured import CallPolicy
from artloop.rewards import JudgeWatch, judge_reward, reward_entry
from artloop.runtime.tracking import TrackingError, require_backend
from artloop.store.trajectories import TrajectoryStore
from artloop.tools.diffusion import DiffusionTool
from langchain_core.language_models.chat_models import BaseChatModel
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

SETTINGS = {
    "loop": "loop",
    "chat_config": "chat",
    "diffusion_config": "diffusion",
    "agents_config": "agents",
    "tracking_config": "tracking",
}


@dataclass
class RefineContext:
    """Built by artloop's runner with every part. A part left out (None) is filled from the
    configured defaults (the environment's config), and only that part: what the caller gave
    is kept. `langgraph dev` passes a RunSettings instead (see `for_server`)."""

    # None: left out, filled by __post_init__ (never None after it).
    chat: BaseChatModel = None  # type: ignore[assignment]
    diffusion: DiffusionTool = None  # type: ignore[assignment]
    store: TrajectoryStore = None  # type: ignore[assignment]
    loop: LoopConfig = None  # type: ignore[assignment]
    chat_config: ChatConfig = None  # type: ignore[assignment]
    diffusion_config: DiffusionConfig = None  # type: ignore[assignment]
    agents_config: AgentsConfig = None  # type: ignore[assignment]
    tracking_config: TrackingConfig = None  # type: ignore[assignment]
    # Shared by every session on this context: bounds the agent calls in flight to the server.
    vlm_slots: threading.BoundedSemaphore | None = None
    # Shared too: the validator's canaries (by default asked once it gives one answer for many
    # different images, `scorers.canaries` says otherwise; it is refused if it cannot tell a
    # noise or grey edit from the real ones).
    judge_watch: JudgeWatch = field(default_factory=JudgeWatch)
    # Where `artloop serve ui` serves the images (pause payloads link them), if anywhere.
    ui_url: str | None = None

    def __post_init__(self) -> None:
        for name, section in SETTINGS.items():  # settings: cheap, from the config alone
            if getattr(self, name) is None:
                setattr(self, name, getattr(default_config(), section))
        check_judge(self.loop)  # a client's settings too (`for_server` replaces the loop)
        if self.chat is None or self.diffusion is None or self.store is None:
            base = default_context()  # the models and the store: built once per process
            if self.chat is None:
                self.chat, self.vlm_slots = base.chat, self.vlm_slots or base.vlm_slots
            self.diffusion = self.diffusion or base.diffusion
            self.store = self.store or base.store

    @property
    def policy(self) -> CallPolicy:
        """How agent calls are made (repair attempts, transport retries, image encoding)."""
        c = self.chat_config
        return CallPolicy(
            attempts=c.structured_attempts,
            transport_retries=c.max_retries,
            backoff_s=c.retry_backoff_s,
            image_max_side=c.image_max_side,
            image_format=c.image_format,
            templates={k: str(v) for k, v in self.agents_config.templates.items()},
            slots=self.vlm_slots,
            family=chat_family(c),
        )

    def models(self) -> dict:
        """Model identities, stored with every trajectory."""
        models = {"chat": chat_identity(self.chat_config), "diffusion": self.diffusion.identity}
        if self.loop.judge != "vlm":  # the scorer that judged, with its weights
            models["judge"] = judge_reward(self.loop.judge).identity()
        for key in ("fact_scorers", "watch_scorers"):
            if names := getattr(self.loop, key):
                models[key] = {name: reward_entry(name).identity() for name in names}
        if self.loop.best_of > 1 and self.loop.best_of_judge != "vlm":  # who picks, its weights
            models["best_of_judge"] = reward_entry(self.loop.best_of_judge).identity()
        return models


def check_judge(loop: LoopConfig) -> None:
    """`loop.judge` is "vlm" (the validator agent) or a reward that can judge, and each of
    `loop.fact_scorers` and `loop.watch_scorers` a reward, and `loop.best_of_judge` "vlm" (the
    rater) or a reward: ConfigError naming it otherwise. Checked here, not in config.py: the
    reward registry is a layer above it."""
    if loop.judge != "vlm":
        try:
            judge_reward(loop.judge)
        except ValueError as e:
            raise ConfigError(f"loop.judge: {e}") from None
    picker = [] if loop.best_of_judge == "vlm" else [loop.best_of_judge]
    for key, names in (
        ("fact_scorers", loop.fact_scorers),
        ("watch_scorers", loop.watch_scorers),
        ("best_of_judge", picker),
    ):
        for name in names:
            try:
                reward_entry(name)
            except ValueError as e:  # UnknownRewardError is one too
                raise ConfigError(f"loop.{key}: {e}") from None


def build_context(config: ArtloopConfig) -> RefineContext:
    """Construct everything the graph needs; models load lazily on first use. A bad judge is
    refused before anything is created, and so is a chat.family the model contradicts."""
    check_judge(config.loop)
    chat_family(config.chat)
    try:  # a tracker whose library is missing is named before a session runs
        require_backend(config.tracking.backend)
    except TrackingError as e:
        raise ConfigError(f"tracking.backend: {e}") from None
    store = open_store(config)
    d = config.diffusion
    diffusion = DiffusionTool(
        model=d.model,
        store=store.images,
        family=d.family,
        device=d.device,
        dtype=d.dtype,
        batch_window_ms=d.batch_window_ms,
        max_batch=d.max_batch,
        inpaint_model=d.inpaint_model,
        lora=[lora.path for lora in lora_entries(d.lora)],  # fused in order
        lora_scale=[lora.scale for lora in lora_entries(d.lora)],
    )
    return RefineContext(
        chat=shared_chat_model(config.chat),  # the scorers' (vqa, vlm) too, loaded once
        diffusion=diffusion,
        store=store,
        loop=config.loop,
        chat_config=config.chat,
        diffusion_config=d,
        agents_config=config.agents,
        tracking_config=config.tracking,
        vlm_slots=threading.BoundedSemaphore(config.chat.max_concurrent_calls),
        judge_watch=JudgeWatch(schedule=config.scorers.canaries),  # when its canaries are asked
        ui_url=config.ui_url,
    )


def open_store(config: ArtloopConfig, *, create: bool = True) -> TrajectoryStore:
    """The configured store (its home, and where the sessions' checkpoints live); with
    `create=False` an existing one only (see TrajectoryStore)."""
    url = config.checkpointer.get_secret_value() if config.checkpointer else None
    return TrajectoryStore(config.home, checkpointer=url, create=create)


@cache
def default_config() -> ArtloopConfig:
    """The config from the environment (and ARTLOOP_* variables), read once per process."""
    return load_config()


@cache
def default_context() -> RefineContext:
    """For callers that pass no context (e.g. `langgraph dev`): the config from the environment."""
    return build_context(default_config())


# --- what a `langgraph dev` client may set per run -------------------------------------------
IMAGE_SETTINGS = ("width", "height", "steps", "guidance_scale", "seed", "edit_strength")
ImageSettings = create_model(
    "ImageSettings",
    __config__=ConfigDict(extra="forbid"),
    __doc__="The images a session makes; the model that makes them is the server's.",
    **{
        k: (DiffusionConfig.model_fields[k].annotation, DiffusionConfig.model_fields[k])
        for k in IMAGE_SETTINGS
    },
)


def _every_key_reaches_the_model(schema: dict[str, Any]) -> None:
    # langgraph-api drops, without a word, the keys of a run's context that the context schema
    # does not list under `properties`. Listed under `allOf`, every key reaches RunSettings,
    # which refuses an unknown one by name.
    schema["allOf"] = [{"properties": schema.pop("properties"), "additionalProperties": False}]


class RunSettings(BaseModel):
    """A run's `context` from a LangGraph server client: the loop's rules and the image settings.
    Fields left out keep the server's config; anything else (the models, the store) is refused."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_every_key_reaches_the_model)
    loop: LoopConfig | None = None
    diffusion: ImageSettings | None = None  # type: ignore[valid-type]

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:  # one line that names each bad key, for the client
            bad = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
            raise ConfigError(f"invalid context: {'; '.join(bad)}") from None


def merge_settings(stored: dict | None, given: RunSettings | None) -> dict:
    """A session's settings (RunSettings as JSON) after a run that came with `given`."""
    merged = {section: dict(values) for section, values in (stored or {}).items()}
    for section, values in (given.model_dump(exclude_unset=True) if given else {}).items():
        if values is not None:  # an explicit null changes nothing
            merged[section] = {**merged.get(section, {}), **values}
    return merged


def _merged(current: BaseModel, given: BaseModel | None) -> Any:
    if given is None:
        return current
    return type(current).model_validate(
        {**current.model_dump(), **given.model_dump(exclude_unset=True)}
    )


def for_server(settings: RunSettings | None) -> RefineContext:
    """The context of a run a LangGraph server started: the process's default context (its
    models, store and config, built once) with the client's settings applied."""
    base = default_context()
    if settings is None or not settings.model_fields_set:
        return base
    return replace(
        base,
        loop=_merged(base.loop, settings.loop),
        diffusion_config=_merged(base.diffusion_config, settings.diffusion),
    )
