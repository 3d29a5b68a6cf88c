"""Structured agent output: constrained decoding where the backend has it, always validated,
repaired and retried a bounded number of times, failures counted.

`invoke_structured(model, messages, Schema)` is the one call every agent makes.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from pydantic import BaseModel, ValidationError
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt

T = TypeVar("T", bound=BaseModel)


class InvalidOutput(ValueError):
    """The model's answer did not parse or validate against the schema."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message)
        self.raw = raw


class StructuredOutputError(RuntimeError):
    """Every attempt gave invalid output: the step fails visibly, naming agent and backend."""


@dataclass
class Structured(Generic[T]):
    """An agent's validated output plus what it cost to get it."""

    output: T
    backend: str
    failures: int  # invalid answers before the valid one
    seconds: float


def backend_name(model: BaseChatModel) -> str:
    from artloop.models.inprocess import ChatQwen2VLLocal

    if isinstance(model, ChatQwen2VLLocal):
        return "inprocess"
    if type(model).__name__ == "ChatOpenAI":
        return "openai"
    return type(model).__name__


def bind_schema(model: BaseChatModel, schema_cls: type[BaseModel]):
    """Attach schema-constrained decoding in the form each backend understands."""
    schema = schema_cls.model_json_schema()
    kind = backend_name(model)
    if kind == "inprocess":
        return model.bind(json_schema=schema)
    if kind == "openai":  # vLLM and other OpenAI-compatible servers
        fmt = {"name": schema_cls.__name__, "schema": schema, "strict": True}
        return model.bind(response_format={"type": "json_schema", "json_schema": fmt})
    return model  # any other chat model: the schema is described in the prompt


def schema_instructions(schema_cls: type[BaseModel]) -> str:
    """The schema, described in the prompt too (for backends without constrained decoding)."""
    schema = json.dumps(schema_cls.model_json_schema(), separators=(",", ":"))
    return f"Answer with one JSON object only, no prose, matching this JSON schema:\n{schema}"


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_output(raw: str, schema_cls: type[T]) -> T:
    """Parse and validate one answer; raise InvalidOutput naming what is wrong."""
    text = raw.strip()
    if m := _FENCE.match(text):  # some chat models wrap JSON in a markdown fence
        text = m.group(1)
    if not text:
        raise InvalidOutput("empty answer", raw)
    try:
        return schema_cls.model_validate_json(text)
    except ValidationError as e:
        errors = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'answer'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise InvalidOutput(f"invalid {schema_cls.__name__}: {errors}", raw) from e


def invoke_structured(
    model: BaseChatModel,
    messages: list[BaseMessage],
    schema_cls: type[T],
    *,
    agent: str,
    max_attempts: int = 3,
) -> Structured[T]:
    """Call `model` for a `schema_cls` answer; on invalid output, show the model its error and
    retry (at most `max_attempts` calls in all). Raises StructuredOutputError after the last."""
    runnable = bind_schema(model, schema_cls)
    backend = backend_name(model)
    history = list(messages)
    failures = 0
    start = time.perf_counter()

    def attempt() -> T:
        nonlocal failures
        raw = runnable.invoke(history).content
        raw = raw if isinstance(raw, str) else json.dumps(raw)
        try:
            return parse_output(raw, schema_cls)
        except InvalidOutput as e:
            failures += 1
            # Repair: the next attempt sees its own answer and what was wrong with it.
            history.extend([
                AIMessage(content=raw[:2000]),
                HumanMessage(content=f"That answer is invalid ({e}). Reply again with only a "
                                     f"JSON object that matches the schema."),
            ])  # fmt: skip
            raise

    try:
        for try_ in Retrying(
            stop=stop_after_attempt(max_attempts),
            retry=retry_if_exception_type(InvalidOutput),
            reraise=False,
        ):
            with try_:
                output = attempt()
    except RetryError as e:
        last = e.last_attempt.exception()
        raise StructuredOutputError(
            f"{agent}: no valid {schema_cls.__name__} from the {backend} backend after "
            f"{max_attempts} attempts; last error: {last}"
        ) from last
    return Structured(output, backend, failures, time.perf_counter() - start)
