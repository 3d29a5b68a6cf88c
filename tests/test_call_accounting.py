"""Token and call accounting per agent call (issue 20, item 6): every VLM request (repairs and
the rater's and critic's calls too) is a record in its step with its tokens and latency, the
step's and session's sums agree with them, and a session stops when its token or time budget
(`loop.max_vlm_tokens`, `loop.max_seconds`) is spent."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
from artloop import agents
from artloop.cli import app
from artloop.config import ConfigError, load_config
from artloop.graphs.runner import run_session
from artloop.models.structured import CallPolicy, invoke_structured
from artloop.runtime.accounting import (
    TOKENS,
    TOTALS,
    add_up,
    breakdown,
    ledger,
    session_totals,
    step_totals,
    sum_totals,
)
from artloop.store.trajectories import FINAL_STATUSES
from conftest import make_ctx, scripted_stack, verdict
from fakes import DEFAULTS, ScriptedChat
from langchain_core.messages import HumanMessage
from langchain_core.outputs import ChatResult
from PIL import Image
from pydantic import BaseModel
from typer.testing import CliRunner

AGENTS = ["enhance", "data_cot", "concept_cot", "thesis_cot", "validate"]


class MeteredChat(ScriptedChat):
    """ScriptedChat whose answers report token usage as an OpenAI-compatible server's do: by
    default prompt tokens = the prompt's characters / 4 (half of them cached), completion
    tokens = the answer's characters / 4, so that every call's counts differ; or `fixed`
    (prompt, cached, completion) for every call."""

    fixed: tuple[int, int, int] | None = None

    def _generate(self, messages, stop=None, run_manager=None, **kw) -> ChatResult:
        result = super()._generate(messages, stop, run_manager, **kw)
        message = result.generations[0].message
        if self.fixed is not None:
            prompt, cached, completion = self.fixed
        else:
            prompt = sum(len(str(m.content)) for m in messages) // 4
            cached, completion = prompt // 2, len(message.content) // 4
        message.response_metadata = {
            "token_usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
        }
        return result


def tokens(calls: list[dict]) -> dict[str, int]:
    return {k: sum(c[k] for c in calls) for k in TOKENS}


def test_each_agent_call_is_recorded_and_the_sums_agree(store, sd_tool):
    chat = MeteredChat(scripts={"Verdict": [verdict("revise", 5.0), verdict("accept", 9.0)]})
    summary = run_session(make_ctx(store, sd_tool, chat), prompt="a fox")
    assert (summary.status, summary.iterations) == ("accepted", 2)
    steps = store.get_run(summary.run_id)["steps"]
    for step in steps:
        calls = step["calls"]
        assert [(c["node"], c["agent"], c["attempt"]) for c in calls] == [(a, a, 1) for a in AGENTS]
        for c in calls:
            assert c["backend"] == "MeteredChat" and c["error"] is None and c["retries"] == 0
            assert c["prompt_tokens"] > c["cached_tokens"] > 0 and c["completion_tokens"] > 0
            assert c["seconds"] >= c["wait"] >= 0
        assert len({c["prompt_tokens"] for c in calls}) == len(calls)  # each call's own
        # Per node: the ledger's tokens are its calls'; per agent: agent_usage is its calls'.
        for name in AGENTS:
            mine = [c for c in calls if c["node"] == name]
            assert {k: step["accounting"][name][k] for k in TOKENS} == tokens(mine)
            usage = step["agent_usage"][name]
            assert {k: usage[k] for k in TOKENS} == tokens(mine)
        # Per step: the nodes' accounting adds up to the calls' sums.
        spent = add_up(list(step["accounting"].values()))
        assert {k: spent[k] for k in TOKENS} == tokens(calls)
        totals = step_totals(step)
        assert totals["calls"] == 5 and totals["failed_calls"] == 0
        assert {k: totals[k] for k in TOKENS} == tokens(calls)
        assert totals["vlm_tokens"] == totals["prompt_tokens"] + totals["completion_tokens"]
        assert totals["vlm_seconds"] == pytest.approx(sum(c["seconds"] - c["wait"] for c in calls))
        assert totals["wall_seconds"] == pytest.approx(sum(step["timings"].values()))
    # Per session: the steps' totals summed (and per variant: sessions' totals summed).
    session = session_totals(steps)
    assert set(session) == set(TOTALS) and session["steps"] == 2 and session["calls"] == 10
    everything = [c for s in steps for c in s["calls"]]
    assert {k: session[k] for k in TOKENS} == tokens(everything)
    assert session["wall_seconds"] == pytest.approx(
        sum(step_totals(s)["wall_seconds"] for s in steps)
    )
    assert sum_totals([session, session])["vlm_tokens"] == 2 * session["vlm_tokens"]


def test_a_repair_is_a_second_call(store, sd_tool):
    """An invalid answer and its repair: two calls of one agent, the first saying why it was
    refused; the agent's usage is both calls'."""
    chat = MeteredChat(
        scripts={"Critique": ["not json", DEFAULTS["Critique"]], "Verdict": [verdict("accept", 9)]}
    )
    summary = run_session(make_ctx(store, sd_tool, chat), prompt="a fox")
    step = store.get_run(summary.run_id)["steps"][0]
    critics = [c for c in step["calls"] if c["agent"] == "concept_cot"]
    assert [c["attempt"] for c in critics] == [1, 2]
    assert "invalid Critique" in critics[0]["error"] and critics[1]["error"] is None
    usage = step["agent_usage"]["concept_cot"]
    assert {k: usage[k] for k in TOKENS} == tokens(critics)
    assert critics[1]["prompt_tokens"] > critics[0]["prompt_tokens"]  # it sees its own answer
    assert step_totals(step)["calls"] == 6 and step_totals(step)["failed_calls"] == 1


def test_a_variants_calls_are_recorded(store, sd_tool):
    """The merged critic's one call, and the rater's calls that pick among best-of-N."""
    chat = MeteredChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    ctx = make_ctx(store, sd_tool, chat, critics="merged", best_of=2)
    step = store.get_run(run_session(ctx, prompt="a fox").run_id)["steps"][0]
    assert [(c["node"], c["agent"]) for c in step["calls"]] == [
        ("enhance", "enhance"),
        ("pick", "rate"),
        ("pick", "rate"),
        ("critic", "critic"),
        ("validate", "validate"),
    ]
    assert (
        step["accounting"]["pick"]["prompt_tokens"] == tokens(step["calls"][1:3])["prompt_tokens"]
    )


class Answer(BaseModel):
    a: str


def test_cut_off_and_transport_retries_are_recorded():
    """An answer cut off at the token limit is a failed call with the server's usage; a
    connection error retried inside a call counts in its `retries`; the ledger's VLM seconds
    are the calls' (less their waiting)."""
    import openai
    from openai.types.chat import ChatCompletion

    completion = ChatCompletion.model_validate(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length",
                    "message": {"role": "assistant", "content": '{"a": "o'},
                }
            ],
            "usage": {
                "prompt_tokens": 50,
                "completion_tokens": 8,
                "total_tokens": 58,
                "prompt_tokens_details": {"cached_tokens": 16},
            },
        }
    )
    cut = openai.LengthFinishReasonError(completion=completion)
    chat = ScriptedChat(scripts={"Answer": [cut, ConnectionError("refused"), {"a": "ok"}]})
    messages = [HumanMessage('answer {"title":"Answer","type":"object"}')]
    with ledger() as spent:
        result = invoke_structured(
            chat, messages, Answer, agent="test", policy=CallPolicy(backoff_s=0)
        )
    first, second = spent["calls"]
    assert first["error"] == "answer cut off at the token limit"
    assert (first["prompt_tokens"], first["cached_tokens"], first["completion_tokens"]) == (
        50,
        16,
        8,
    )
    assert (second["attempt"], second["retries"], second["error"]) == (2, 1, None)
    assert second["prompt_tokens"] is None  # the scripted chat says nothing
    assert (result.failures, result.prompt_tokens, result.completion_tokens) == (1, 50, 8)
    vlm = breakdown(spent, 1.0)["vlm"]
    assert vlm == pytest.approx(sum(c["seconds"] - c["wait"] for c in spent["calls"]))


def test_inprocess_calls_say_what_the_prefix_cache_reused(tiny_chat):
    """The in-process model: the second call on the same image reads the shared prefix from
    its cache, and its record says how many prompt tokens that was."""
    image = Image.fromarray((np.random.default_rng(7).random((64, 64, 3)) * 255).astype(np.uint8))
    with ledger() as spent:
        agents.data_cot(tiny_chat, image, "a red fox", {})
        agents.data_cot(tiny_chat, image, "a red fox at dusk", {})
    first, second = spent["calls"]
    assert first["backend"] == second["backend"] == "inprocess"
    assert 0 < second["cached_tokens"] < second["prompt_tokens"]
    assert all(c["completion_tokens"] > 0 for c in (first, second))


@pytest.mark.parametrize(("budget", "iterations"), [(510, 1), (600, 2)])
def test_max_vlm_tokens_stops_after_the_iteration_that_spent_it(store, sd_tool, budget, iterations):
    """5 calls of 102 tokens an iteration: a budget of 510 is spent by the first, 600 by the
    second; the session stops there with status budget and keeps its best image."""
    chat = MeteredChat(
        fixed=(100, 40, 2),
        scripts={"Verdict": [verdict("revise", 6.0), verdict("revise", 4.0)]},
    )
    ctx = make_ctx(store, sd_tool, chat, max_iters=5, plateau_patience=5, max_vlm_tokens=budget)
    summary = run_session(ctx, prompt="a fox")
    assert (summary.status, summary.iterations) == ("budget", iterations)
    run = store.get_run(summary.run_id)
    assert run["status"] == "budget" and "budget" in FINAL_STATUSES
    assert run["final_image"] == run["steps"][0]["edited_image"] and run["best_score"] == 6.0
    used = [s["budget"] for s in run["steps"]]
    assert [u["vlm_tokens"] for u in used] == [510 * (i + 1) for i in range(iterations)]
    assert [u["spent"] for u in used] == [[]] * (iterations - 1) + [["max_vlm_tokens"]]
    assert used[-1]["max_vlm_tokens"] == budget and used[-1]["max_seconds"] is None
    assert session_totals(run["steps"])["vlm_tokens"] == 510 * iterations


def test_max_seconds_stops_after_the_first_iteration(store, sd_tool):
    """A tiny time budget is spent by the first iteration: status budget, best image kept. An
    acceptance in that iteration is still an acceptance (budget only cuts a loop short)."""
    chat = ScriptedChat(scripts={"Verdict": [verdict("revise", 5.0)]})
    summary = run_session(make_ctx(store, sd_tool, chat, max_seconds=0.001), prompt="a fox")
    assert (summary.status, summary.iterations, summary.best_score) == ("budget", 1, 5.0)
    run = store.get_run(summary.run_id)
    (step,) = run["steps"]
    assert step["budget"]["spent"] == ["max_seconds"] and step["budget"]["seconds"] > 0.001
    assert step["budget"]["max_vlm_tokens"] is None
    assert run["final_image"] == step["edited_image"]
    accepting = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    done = run_session(make_ctx(store, sd_tool, accepting, max_seconds=0.001), prompt="a fox")
    assert done.status == "accepted"


def test_no_budget_records_none(store, sd_tool):
    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    step = store.get_run(run_session(make_ctx(store, sd_tool, chat), prompt="a fox").run_id)[
        "steps"
    ][0]
    assert "budget" not in step
    assert [c["prompt_tokens"] for c in step["calls"]] == [None] * 5  # the backend says nothing


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"loop.max_vlm_tokens": 0},
            "loop.max_vlm_tokens: Input should be greater than or equal to 1",
        ),
        ({"loop.max_vlm_tokens": "lots"}, "loop.max_vlm_tokens: Input should be a valid integer"),
        ({"loop.max_seconds": 0}, "loop.max_seconds: Input should be greater than 0"),
        ({"loop.max_seconds": "nan"}, "loop.max_seconds: Input should be a finite number"),
    ],
)
def test_bad_budgets_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=f"^invalid config: {message}"):
        load_config(None, overrides)


def test_a_bad_budget_is_one_line_from_the_cli(tmp_path):
    result = CliRunner().invoke(
        app,
        ["run", "a fox", "--home", str(tmp_path / "home")],
        env={"ARTLOOP_LOOP__MAX_SECONDS": "-1"},
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: invalid config: loop.max_seconds: Input should be greater than 0"]


def test_the_cli_and_report_show_calls_and_the_budget(tmp_path):
    """`artloop run` on the scripted stack with a tiny time budget: each agent's progress line
    names its call, decide's the iteration's calls and the budget spent; the JSON summary has
    the session's totals; the report shows the calls and the budget."""
    config = scripted_stack(tmp_path / "c.toml", home=tmp_path / "home", max_iters=3)
    config.write_text(config.read_text() + "max_seconds = 0.001\n")
    result = CliRunner().invoke(app, ["run", "a fox", "--config", str(config), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    assert summary["status"] == "budget" and summary["iterations"] == 1
    assert summary["totals"]["calls"] == 5 and summary["totals"]["steps"] == 1
    lines = result.stderr.splitlines()
    for name in AGENTS:
        (line,) = [x for x in lines if f"] {name} " in x]
        assert "| 1 call, " in line, line
    (decide,) = [x for x in lines if "] decide " in x]
    assert "-> budget (max_seconds: " in decide and "| iteration: 5 calls" in decide
    text = html.unescape(Path(summary["report"]).read_text(encoding="utf-8"))
    assert "status <b>budget</b>" in text
    assert "VLM calls (prompt+completion tokens)</td><td>5 calls" in text
    assert "enhance 1, data_cot 1, concept_cot 1, thesis_cot 1, validate 1" in text
    assert "<b>spent (max_seconds)</b>" in text
