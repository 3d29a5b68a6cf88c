"""The VQA score's agent (AGFSync / TIFA): a language model writes yes/no questions whose right
answer is "yes" for an image that follows the prompt, and a VLM answers each about the image.
Used by rewards/vqa.py only (not exported by artloop.agents)."""

from __future__ import annotations

from typing import Literal

from artloop.agents.base import ask, messages_for
from artloop.models.structured import CallPolicy, Structured
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import BaseMessage
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

MAX_QUESTIONS = 6  # a handful per prompt, bounded (TIFA asks ~4-10, AGFSync a few)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QAPair(_Out):
    """One check of the prompt: a yes/no question and its right answer."""

    question: str = Field(
        min_length=3,
        max_length=160,
        description="A yes/no question about the image that checks one element of the prompt "
        "(an object, an attribute, a count, a relation, the style)",
    )
    answer: Literal["yes"] = Field(
        description='The answer for an image that follows the prompt: always "yes"'
    )


class VQAQuestions(_Out):
    """Questions that an image following the prompt answers "yes" to."""

    pairs: list[QAPair] = Field(
        min_length=1,
        max_length=MAX_QUESTIONS,
        description="Distinct questions, the most important elements of the prompt first",
    )


class VQAAnswer(_Out):
    """The answer to one yes/no question about the image."""

    answer: Literal["yes", "no"] = Field(description="What the image shows: yes or no")


def write_questions(
    model: BaseChatModel, prompt: str, n: int = 4, *, policy: CallPolicy = CallPolicy()
) -> Structured[VQAQuestions]:
    """At most `n` (and MAX_QUESTIONS) yes/no questions checking `prompt`, each answered "yes"."""
    return ask(
        model,
        agent="vqa_questions",
        schema=VQAQuestions,
        policy=policy,
        prompt=prompt,
        n=min(n, MAX_QUESTIONS),
    )


def answer_question(
    model: BaseChatModel, image: Image.Image, question: str, *, policy: CallPolicy = CallPolicy()
) -> Structured[VQAAnswer]:
    """The model's yes/no answer to `question` about `image` (a structured call)."""
    return ask(
        model,
        agent="vqa_answer",
        schema=VQAAnswer,
        image=image,
        policy=policy,
        question=question,
    )


def answer_messages(
    image: Image.Image, question: str, *, policy: CallPolicy = CallPolicy()
) -> list[BaseMessage]:
    """The same question as plain messages, for a backend whose next-token log-probabilities
    are read (the answer is the assistant's first word)."""
    return messages_for("vqa_answer", "", [image], policy, question=question)
