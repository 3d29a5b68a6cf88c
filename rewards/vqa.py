"""The VQA score in AGFSync's sense (arXiv 2403.13352, after TIFA, arXiv 2303.11897): a language
model writes yes/no questions from the prompt whose right answer is "yes" (a handful, bounded:
agents/questions.py), cached per prompt and model; the VLM answers each about the image; an
image's score is the mean probability of the right answer over its questions, in [0, 1].

The probability is read from the backend's token log-probabilities where it has them: the
in-process Qwen2-VL (`ChatQwen2VLLocal.choice_logprobs`: one forward pass, the next-token
distribution at the answer position) and an OpenAI-compatible server such as vLLM
(`logprobs=True, top_logprobs=k`, one token); P(yes) is normalised over the yes/no tokens
(either case), P(yes) / (P(yes) + P(no)). A backend without log-probabilities (the scripted
chat, a custom class) answers by a structured call and the score is the share of "yes" answers.

The model is the agents' chat model (the config's `chat` section; in-process, the very object
the agents' context uses, `models.chat.shared_chat_model`) unless `scorers.models.vqa` names
another: a BLIP-2 FlanT5, AGFSync's own answerer, answers in place of the chat model
(rewards/blip2.py; the chat model still writes the questions); any other name is the `chat`
section with that model. Questions come, in order of
preference, from the image's metadata (`metadata[i]["vqa_questions"]`, e.g. from a stored
trajectory), this scorer's cache, or the model; info["questions"] has them for the caller to
store."""

from __future__ import annotations

# Deliberately lazy: torch and transformers load inside the chat model (models/inprocess.py),
# langchain-openai inside build_chat_model; importing this module loads neither.
import functools
import hashlib
import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
from artloop.agents.questions import (
    MAX_QUESTIONS,
    answer_messages,
    answer_question,
    write_questions,
)
from artloop.config import ChatConfig
from artloop.models.chat import shared_chat_model
from artloop.models.inprocess import ChatQwen2VLLocal
from artloop.models.structured import CallPolicy
from artloop.models.tiny import resolve_model
from artloop.rewards.blip2 import blip2_identity, blip2_p_yes, is_blip2
from artloop.rewards.registry import RewardFn, reward, scorer_model, scorers_chat_config

YES, NO = ("yes", "Yes", "YES"), ("no", "No", "NO")
TOP_LOGPROBS = 20  # vLLM's default --max-logprobs


def vqa_chat_config() -> ChatConfig:
    """The VQA model's config: the `chat` section in force (the config the CLI read, --config
    file included: `configure_scorers`; else the environment's), its model replaced by
    `scorers.models.vqa` when that is set."""
    chat = scorers_chat_config()
    name = scorer_model("vqa", "")
    return chat.model_copy(update={"model": name}) if name and not is_blip2(name) else chat


def _question_writer() -> Any:
    """Who writes the questions a BLIP-2 answers: the `chat` section's model (shared)."""
    return shared_chat_model(scorers_chat_config())


def _config_blip2() -> str | None:
    """The BLIP-2 model that `scorers.models.vqa` names, if it names one."""
    name = scorer_model("vqa", "")
    return name if name and is_blip2(name) else None


def _config_chat() -> Any:
    # The agents' in-process model when it is the same one (models/chat.py shares it): a run
    # scoring vqa does not load a second copy of the VLM beside its context's.
    return shared_chat_model(vqa_chat_config())


def method(model: Any) -> str:
    """How `model`'s answers become probabilities: "logprobs" (in-process Qwen2-VL),
    "openai-logprobs" (an OpenAI-compatible server) or "share" (right answers counted); a BLIP-2
    answerer's method is "blip2"."""
    if isinstance(model, ChatQwen2VLLocal):
        return "logprobs"
    if type(model).__module__.startswith("langchain_openai"):
        return "openai-logprobs"
    return "share"


def model_key(model: Any) -> str:
    """The identity of a chat model, for the question cache: its class and its parameters."""
    params = getattr(model, "_identifying_params", {}) or {}
    return f"{type(model).__name__}:{json.dumps(params, sort_keys=True, default=str)}"


def p_yes(logprobs: dict[str, float]) -> float | None:
    """P(yes) / (P(yes) + P(no)) from token -> log-probability (tokens stripped, any case);
    None when neither was among them."""
    yes = sum(math.exp(lp) for t, lp in logprobs.items() if t.strip() in YES)
    no = sum(math.exp(lp) for t, lp in logprobs.items() if t.strip() in NO)
    return None if yes + no == 0 else yes / (yes + no)


def _openai_p_yes(model: Any, messages: list, top_logprobs: int) -> float | None:
    bound = model.bind(logprobs=True, top_logprobs=top_logprobs, max_tokens=1, temperature=0)
    msg = bound.invoke(messages)
    content = (msg.response_metadata.get("logprobs") or {}).get("content") or []
    if not content:
        raise ValueError("VQA score: the chat server returned no logprobs (logprobs=True asked)")
    top = {}
    for entry in content[0].get("top_logprobs") or []:  # best first; keep a token's best
        top.setdefault(entry["token"], entry["logprob"])
    return p_yes(top)


def vqa_reward(
    chat: Any = None,
    questions_chat: Any = None,
    n_questions: int = 4,
    policy: CallPolicy | None = None,
    top_logprobs: int = TOP_LOGPROBS,
    blip2: str | None = None,
) -> RewardFn:
    """The VQA score: `chat` answers (default: the config's VQA model), or the BLIP-2 model
    named by `blip2` (default: `scorers.models.vqa` when it names one); `questions_chat` writes
    the questions (default: `chat`, else the config's chat model), at most `n_questions` a
    prompt (<= MAX_QUESTIONS). info: "questions" (per image), "probabilities" (per image, per
    question), "method", "sources" (per image: "metadata", "cache" or "generated"),
    "question_calls", "parse_failures"."""
    if not 1 <= n_questions <= MAX_QUESTIONS:
        raise ValueError(f"n_questions {n_questions}: between 1 and {MAX_QUESTIONS}")
    cache: dict[tuple[str, str], list[str]] = {}
    lock = threading.Lock()

    def questions(writer: Any, prompt: str, p: CallPolicy) -> tuple[list[str], str, int]:
        key = (prompt, model_key(writer))
        with lock:  # concurrent callers of one prompt ask once
            if key in cache:
                return cache[key], "cache", 0
            call = write_questions(writer, prompt, n_questions, policy=p)
            qs = list(dict.fromkeys(pair.question for pair in call.output.pairs))[:n_questions]
            cache[key] = qs
            return qs, "generated", call.failures

    def fn(images, prompts, metadata):
        answerer = blip2 if blip2 is not None else _config_blip2()
        if answerer:
            model, how = None, "blip2"
            given_writer = questions_chat if questions_chat is not None else chat
            writer = given_writer if given_writer is not None else _question_writer()
        else:
            model = chat if chat is not None else _config_chat()
            writer = questions_chat if questions_chat is not None else model
            how = method(model)
        p = policy or CallPolicy()
        all_qs, sources, failures = [], [], []
        for prompt, meta in zip(prompts, metadata, strict=True):
            given = (meta or {}).get("vqa_questions")
            if given:
                qs, source, failed = [str(q) for q in given], "metadata", 0
            else:
                qs, source, failed = questions(writer, prompt, p)
            all_qs.append(qs)
            sources.append(source)
            failures.append(failed)
        if how == "blip2":  # every (image, question) pair of the batch in batched passes
            pairs = [(im, q) for im, qs in zip(images, all_qs, strict=True) for q in qs]
            flat = iter(blip2_p_yes(answerer, [im for im, _ in pairs], [q for _, q in pairs]))
            probs = [[next(flat) for _ in qs] for qs in all_qs]
            unseen = 0
        else:
            probs, unseen = [], 0
            for i, (image, qs) in enumerate(zip(images, all_qs, strict=True)):
                row = []
                for q in qs:
                    prob, failed = _answer(model, how, image, q, p, top_logprobs)
                    failures[i] += failed
                    if prob is None:  # neither yes nor no in the top tokens: no evidence
                        unseen += 1
                        prob = 0.5
                    row.append(prob)
                probs.append(row)
        scores = np.array([float(np.mean(r)) for r in probs], dtype=float)
        return scores, {
            "questions": all_qs,
            "probabilities": probs,
            "method": how,
            "sources": sources,
            "question_calls": sources.count("generated"),
            "parse_failures": failures,
            "unseen_answers": unseen,
        }

    return fn


def _answer(
    model: Any, how: str, image: Any, question: str, p: CallPolicy, top_logprobs: int
) -> tuple[float | None, int]:
    """(P(yes) or None when unseen, parse failures) for one question from a chat model."""
    if how == "share":
        call = answer_question(model, image, question, policy=p)
        return (1.0 if call.output.answer == "yes" else 0.0), call.failures
    messages = answer_messages(image, question, policy=p)
    if how == "logprobs":
        return p_yes(model.choice_logprobs(messages, YES + NO)), 0
    return _openai_p_yes(model, messages, top_logprobs), 0


@functools.cache
def _weights_sha256(path: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*.safetensors")):
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def vqa_identity() -> dict[str, Any]:
    """The VQA model's identity: backend and model id; for the in-process model, the sha256
    (first 16 hex) of its safetensors; for a server, its base URL; for a BLIP-2 answerer, its
    weights' id, revision and sha256 and the model that writes the questions."""
    cfg = vqa_chat_config()
    answerer = _config_blip2()
    if answerer:  # BLIP-2's weights; the chat model only writes the questions
        return {**blip2_identity(answerer), "answerer": "blip2", "questions_by": cfg.model}
    ident: dict[str, Any] = {"id": cfg.model, "backend": cfg.backend}
    if cfg.backend == "inprocess":
        path = resolve_model(cfg.model)
        ident.update(revision="local", sha256=_weights_sha256(str(path)))
    elif cfg.backend == "openai":
        ident.update(revision="server", base_url=cfg.base_url)
    elif cfg.backend == "custom":
        ident.update({"class": cfg.custom_class})
    return ident


reward("vqa", range=(0.0, 1.0), model=vqa_identity)(vqa_reward())
