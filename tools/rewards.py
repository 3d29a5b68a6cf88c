"""Rewards by name, one signature (ddpo-pytorch's): fn(images, prompts, metadata) -> (scores, info).

Measured image statistics are rewards out of the box ("brightness", "darkness", "contrast",
"saturation", "sharpness", "colourfulness"), and so are two VLM judges: "vlm" (the rater's 0-10
score / 10) and "synartifact" (SynArtifact's artifact reward). The VLM rewards use the chat model
of the environment's config (ARTLOOP_CHAT__...) unless built with one. Register more with
`@reward("name", range=(lo, hi))`. Each entry says what its scores mean (`Reward`): a reward
judges the loop (`loop.judge`) only when its scores have a declared range or a normaliser.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from artloop.tools.image_facts import measure
from PIL import Image

RewardFn = Callable[[list[Image.Image], list[str], list[dict]], tuple[np.ndarray, dict[str, Any]]]


@dataclass(frozen=True)
class Reward:
    """A registered reward and what its scores mean: `range` (lo, hi) bounds them (None: not
    bounded, or not known to be); `higher_is_better` is their direction; `normalise`, in place
    of a range, maps a score increasingly onto [0, 1] (e.g. x / (x + c) for an unbounded one)."""

    name: str
    fn: RewardFn
    range: tuple[float, float] | None = None
    higher_is_better: bool = True
    normalise: Callable[[float], float] | None = None

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
) -> Callable[[RewardFn], RewardFn]:
    """Register a reward function under `name`, with what its scores mean (see `Reward`)."""

    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = Reward(name, fn, range, higher_is_better, normalise)
        return fn

    return register


def reward_entry(name: str) -> Reward:
    """The registry entry of reward `name` (KeyError naming the choices when unknown)."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; choose from {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def get_reward(name: str) -> RewardFn:
    return reward_entry(name).fn


def judge_reward(name: str) -> Reward:
    """The entry of reward `name` if it can judge the loop; else ValueError saying why not.
    ("vlm" as `loop.judge` is the validator agent, not the rater's reward.)"""
    entry = REWARDS.get(name)
    problem = entry.judge_problem() if entry else f"unknown judge {name!r}"
    if problem:
        can = sorted(n for n, r in REWARDS.items() if n != "vlm" and r.judge_problem() is None)
        raise ValueError(f"{problem}; a judge is vlm or one of {', '.join(can)}")
    return entry


def _statistic(key: str, sign: float = 1.0, offset: float = 0.0) -> RewardFn:
    def fn(images, prompts, metadata):
        values = np.array([measure(im)[key] for im in images], dtype=np.float64)
        return offset + sign * values, {key: values.tolist()}

    fn.__doc__ = (
        f"Reward the measured {key} of each image ({'higher' if sign > 0 else 'lower'} is better)."
    )
    return fn


# Ranges from tools/image_facts.py's definitions; sharpness (Laplacian variance) and
# colourfulness (Hasler-Suesstrunk M3) have no upper bound.
_RANGES: dict[str, tuple[float, float] | None] = {
    "brightness": (0.0, 1.0),
    "contrast": (0.0, 0.5),
    "saturation": (0.0, 1.0),
    "sharpness": None,
    "colourfulness": None,
}
for _key, _range in _RANGES.items():
    reward(_key, range=_range)(_statistic(_key))
reward("darkness", range=(0.0, 1.0))(_statistic("brightness", sign=-1.0, offset=1.0))


# --- VLM judges ---------------------------------------------------------------------------------
class BrokenJudgeError(RuntimeError):
    """The judge gave the same answer for every one of several different images: a constant,
    not a measurement. Its answers must not become rewards or verdicts; `runs` are the runs
    whose verdicts it gave."""

    def __init__(self, message: str, runs: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.runs = runs


MIN_DISTINCT = 3  # different images needed before a single repeated answer counts as broken


def _refuse_constant(image_keys: list, answers: list[str], name: str, runs=()) -> None:
    distinct = len(set(image_keys))
    if distinct >= MIN_DISTINCT and len(set(answers)) == 1:
        raise BrokenJudgeError(
            f"{name} judge gave the same answer for all {distinct} different images "
            f"({answers[0][:120]!r}): a broken judge, not used as a reward or a verdict",
            tuple(dict.fromkeys(runs)),
        )


def check_judge(images: list[Image.Image], answers: list[str], name: str) -> None:
    """Raise BrokenJudgeError when at least MIN_DISTINCT different images all got one answer.
    (Empty answers never get here: they fail validation, are retried and counted, then raise.)"""
    keys = [hash(np.asarray(im.convert("RGB")).tobytes()) for im in images]
    _refuse_constant(keys, answers, name)


class JudgeWatch:
    """The same check for a judge asked about one image at a time (the loop's validator, across
    the sessions of a batch): its last `window` answers, each with its run and image hash."""

    def __init__(self, window: int = 8) -> None:
        self.recent: deque[tuple[str, str, str]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def check(self, run_id: str, image: str, answer: str, name: str) -> None:
        with self._lock:  # sessions run in threads
            self.recent.append((run_id, image, answer))
            recent = list(self.recent)
        if len(recent) == self.recent.maxlen:
            runs, images, answers = zip(*recent, strict=True)
            _refuse_constant(list(images), list(answers), name, runs)


@functools.cache
def _config_chat() -> Any:
    from artloop.config import load_config
    from artloop.models.chat import build_chat_model

    return build_chat_model(load_config().chat)


def vlm_reward(chat: Any = None, policy: Any = None) -> RewardFn:
    """The rater's 0-10 score of each image against its prompt, scaled to [0, 1]."""

    def fn(images, prompts, metadata):
        # Imported on first use: registering the reward must not load the agent stack.
        from artloop.agents import rate
        from artloop.models.structured import CallPolicy

        model = chat if chat is not None else _config_chat()
        calls = [
            rate(model, im, p, policy=policy or CallPolicy())
            for im, p in zip(images, prompts, strict=True)
        ]
        ratings = [c.output for c in calls]
        check_judge(images, [r.model_dump_json() for r in ratings], "vlm")
        return np.array([r.score / 10 for r in ratings]), {
            "reasons": [r.reasons for r in ratings],
            "parse_failures": [c.failures for c in calls],
        }

    return fn


def clip_text_embedder(model: str) -> Callable[[list[str]], np.ndarray]:
    """Unit-norm pooled CLIP text embeddings from a diffusion model's (first) text encoder:
    `model` is a pipeline directory, a hub id or a tiny-* name."""
    import torch
    from artloop.models.tiny import resolve_model
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model(model)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(
        path, subfolder="text_encoder", use_safetensors=True
    ).eval()

    def embed(texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            ids = tokenizer(
                texts,
                padding="max_length",
                truncation=True,
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            )
            pooled = encoder(ids.input_ids).pooler_output.float()  # (N, D)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    return embed


@functools.cache
def _config_embedder() -> Callable[[list[str]], np.ndarray]:
    from artloop.config import load_config

    return clip_text_embedder(load_config().diffusion.model)


def synartifact_reward(
    chat: Any = None, embed: Any = None, alpha: float = 0.1, beta: float = 0.0, policy: Any = None
) -> RewardFn:
    """SynArtifact (arXiv 2402.18068): ask the VLM which artifacts the image shows, then
    r = sim("No artifacts", answer) - alpha * sum_k sim(class_k, answer) + beta,
    with sim the cosine similarity of text embeddings (CLIP's text encoder by default)."""
    refs: list[np.ndarray] = []  # "No artifacts" + the classes, embedded on the first call

    def fn(images, prompts, metadata):
        # Imported on first use: registering the reward must not load the agent stack.
        from artloop.agents import spot_artifacts
        from artloop.models.structured import CallPolicy
        from artloop.prompts import artifact_taxonomy

        model = chat if chat is not None else _config_chat()
        calls = [
            spot_artifacts(model, im, p, policy=policy or CallPolicy())
            for im, p in zip(images, prompts, strict=True)
        ]
        answers = [c.output.answer for c in calls]
        check_judge(images, answers, "synartifact")
        embedder = embed or _config_embedder()  # the same one on every call
        if not refs:
            classes = [a["id"].replace("_", " ") for a in artifact_taxonomy()]
            refs.append(embedder(["No artifacts", *classes]))
        sims = embedder(answers) @ refs[0].T  # (N, 1 + K): cosine similarities
        scores = sims[:, 0] - alpha * sims[:, 1:].sum(axis=1) + beta
        return scores, {"answers": answers, "parse_failures": [c.failures for c in calls]}

    return fn


reward("vlm", range=(0.0, 1.0))(vlm_reward())
# sim("No artifacts") - alpha * sum of 13 sims + beta: its bounds depend on alpha, beta and the
# embedder, and say nothing about what a good image scores, so none is declared.
reward("synartifact")(synartifact_reward())
