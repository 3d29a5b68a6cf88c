"""Chat models from config: the in-process Qwen2-VL, an OpenAI-compatible server (vLLM first),
or any langchain chat model class."""

from __future__ import annotations

# Deliberately lazy: langchain-openai is imported inside the function that uses it, so that
# importing this module (the CLI's --help, the config, a test) does not load them.
import importlib
import threading
import urllib.error
import urllib.request

from artloop.config import ChatConfig, ConfigError
from artloop.models.inprocess import ChatQwen2VLLocal
from artloop.models.scripted import ScriptedChat
from artloop.models.tiny import resolve_model
from langchain_core.language_models.chat_models import BaseChatModel
from pydantic import ValidationError


def _inprocess_kwargs(cfg: ChatConfig) -> dict:
    return {
        "model": cfg.model,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "batch_window_ms": cfg.batch_window_ms,
        "max_batch": cfg.max_concurrent_calls,
        "prefix_cache_tokens": cfg.prefix_cache_tokens,
    }


def build_chat_model(cfg: ChatConfig) -> BaseChatModel:
    """Construct (not load) the configured chat model."""
    if cfg.backend == "inprocess":
        return ChatQwen2VLLocal(**_inprocess_kwargs(cfg))
    if cfg.backend == "openai":
        from langchain_openai import ChatOpenAI

        if not cfg.base_url:
            raise ConfigError("chat.base_url: required for the openai backend")
        return ChatOpenAI(
            base_url=cfg.base_url,
            api_key=cfg.api_key,
            model=cfg.model,
            temperature=cfg.temperature,
            max_tokens=cfg.max_new_tokens,
            timeout=cfg.timeout_s,
            max_retries=0,  # retries are artloop's (tenacity, CallPolicy), with one clear error
        )
    if cfg.backend == "scripted":
        return _construct(ScriptedChat, "artloop.models.scripted:ScriptedChat", cfg.custom_kwargs)
    if not cfg.custom_class or ":" not in cfg.custom_class:
        raise ConfigError("chat.custom_class: expected 'package.module:ClassName'")
    module, _, name = cfg.custom_class.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"chat.custom_class: cannot import {cfg.custom_class}: {e}") from None
    # Checked before it is called: any other callable (os:system...) would run with the kwargs.
    if not (isinstance(cls, type) and issubclass(cls, BaseChatModel)):
        raise ConfigError(
            f"chat.custom_class: {cfg.custom_class} is not a langchain chat model "
            f"class (a subclass of BaseChatModel); nothing was called"
        )
    return _construct(cls, cfg.custom_class, cfg.custom_kwargs)


_shared: dict[tuple, BaseChatModel] = {}
_shared_lock = threading.Lock()


def shared_chat_model(cfg: ChatConfig) -> BaseChatModel:
    """The process's chat model for `cfg`, for everything built from config (the agents'
    context, the VQA scorer, the VLM judges): an in-process model is built once per set of
    constructor arguments and then shared, so its weights load once. Other backends are built
    fresh each call: a server client holds no weights, a scripted chat consumes its answers."""
    if cfg.backend != "inprocess":
        return build_chat_model(cfg)
    kwargs = _inprocess_kwargs(cfg)
    key = tuple(sorted(kwargs.items()))
    with _shared_lock:  # sessions and scorers ask from threads: one model, not two
        if key not in _shared:
            _shared[key] = build_chat_model(cfg)
        return _shared[key]


def _construct(cls: type[BaseChatModel], name: str, kwargs: dict) -> BaseChatModel:
    try:
        return cls(**kwargs)
    except ValidationError as e:  # its text quotes the values given: secrets too
        why = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"chat.custom_kwargs: {name} refused them: {why}") from None


def chat_identity(cfg: ChatConfig) -> dict:
    """What is stored with a trajectory about the chat model (never the API key)."""
    ident = {"backend": cfg.backend, "model": cfg.model, "temperature": cfg.temperature}
    if cfg.backend == "openai":
        ident["base_url"] = cfg.base_url
    if cfg.backend == "custom":
        ident["class"] = cfg.custom_class
    return ident


def check_chat_model(cfg: ChatConfig, timeout_s: float = 5.0) -> None:
    """Fail fast, with a one-line reason, when the configured chat model cannot be reached or
    its server refuses the API key (401/403)."""
    if cfg.backend == "inprocess":
        try:
            resolve_model(cfg.model)
        except ValueError as e:
            raise ConfigError(f"chat.model: {e}") from None
    elif cfg.backend == "openai":
        if not cfg.base_url:
            raise ConfigError("chat.base_url: required for the openai backend")
        url = cfg.base_url.rstrip("/") + "/models"
        req = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {cfg.api_key.get_secret_value()}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s):
                pass
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):  # it answers, but every call would be refused
                raise ConfigError(
                    f"chat server at {cfg.base_url} refused the API key ({e.code} {e.reason}): "
                    "set chat.api_key (ARTLOOP_CHAT__API_KEY) to a key it accepts"
                ) from None
            if e.code >= 500:
                raise ConfigError(f"chat server at {cfg.base_url} answered {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"cannot reach chat server at {cfg.base_url}: {reason}") from None
