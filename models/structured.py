"""Structured agent output: constrained decoding where the backend has it, always validated,
repaired and retried a bounded number of times, failures counted.

`invoke_structured(model, messages, Schema)` is the one call every agent makes.
"""

from __future__ import annotations

# Deliberately lazy: openai and httpx are imported inside the functions that use them, so that
# importing this module (the CLI's --help, the config, a test) does not load them.
import copy
import functools
import json
import math
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from artloop.models.families import GRID, BoxFrame, Family
from artloop.models.inprocess import ChatQwen2VLLocal
from artloop.runtime.accounting import charge, vlm_call
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from pydantic import BaseModel, ValidationError
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

T = TypeVar("T", bound=BaseModel)


class InvalidOutput(ValueError):
    """The model's answer did not parse or validate against the schema."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message)
        self.raw = raw


class StructuredOutputError(RuntimeError):
    """Every attempt gave invalid output: the step fails visibly, naming agent and backend."""


class ChatServerError(ConnectionError):
    """The chat server stayed unreachable (or kept failing) through every retry."""


@dataclass(frozen=True)
class CallPolicy:
    """How an agent call is made: repair attempts, transport retries, image encoding."""

    attempts: int = 3  # calls in all when answers are invalid (repair + retry)
    transport_retries: int = 3  # more tries after a connection error, a 5xx or a timeout
    backoff_s: float = 1.0  # the first wait before a transport retry; doubles, at most 30 s
    image_max_side: int = 768  # images are downscaled to this before they are sent
    image_format: str = "png"
    # Template name -> a file that replaces prompts/<name>.jinja (config: agents.templates).
    templates: dict[str, str] = field(default_factory=dict)
    # Shared by concurrent sessions: at most this many calls in flight to the server.
    slots: threading.BoundedSemaphore | None = None
    # The model's family (models/families.py): how it writes boxes. None: artloop's 0-1000 grid.
    family: Family | None = None

    def box_frame(self, width: int, height: int) -> BoxFrame:
        """The box convention for an image sent at width x height."""
        return GRID if self.family is None else self.family.frame(width, height)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the shared call slots (the wait is charged as vlm_wait)."""
        if self.slots is None:
            yield
            return
        start = time.perf_counter()
        with self.slots:
            charge("vlm_wait", time.perf_counter() - start)
            yield


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth retrying: the server may be back (or less busy) in a moment."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import httpx
        import openai

        errors += [
            openai.APIConnectionError,
            openai.APITimeoutError,
            openai.InternalServerError,
            httpx.TransportError,
        ]
    except ImportError:
        pass
    return tuple(errors)


def _length_errors() -> tuple[type[BaseException], ...]:
    try:
        import openai

        return (openai.LengthFinishReasonError,)  # langchain-openai's json_schema mode raises it
    except ImportError:
        return ()


def endpoint(model: BaseChatModel) -> str:
    """Where a chat model's requests go, for error messages."""
    return str(getattr(model, "openai_api_base", None) or backend_name(model))


def call_with_retries(
    runnable,
    messages: list[BaseMessage],
    model: BaseChatModel,
    policy: CallPolicy,
    call: dict | None = None,
):
    """`runnable.invoke(messages)`, retried with exponential backoff on transient errors;
    then ChatServerError naming the server and the cause. `call`: the call's record
    (runtime/accounting.vlm_call), whose `retries` counts the transport retries."""
    try:
        for try_ in Retrying(
            stop=stop_after_attempt(1 + policy.transport_retries),
            wait=wait_exponential(multiplier=policy.backoff_s, max=30),
            retry=retry_if_exception_type(transient_errors()),
            reraise=False,
        ):
            with try_:
                if call is not None:
                    call["retries"] = try_.retry_state.attempt_number - 1
                return runnable.invoke(messages)
    except RetryError as e:
        cause = e.last_attempt.exception()
        raise ChatServerError(
            f"chat server {endpoint(model)} failed {1 + policy.transport_retries} times; "
            f"last error: {type(cause).__name__}: {cause}"
        ) from cause


@dataclass
class Structured(Generic[T]):
    """An agent's validated output plus what it cost to get it. Token counts and
    log-probabilities add up every call it took (repairs too); None where the backend does
    not say."""

    output: T
    backend: str
    failures: int  # invalid answers before the valid one
    seconds: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens whose prefill was reused
    # The answers' tokens' log-probabilities (the distribution the grammar left), summed.
    logprob_sum: float | None = None
    logprob_tokens: int | None = None
    errors: tuple[str, ...] = ()  # why each invalid answer was refused, in order

    @property
    def mean_logprob(self) -> float | None:
        """The mean log-probability of the answers' tokens."""
        if not self.logprob_tokens:
            return None
        return self.logprob_sum / self.logprob_tokens

    def usage(self) -> dict:
        """Token counts and mean log-probability, for the step record."""
        keys = ("prompt_tokens", "completion_tokens", "cached_tokens", "logprob_tokens")
        return {**{k: getattr(self, k) for k in keys}, "mean_logprob": self.mean_logprob}


@dataclass
class Usage:
    """What one answer says it cost: token counts and its tokens' log-probabilities."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    logprob_sum: float | None = None
    logprob_tokens: int | None = None

    @classmethod
    def of(cls, message: BaseMessage) -> Usage:
        """Read from the OpenAI API's shapes in response_metadata (`token_usage`, `logprobs`,
        as langchain-openai and the in-process model give them), else LangChain's
        usage_metadata."""
        meta = getattr(message, "response_metadata", None) or {}
        usage = meta.get("token_usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        out = cls(usage.get("prompt_tokens"), usage.get("completion_tokens"))
        out.cached_tokens = details.get("cached_tokens")
        standard = getattr(message, "usage_metadata", None) or {}
        if out.prompt_tokens is None:
            out.prompt_tokens = standard.get("input_tokens")
            out.completion_tokens = standard.get("output_tokens")
        if out.cached_tokens is None:
            out.cached_tokens = (standard.get("input_token_details") or {}).get("cache_read")
        content = (meta.get("logprobs") or {}).get("content")
        if content:
            out.logprob_sum = float(sum(t["logprob"] for t in content))
            out.logprob_tokens = len(content)
        return out

    @classmethod
    def of_cut_off(cls, error: BaseException) -> Usage:
        """What an answer cut off at the token limit cost (openai's LengthFinishReasonError
        carries the server's completion and its usage); nothing where it says nothing."""
        usage = getattr(getattr(error, "completion", None), "usage", None)
        if usage is None:
            return cls()
        details = getattr(usage, "prompt_tokens_details", None)
        return cls(
            usage.prompt_tokens, usage.completion_tokens, getattr(details, "cached_tokens", None)
        )

    def add_to(self, total: Usage) -> None:
        """Add these counts to `total`'s (a count stays None only while no call gave it)."""
        for name in (
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "logprob_sum",
            "logprob_tokens",
        ):
            mine = getattr(self, name)
            if mine is not None:
                setattr(total, name, (getattr(total, name) or 0) + mine)


def backend_name(model: BaseChatModel) -> str:
    if isinstance(model, ChatQwen2VLLocal):
        return "inprocess"
    if type(model).__name__ == "ChatOpenAI":
        return "openai"
    return type(model).__name__


def grammar_schema(schema: dict) -> dict:
    """The JSON schema as a grammar engine should see it.

    A JSON number has no bound on its digits, and a model (a random one surely) can write
    8.16889898... until max_tokens; xgrammar ignores `multipleOf` on numbers. So each bounded
    number with a `multipleOf` becomes the enum of its grid, which every engine enforces.
    """

    def number(node: dict) -> dict:
        if node.get("type") == "number" and {"multipleOf", "minimum", "maximum"} <= node.keys():
            step, lo, hi = node.pop("multipleOf"), node.pop("minimum"), node.pop("maximum")
            first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
            decimals = max(0, -math.floor(math.log10(step)) + 1)
            node.pop("type")
            node["enum"] = [round(k * step, decimals) for k in range(first, last + 1)]
        return node

    return rewrite(schema, number)


def rewrite(schema, fn):
    """A copy of a JSON schema with `fn` applied to every object node, innermost first."""
    if isinstance(schema, list):
        return [rewrite(v, fn) for v in schema]
    if not isinstance(schema, dict):
        return schema
    return fn({k: rewrite(v, fn) for k, v in schema.items()})


@functools.cache
def json_schema(schema_cls: type[BaseModel]) -> dict:
    """The class's JSON schema, built once (pydantic rebuilds it on every call: ~6 ms each,
    ten agent calls a session). Callers must not modify it."""
    return schema_cls.model_json_schema()


def box_schema(schema: dict, frame: BoxFrame) -> dict:
    """The schema with its boxes' bounds in `frame`'s convention: for pixels, x in [0, W] and
    y in [0, H] (one bound per corner coordinate: prefixItems). A box is the one array of
    exactly four integers bounded 0-1000."""
    if not frame.pixels:
        return schema
    width, height = frame.bounds()

    def box(node: dict) -> dict:
        items = node.get("items")
        if (
            node.get("type") == "array"
            and node.get("minItems") == node.get("maxItems") == 4
            and isinstance(items, dict)
            and items.get("type") == "integer"
            and (items.get("minimum"), items.get("maximum")) == (0, 1000)
        ):
            node["prefixItems"] = [
                {**items, "maximum": side} for side in (width, height, width, height)
            ]
            node["items"] = False
        if isinstance(node.get("description"), str):  # a box's description names its scale
            node["description"] = node["description"].replace(
                "0-1000", f"in pixels (x 0-{width}, y 0-{height})"
            )
        return node

    return rewrite(schema, box)


def token_limit(model: BaseChatModel, budget: int) -> dict[str, int]:
    """The call options that allow an answer `budget` times the model's own token limit (one
    call answering for several agents: the merged critic); {} where it is the model's own or
    the backend takes no such option."""
    kind = backend_name(model)
    if budget == 1 or kind not in ("inprocess", "openai"):
        return {}
    if kind == "inprocess":
        return {"max_new_tokens": model.max_new_tokens * budget}  # type: ignore[attr-defined]
    limit = getattr(model, "max_tokens", None)
    return {"max_tokens": limit * budget} if limit else {}


def bind_schema(
    model: BaseChatModel, schema_cls: type[BaseModel], frame: BoxFrame = GRID, budget: int = 1
):
    """Attach schema-constrained decoding in the form each backend understands; boxes bounded
    in `frame`'s convention; `budget` times the model's answer-token limit (`token_limit`)."""
    schema = box_schema(grammar_schema(copy.deepcopy(json_schema(schema_cls))), frame)
    kind, limit = backend_name(model), token_limit(model, budget)
    if kind == "inprocess":
        return model.bind(json_schema=schema, **limit)
    if kind == "openai":  # vLLM and other OpenAI-compatible servers
        fmt = {"name": schema_cls.__name__, "schema": schema, "strict": True}
        # logprobs: each answer token's (the chosen one's only), for Structured.mean_logprob.
        return model.bind(
            response_format={"type": "json_schema", "json_schema": fmt}, logprobs=True, **limit
        )
    return model  # any other chat model: the schema is described in the prompt


def enforces_schema(model: BaseChatModel) -> bool:
    """Whether `bind_schema` constrains this model's decoding to the schema (else the prompt
    must carry the schema itself)."""
    return backend_name(model) in ("inprocess", "openai")


def schema_instructions(schema_cls: type[BaseModel]) -> str:
    """The schema, described in the prompt too (for backends without constrained decoding)."""
    schema = json.dumps(json_schema(schema_cls), separators=(",", ":"))
    return f"Answer with one JSON object only, no prose, matching this JSON schema:\n{schema}"


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_output(raw: str, schema_cls: type[T], frame: BoxFrame = GRID) -> T:
    """Parse and validate one answer, its boxes read in `frame`'s convention (converted to the
    0-1000 grid by the schemas' Box); raise InvalidOutput naming what is wrong."""
    text = raw.strip()
    if m := _FENCE.match(text):  # some chat models wrap JSON in a markdown fence
        text = m.group(1)
    if not text:
        raise InvalidOutput("empty answer", raw)
    try:
        return schema_cls.model_validate_json(text, context={"box_frame": frame})
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
    policy: CallPolicy = CallPolicy(),
    box_frame: BoxFrame = GRID,
    token_budget: int = 1,
) -> Structured[T]:
    """Call `model` for a `schema_cls` answer; on invalid output, show the model its error and
    retry (at most `policy.attempts` calls in all). Raises StructuredOutputError after the
    last, ChatServerError when the server stays unreachable. `box_frame`: how the model writes
    boxes about the image sent (its family's convention); `token_budget`: the answer may be
    that many times the model's token limit (an answer for several agents)."""
    runnable = bind_schema(model, schema_cls, box_frame, token_budget)
    backend = backend_name(model)
    history = list(messages)
    errors: list[str] = []
    spent = Usage()  # every call's, repairs included
    start = time.perf_counter()

    def attempt() -> T:
        # Each attempt is one call in the ledger (runtime/accounting.py): its tokens, latency
        # and, when its answer is refused, why.
        with vlm_call(agent, len(errors) + 1, backend) as call:
            cut_off = None
            try:
                with policy.slot():
                    answer = call_with_retries(runnable, history, model, policy, call)
                used = Usage.of(answer)
            except _length_errors() as e:  # the answer ran into max_tokens
                cut_off, used = e, Usage.of_cut_off(e)
            used.add_to(spent)
            call.update(
                prompt_tokens=used.prompt_tokens,
                cached_tokens=used.cached_tokens,
                completion_tokens=used.completion_tokens,
            )
        try:
            if cut_off is not None:
                raise InvalidOutput("answer cut off at the token limit", "") from cut_off
            raw = answer.content
            raw = raw if isinstance(raw, str) else json.dumps(raw)
            return parse_output(raw, schema_cls, box_frame)
        except InvalidOutput as e:
            call["error"] = str(e)[:500]
            errors.append(str(e))
            # Repair: the next attempt sees its own answer and what was wrong with it.
            history.extend(
                [
                    AIMessage(content=e.raw[:2000] or "(no answer)"),
                    HumanMessage(
                        content=f"That answer is invalid ({e}). Reply again with only a "
                        f"JSON object that matches the schema."
                    ),
                ]
            )
            raise

    try:
        for try_ in Retrying(
            stop=stop_after_attempt(policy.attempts),
            retry=retry_if_exception_type(InvalidOutput),
            reraise=False,
        ):
            with try_:
                output = attempt()
    except RetryError as e:
        last = e.last_attempt.exception()
        raise StructuredOutputError(
            f"{agent}: no valid {schema_cls.__name__} from the {backend} backend after "
            f"{policy.attempts} attempts; last error: {last}"
        ) from last
    return Structured(
        output,
        backend,
        len(errors),
        time.perf_counter() - start,
        spent.prompt_tokens,
        spent.completion_tokens,
        spent.cached_tokens,
        spent.logprob_sum,
        spent.logprob_tokens,
        tuple(errors),
    )
