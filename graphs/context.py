"""What the refine graph's nodes run with: the models, the tools, the store and the loop rules.

Passed as LangGraph's runtime context, so graph state stays small and serialisable (hashes,
prompts, agent outputs) and the heavy objects are built once per process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cache

from artloop.config import ArtloopConfig, ChatConfig, DiffusionConfig, LoopConfig, load_config
from artloop.models.chat import build_chat_model, chat_identity
from artloop.models.structured import CallPolicy
from artloop.tools.diffusion import DiffusionTool
from artloop.tools.rewards import JudgeWatch
from artloop.tools.store import TrajectoryStore
from langchain_core.language_models.chat_models import BaseChatModel


@dataclass
class RefineContext:
    """Built by artloop's runner with every part; a server (`langgraph dev`) builds it from a
    run's JSON context, usually empty: then the parts come from the configured defaults."""

    chat: BaseChatModel = None  # type: ignore[assignment]
    diffusion: DiffusionTool = None  # type: ignore[assignment]
    store: TrajectoryStore = None  # type: ignore[assignment]
    loop: LoopConfig = field(default_factory=LoopConfig)
    chat_config: ChatConfig = field(default_factory=ChatConfig)
    diffusion_config: DiffusionConfig = field(default_factory=DiffusionConfig)
    # Shared by every session on this context: bounds the agent calls in flight to the server.
    vlm_slots: threading.BoundedSemaphore | None = None
    # Shared too: a validator giving one answer for many different images is refused.
    judge_watch: JudgeWatch = field(default_factory=JudgeWatch)

    def __post_init__(self) -> None:
        if self.chat is None or self.diffusion is None or self.store is None:
            base = default_context()
            for name in ("chat", "diffusion", "store"):
                setattr(self, name, getattr(self, name) or getattr(base, name))
            self.loop, self.chat_config = base.loop, base.chat_config
            self.diffusion_config = base.diffusion_config

    @property
    def policy(self) -> CallPolicy:
        """How agent calls are made (repair attempts, transport retries, image encoding)."""
        c = self.chat_config
        return CallPolicy(
            attempts=c.structured_attempts, transport_retries=c.max_retries,
            backoff_s=c.retry_backoff_s, image_max_side=c.image_max_side,
            image_format=c.image_format, slots=self.vlm_slots,
        )  # fmt: skip

    def models(self) -> dict:
        """Model identities, stored with every trajectory."""
        return {"chat": chat_identity(self.chat_config), "diffusion": self.diffusion.identity}


def build_context(config: ArtloopConfig) -> RefineContext:
    """Construct everything the graph needs; models load lazily on first use."""
    store = open_store(config)
    d = config.diffusion
    diffusion = DiffusionTool(model=d.model, store=store.images, family=d.family, device=d.device,
                              dtype=d.dtype, batch_window_ms=d.batch_window_ms, max_batch=d.max_batch)  # fmt: skip
    return RefineContext(
        chat=build_chat_model(config.chat), diffusion=diffusion, store=store, loop=config.loop,
        chat_config=config.chat, diffusion_config=d,
        vlm_slots=threading.BoundedSemaphore(config.chat.max_concurrent_calls),
    )  # fmt: skip


def open_store(config: ArtloopConfig, *, create: bool = True) -> TrajectoryStore:
    """The configured store (its home, and where the sessions' checkpoints live); with
    `create=False` an existing one only (see TrajectoryStore)."""
    url = config.checkpointer.get_secret_value() if config.checkpointer else None
    return TrajectoryStore(config.home, checkpointer=url, create=create)


@cache
def default_context() -> RefineContext:
    """For callers that pass no context (e.g. `langgraph dev`): the config from the environment."""
    return build_context(load_config())
