"""Token usage and log-probabilities with each agent answer (issue 18, item 5): read from the
answer's metadata, summed over repairs, charged to the node's ledger and kept in the step."""

from __future__ import annotations

import numpy as np
import pytest
from artloop import agents
from artloop.agents.schemas import ImageFacts
from artloop.graphs.runner import run_session
from artloop.models.structured import Usage, invoke_structured
from artloop.runtime.accounting import breakdown, ledger
from conftest import make_ctx, verdict
from fakes import DEFAULTS, ScriptedChat
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatResult
from PIL import Image
from pydantic import BaseModel


def _metadata(prompt: int, cached: int | None, logprobs: list[float]) -> dict:
    usage = {"prompt_tokens": prompt, "completion_tokens": len(logprobs)}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    content = [{"token": f"t{i}", "logprob": lp} for i, lp in enumerate(logprobs)]
    return {"token_usage": usage, "logprobs": {"content": content}}


class MeteredChat(ScriptedChat):
    """ScriptedChat whose every answer says it read 100 prompt tokens (40 cached) and wrote
    tokens of log-probability -0.5, -1.5: as an OpenAI-compatible server's would."""

    def _generate(self, messages, stop=None, run_manager=None, **kw) -> ChatResult:
        result = super()._generate(messages, stop, run_manager, **kw)
        message = result.generations[0].message
        message.response_metadata = _metadata(100, 40, [-0.5, -1.5])
        return result


class Answer(BaseModel):
    a: str


def test_usage_reads_both_shapes():
    """The OpenAI shapes in response_metadata; LangChain's usage_metadata where they are
    missing; None for what nothing says."""
    openai = Usage.of(AIMessage("x", response_metadata=_metadata(12, 5, [-1.0, -2.0, 0.0])))
    assert (openai.prompt_tokens, openai.completion_tokens, openai.cached_tokens) == (12, 3, 5)
    assert (openai.logprob_sum, openai.logprob_tokens) == (-3.0, 3)
    standard = Usage.of(
        AIMessage(
            "x",
            usage_metadata={
                "input_tokens": 7,
                "output_tokens": 2,
                "total_tokens": 9,
                "input_token_details": {"cache_read": 3},
            },
        )
    )
    assert (standard.prompt_tokens, standard.completion_tokens, standard.cached_tokens) == (7, 2, 3)
    bare = Usage.of(AIMessage("x", response_metadata=_metadata(12, None, [])))
    assert bare.cached_tokens is None and bare.logprob_sum is None
    assert Usage.of(AIMessage("x")) == Usage()


def test_repairs_add_up_and_are_charged():
    """Two invalid answers, then a valid one: three calls' tokens in the result and in the
    ledger's breakdown; a backend that says nothing gives None, not 0."""
    chat = MeteredChat(scripts={"Answer": ["not json", "{}", {"a": "ok"}]})
    messages = [HumanMessage('answer {"title":"Answer","type":"object"}')]
    with ledger() as spent:
        result = invoke_structured(chat, messages, Answer, agent="test")
    assert result.failures == 2
    assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens) == (300, 6, 120)
    assert (result.logprob_tokens, result.mean_logprob) == (6, pytest.approx(-1.0))
    assert result.usage() == {
        "prompt_tokens": 300,
        "completion_tokens": 6,
        "cached_tokens": 120,
        "logprob_tokens": 6,
        "mean_logprob": pytest.approx(-1.0),
    }
    tokens = breakdown(spent, 1.0)
    assert (tokens["prompt_tokens"], tokens["cached_tokens"], tokens["completion_tokens"]) == (
        300,
        120,
        6,
    )
    silent = invoke_structured(
        ScriptedChat(scripts={"Answer": [{"a": "ok"}]}), messages, Answer, agent="test"
    )
    assert silent.usage() == dict.fromkeys(
        ("prompt_tokens", "completion_tokens", "cached_tokens", "logprob_tokens", "mean_logprob")
    )


def test_step_records_each_agents_usage(store, sd_tool):
    """The trajectory's step keeps each agent's tokens (repairs summed) and the nodes'
    accounting counts them."""
    chat = MeteredChat(
        scripts={
            "Critique": ["not json", DEFAULTS["Critique"]],
            "Verdict": [verdict("accept", 9.0)],
        }
    )
    summary = run_session(make_ctx(store, sd_tool, chat), prompt="a fox")
    step = store.get_run(summary.run_id)["steps"][0]
    usage = step["agent_usage"]
    assert set(usage) == {"enhance", "data_cot", "concept_cot", "thesis_cot", "validate"}
    assert usage["data_cot"]["prompt_tokens"] == 100
    assert usage["concept_cot"] == {
        "prompt_tokens": 200,
        "completion_tokens": 4,
        "cached_tokens": 80,
        "logprob_tokens": 4,
        "mean_logprob": -1.0,
    }
    assert step["accounting"]["concept_cot"]["prompt_tokens"] == 200
    assert "prompt_tokens" not in step["accounting"]["generate"]


def test_inprocess_answer_usage(tiny_chat):
    """The in-process model's counts and logprobs through an agent: the second call on the same
    image reuses its prefix; the mean log-probability is that of the answer's tokens."""
    image = Image.fromarray((np.random.default_rng(5).random((64, 64, 3)) * 255).astype(np.uint8))
    first = agents.data_cot(tiny_chat, image, "a red fox", {})
    second = agents.data_cot(tiny_chat, image, "a red fox in the snow", {})
    assert isinstance(first.output, ImageFacts)
    for r in (first, second):
        assert r.prompt_tokens > 0 and r.completion_tokens > 0
        assert r.logprob_tokens == r.completion_tokens
        assert r.mean_logprob <= 0
    assert 0 < second.cached_tokens < second.prompt_tokens


@pytest.mark.integration
def test_vllm_answer_usage(vllm_server):
    """Against vLLM (prefix caching on, prompt token details on): counts and logprobs come
    back; the second call on the same image reads the shared prefix from the server's cache."""
    from artloop.config import ChatConfig
    from artloop.models.chat import build_chat_model

    chat = build_chat_model(
        ChatConfig(backend="openai", base_url=vllm_server.base_url, model="tiny-qwen2vl")
    )
    image = Image.fromarray((np.random.default_rng(6).random((64, 64, 3)) * 255).astype(np.uint8))
    first = agents.data_cot(chat, image, "a red fox", {})
    second = agents.data_cot(chat, image, "a red fox in the snow", {})
    for r in (first, second):
        assert r.prompt_tokens > 0 and r.completion_tokens > 0
        assert r.logprob_tokens == r.completion_tokens and r.mean_logprob <= 0
        assert r.cached_tokens is not None  # --enable-prompt-tokens-details
    assert 0 < second.cached_tokens < second.prompt_tokens


@pytest.mark.integration
def test_vllm_call_records_match_the_server(vllm_server, store, sd_tool):
    """A session against vLLM: each recorded call's prompt, completion and cached tokens are
    what the server's response for it said (read off the HTTP responses), in order, and the
    step's accounting, the session's totals and an experiment's cost table are their sums
    (issue 20, item 6)."""
    import httpx
    from artloop.config import ChatConfig, DiffusionConfig, LoopConfig
    from artloop.experiments.results import run_cost
    from artloop.graphs.context import RefineContext
    from artloop.runtime.accounting import TOKENS, add_up, session_totals
    from langchain_openai import ChatOpenAI

    reported: list[dict] = []

    def keep(response: httpx.Response) -> None:
        if response.url.path.endswith("/chat/completions") and response.status_code == 200:
            response.read()
            reported.append(response.json()["usage"])

    cfg = ChatConfig(backend="openai", base_url=vllm_server.base_url, model="tiny-qwen2vl")
    chat = ChatOpenAI(  # as models/chat.build_chat_model makes it, with the responses kept
        base_url=cfg.base_url,
        api_key=cfg.api_key,
        model=cfg.model,
        temperature=cfg.temperature,
        max_tokens=cfg.max_new_tokens,
        timeout=cfg.timeout_s,
        max_retries=0,
        http_client=httpx.Client(event_hooks={"response": [keep]}, timeout=cfg.timeout_s),
    )
    ctx = RefineContext(
        chat=chat,
        diffusion=sd_tool,
        store=store,
        loop=LoopConfig(max_iters=2),
        chat_config=cfg,
        diffusion_config=DiffusionConfig(width=64, height=64, steps=2),
    )
    run = store.get_run(run_session(ctx, prompt="a red fox").run_id)
    steps = run["steps"]
    calls = [c for s in steps for c in s["calls"]]
    assert len(calls) == len(reported) >= 5
    for call, usage in zip(calls, reported, strict=True):
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        assert (call["prompt_tokens"], call["completion_tokens"], call["cached_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
            cached,
        )
    assert any(c["cached_tokens"] for c in calls)  # --enable-prompt-tokens-details
    for step in steps:
        spent = add_up(list(step["accounting"].values()))
        assert {k: spent[k] for k in TOKENS} == {
            k: sum(c[k] or 0 for c in step["calls"]) for k in TOKENS
        }
    totals = session_totals(steps)
    assert totals["calls"] == len(reported)
    assert totals["prompt_tokens"] == sum(u["prompt_tokens"] for u in reported)
    assert totals["completion_tokens"] == sum(u["completion_tokens"] for u in reported)
    # The experiment report's cost table reads the same run (experiments/results.run_cost).
    cost = run_cost(run)
    assert cost["vlm_calls"] == len(reported)
    assert cost["prompt_tokens"] == sum(u["prompt_tokens"] for u in reported)
    assert cost["completion_tokens"] == sum(u["completion_tokens"] for u in reported)
