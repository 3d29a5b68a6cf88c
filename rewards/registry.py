"""The reward registry, one signature (ddpo-pytorch's): fn(images, prompts, metadata) -> (scores,
info). Register a reward with `@reward("name", range=(lo, hi))`; each entry (`Reward`) says what
its scores mean and which model weights produced them (`Reward.identity()`), and a reward judges
the loop (`loop.judge`) only when its scores have a declared range or a normaliser. The built-ins
live beside it: metrics.py (image statistics) and vlm.py (VLM judges); importing
`artloop.rewards` registers them.

`reward_entry(name)` resolves, besides the registered names: `composite:<preset>` and
`composite:a=0.6,b=0.4` (a weighted sum of range-normalised scores, composite.py);
`package.module:function` (a third-party scorer); the scorers listed in `scorers.plugins`; and
the Python entry-point group `artloop.rewards`. The last three load on first lookup.

Scorers that load a model ask here where to run (`scorer_device()`), which weights to load
(`scorer_model(name, default_id)`) and how many images per batch (`scorers_config()`), all from
the config section `scorers` (`ScorersConfig`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from artloop.config import ChatConfig, ScorersConfig, load_config
from artloop.rewards.composite import PREFIX as COMPOSITE
from artloop.rewards.composite import PRESETS, resolve_composite
from PIL import Image

RewardFn = Callable[[list[Image.Image], list[str], list[dict]], tuple[np.ndarray, dict[str, Any]]]
ModelIdentity = Callable[[], dict[str, Any] | None]

ENTRY_POINT_GROUP = "artloop.rewards"
_SPEC = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


class UnknownRewardError(KeyError, ValueError):
    """No reward of that name. A KeyError (callers that looked names up in a dict) and a
    ValueError (every other bad scorer name); its message is the bare line, unquoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Reward:
    """A registered reward and what its scores mean: `range` (lo, hi) bounds them (None: not
    bounded, or not known to be); `higher_is_better` is their direction; `normalise`, in place
    of a range, maps a score increasingly onto [0, 1] (e.g. x / (x + c) for an unbounded one);
    `model`, for a scorer that loads weights, returns their identity (id, revision, sha256)."""

    name: str
    fn: RewardFn
    range: tuple[float, float] | None = None
    higher_is_better: bool = True
    normalise: Callable[[float], float] | None = None
    model: ModelIdentity | None = None

    def identity(self) -> dict[str, Any]:
        """What a trajectory or a dataset card records of this reward."""
        return {
            "name": self.name,
            "range": self.range,
            "higher_is_better": self.higher_is_better,
            "model": (self.model() if self.model is not None else None) or None,
        }

    def judge_problem(self) -> str | None:
        """Why this reward cannot judge (None when it can): a judge's 0-10 score needs a scale."""
        if self.normalise is not None:
            return None
        if self.range is None:
            return (
                f"reward {self.name!r} has no declared range (or normaliser) to put its "
                "scores on the 0-10 scale"
            )
        lo, hi = self.range
        if not lo < hi:
            return f"reward {self.name!r} declares an empty range {self.range}"
        return None

    def unit(self, score: float) -> float:
        """`score` on [0, 1], 1 the best end (the judge's score is 10 x this)."""
        if problem := self.judge_problem():
            raise ValueError(problem)
        if self.normalise is not None:
            u = self.normalise(score)
        else:
            lo, hi = self.range  # type: ignore[misc]  # checked by judge_problem
            u = (score - lo) / (hi - lo)
        u = min(1.0, max(0.0, float(u)))
        return u if self.higher_is_better else 1.0 - u

    def better(self, after: float, before: float) -> bool:
        return after > before if self.higher_is_better else after < before


REWARDS: dict[str, Reward] = {}


def reward(
    name: str,
    *,
    range: tuple[float, float] | None = None,
    higher_is_better: bool = True,
    normalise: Callable[[float], float] | None = None,
    model: ModelIdentity | None = None,
) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under `name`, with what its scores mean (see `Reward`)."""

    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = Reward(name, fn, range, higher_is_better, normalise, model)
        return fn

    return register


# --- the scorers' config -------------------------------------------------------------------------
_configured: ScorersConfig | None = None
_configured_chat: ChatConfig | None = None


def configure_scorers(section: ScorersConfig | None, chat: ChatConfig | None = None) -> None:
    """Use `section` as the `scorers` config of this process and `chat` as the `chat` section
    the scorers that ask the chat model read (vqa; the CLI passes both from the config it read,
    file included); None: the environment's again (ARTLOOP_SCORERS__*, ARTLOOP_CHAT__*)."""
    global _configured, _configured_chat
    _configured, _configured_chat = section, chat


def scorers_config() -> ScorersConfig:
    """The `scorers` section in force: the configured one, else the environment's."""
    return _configured if _configured is not None else load_config().scorers


def scorers_chat_config() -> ChatConfig:
    """The `chat` section in force for the scorers: the configured one, else the
    environment's."""
    return _configured_chat if _configured_chat is not None else load_config().chat


def scorer_device() -> tuple[str, str]:
    """(device, dtype) the scorers run on: `scorers.device` ("auto": cuda when available, else
    cpu) and `scorers.dtype`."""
    section = scorers_config()
    device = section.device
    if device == "auto":
        import torch  # Deliberately lazy: the registry loads without torch.

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, section.dtype


def scorer_model(name: str, default_id: str) -> str:
    """The weights scorer `name` loads: `scorers.models.<name>` if configured, else
    `default_id` (a hub id, a local directory or a tiny-* name)."""
    return scorers_config().models.get(name, default_id)


# --- lookup --------------------------------------------------------------------------------------
_lock = threading.RLock()  # sessions look scorers up from threads; plugins load once
_imported: dict[str, Reward] = {}  # "package.module:function" -> its entry
_plugins: dict[str, str] = {}  # a `scorers.plugins` entry loaded -> the name it registered


def _load(spec: str, what: str) -> Any:
    """The object `spec` ("package.module:attr") names; ValueError in one line if it cannot be."""
    if not _SPEC.match(spec):
        raise ValueError(f"{what} {spec!r} is not 'package.module:function'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or module_name
        if "." in missing:  # its package is there, the module is not
            raise ValueError(f"{what} {spec!r}: module {missing!r} not found") from None
        raise ValueError(f"{what} {spec!r}: package {missing!r} is not installed") from None
    except Exception as e:  # the module is there but fails to import
        why = " ".join(str(e).split())
        raise ValueError(
            f"{what} {spec!r}: importing {module_name} failed: {type(e).__name__}: {why}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    return obj


def _as_reward(name: str, obj: Any, spec: str, what: str) -> Reward:
    """A third-party object as a registry entry: a `Reward` as it is (renamed), or a reward
    function, with its attributes `range`, `higher_is_better`, `normalise` and `model` read
    when present."""
    if isinstance(obj, Reward):
        return replace(obj, name=name)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is not callable (it is a {type(obj).__name__})")
    bounds = getattr(obj, "range", None)
    if bounds is not None:
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise ValueError(
                f"{what} {spec!r}: its range {bounds!r} is not (lo, hi) or None"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{what} {spec!r}: its range {bounds!r} is not finite")
        bounds = (lo, hi)
    normalise = getattr(obj, "normalise", None)
    if normalise is not None and not callable(normalise):
        raise ValueError(f"{what} {spec!r}: its normalise is not callable")
    model = getattr(obj, "model", None)
    if isinstance(model, str):  # a bare weights id
        model = (lambda m: lambda: {"id": m})(model)
    elif isinstance(model, dict):
        model = (lambda m: lambda: dict(m))(model)
    elif model is not None and not callable(model):
        raise ValueError(f"{what} {spec!r}: its model is not a callable, dict or id")
    return Reward(
        name,
        obj,
        range=bounds,
        higher_is_better=bool(getattr(obj, "higher_is_better", True)),
        normalise=normalise,
        model=model,
    )


def _imported_entry(spec: str) -> Reward:
    """A third-party scorer named by "package.module:function" (imported once)."""
    with _lock:
        if spec not in _imported:
            _imported[spec] = _as_reward(spec, _load(spec, "scorer"), spec, "scorer")
        return _imported[spec]


def _load_plugins() -> None:
    """Register the scorers `scorers.plugins` lists ("package.module:function", under the
    function's `name` attribute or its __name__, or "name=package.module:function")."""
    with _lock:
        for entry in scorers_config().plugins:
            if entry in _plugins:
                continue
            what = "scorers.plugins entry"
            named, eq, spec = entry.partition("=")
            if not eq or ":" in named:
                named, spec = "", entry
            obj = _load(spec, what)
            name = named or getattr(obj, "name", None) or getattr(obj, "__name__", None)
            if not isinstance(name, str) or not name:
                raise ValueError(f"{what} {entry!r} has no name; write 'name={spec}'")
            if name in REWARDS and name not in _plugins.values():
                raise ValueError(
                    f"{what} {entry!r} would replace the reward {name!r}; name it: "
                    f"'another-name={spec}'"
                )
            REWARDS[name] = _as_reward(name, obj, entry, what)
            _plugins[entry] = name


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_point(name: str) -> None:
    """Register `name` from the entry-point group `artloop.rewards`, if a package declares it."""
    with _lock:
        ep = _entry_points().get(name)
        if ep is None or name in REWARDS:
            return
        what = f"entry point {name!r} ({ENTRY_POINT_GROUP})"
        try:
            obj = ep.load()
        except ModuleNotFoundError as e:
            missing = (e.name or ep.module).split(".")[0]
            raise ValueError(f"{what}: package {missing!r} is not installed") from None
        except Exception as e:
            why = " ".join(str(e).split())
            raise ValueError(
                f"{what}: loading {ep.value} failed: {type(e).__name__}: {why}"
            ) from None
        REWARDS[name] = _as_reward(name, obj, ep.value, what)


def available() -> list[str]:
    """Every reward name that resolves now: registered, plugins, entry points, the composite
    presets (and any `composite:a=...,b=...` or `package.module:function`)."""
    _load_plugins()
    presets = {*PRESETS, *scorers_config().composites}
    return sorted({*REWARDS, *_entry_points()}) + [f"{COMPOSITE}{p}" for p in sorted(presets)]


def _unknown(name: str) -> UnknownRewardError:
    return UnknownRewardError(
        f"unknown reward {name!r}; choose from {', '.join(available())} (or "
        f"{COMPOSITE}a=0.6,b=0.4, or package.module:function)"
    )


def reward_entry(name: str) -> Reward:
    """The registry entry of reward `name`: registered, `composite:...`,
    `package.module:function`, a `scorers.plugins` name or an `artloop.rewards` entry point.
    UnknownRewardError (a KeyError and a ValueError) naming the choices when unknown; a
    ValueError in one line naming the problem when it cannot be loaded."""
    if (entry := REWARDS.get(name)) is not None:
        return entry
    if not isinstance(name, str) or not name.strip():
        raise _unknown(name)
    if name.startswith(COMPOSITE):
        presets = {**PRESETS, **scorers_config().composites}
        composite = resolve_composite(name, presets, reward_entry)
        return Reward(name, composite, range=(0.0, 1.0), model=composite.model)
    if ":" in name:
        return _imported_entry(name)
    _load_plugins()
    if name not in REWARDS:
        _load_entry_point(name)
    if (entry := REWARDS.get(name)) is not None:
        return entry
    raise _unknown(name)


def split_names(items: list[str]) -> list[str]:
    """Reward names from a list whose items may each hold several, comma-separated
    (`--scorers clip,aesthetic --scorers vqa`); an inline composite keeps its weights together
    (`clip,composite:clip=0.6,aesthetic=0.4` is two names)."""
    names: list[str] = []
    for item in items:
        inline = False  # the last name is an inline composite of this item: name=weight joins it
        for piece in item.split(","):
            piece = piece.strip()
            if inline and "=" in piece and ":" not in piece:
                names[-1] += "," + piece
                continue
            names.append(piece)
            inline = piece.startswith(COMPOSITE) and "=" in piece
    return names


def get_reward(name: str) -> RewardFn:
    return reward_entry(name).fn


def judge_reward(name: str) -> Reward:
    """The entry of reward `name` if it can judge the loop; else ValueError saying why not.
    ("vlm" as `loop.judge` is the validator agent, not the rater's reward.)"""
    try:
        entry: Reward | None = reward_entry(name)
    except UnknownRewardError:
        entry = None
    problem = entry.judge_problem() if entry else f"unknown judge {name!r}"
    if problem:
        can = sorted(n for n, r in REWARDS.items() if n != "vlm" and r.judge_problem() is None)
        presets = {*PRESETS, *scorers_config().composites}
        can += [f"{COMPOSITE}{p}" for p in sorted(presets)]
        raise ValueError(f"{problem}; a judge is vlm or one of {', '.join(can)}")
    return entry  # type: ignore[return-value]  # not None when there is no problem
