"""VLM judges as rewards: "vlm" (the rater's 0-10 score / 10) and "synartifact" (SynArtifact's
artifact reward), with the check that refuses a judge answering every image alike. They use the
chat model of the environment's config (ARTLOOP_CHAT__...) unless built with one."""

from __future__ import annotations

# Deliberately lazy: torch and transformers are imported inside the functions that use them, so that
# importing this module (the CLI's --help, the config, a test) does not load them.
import functools
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from artloop.agents import rate, spot_artifacts
from artloop.config import load_config
from artloop.models.chat import build_chat_model
from artloop.models.structured import CallPolicy
from artloop.models.tiny import resolve_model
from artloop.prompts import artifact_taxonomy
from artloop.rewards.registry import RewardFn, reward
from PIL import Image


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
    return build_chat_model(load_config().chat)


def vlm_reward(chat: Any = None, policy: Any = None) -> RewardFn:
    """The rater's 0-10 score of each image against its prompt, scaled to [0, 1]."""

    def fn(images, prompts, metadata):
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
    # Deliberately lazy: torch and transformers load only when an embedder is built.
    import torch
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
    return clip_text_embedder(load_config().diffusion.model)


def synartifact_reward(
    chat: Any = None, embed: Any = None, alpha: float = 0.1, beta: float = 0.0, policy: Any = None
) -> RewardFn:
    """SynArtifact (arXiv 2402.18068): ask the VLM which artifacts the image shows, then
    r = sim("No artifacts", answer) - alpha * sum_k sim(class_k, answer) + beta,
    with sim the cosine similarity of text embeddings (CLIP's text encoder by default)."""
    refs: list[np.ndarray] = []  # "No artifacts" + the classes, embedded on the first call

    def fn(images, prompts, metadata):
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
