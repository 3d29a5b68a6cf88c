"""Against a real vLLM server (CPU build, tiny Qwen2-VL): agents, images, concurrency, the CLI,
a server killed mid-run, and 5xx or slow answers from a proxy in front of it. Marked
`integration` (and so `slow`); `./test.sh` runs them with the rest, on one server for them all.

The structured-output statistics live here: 20 sampled calls per agent, schema-valid, varied,
with at most 2 invalid answers repaired (tests/test_agents.py makes a few per agent in-process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from agent_cases import CALLS, CASES, check_answers, image
from artloop import agents
from artloop.config import ChatConfig, DiffusionConfig, LoopConfig, ServeConfig
from artloop.graphs.context import RefineContext
from artloop.graphs.runner import run_session
from artloop.models.chat import build_chat_model
from artloop.models.structured import ChatServerError
from artloop.serve.vlm import ServerError, VLMServer
from artloop.store.trajectories import TrajectoryStore

pytestmark = pytest.mark.integration
AGENTS = {"enhance", "data_cot", "concept_cot", "thesis_cot", "validate"}


def chat(server: VLMServer, **kw):
    cfg = ChatConfig(backend="openai", base_url=server.base_url, model="tiny-qwen2vl", **kw)
    return build_chat_model(cfg), cfg


def context(store, sd_tool, server, **chat_kw) -> RefineContext:
    model, cfg = (
        chat(server, **chat_kw)
        if server
        else (
            build_chat_model(c := ChatConfig(backend="openai", model="tiny-qwen2vl", **chat_kw)),
            c,
        )
    )
    return RefineContext(
        chat=model,
        diffusion=sd_tool,
        store=store,
        loop=LoopConfig(max_iters=2),
        chat_config=cfg,
        diffusion_config=DiffusionConfig(width=64, height=64, steps=2),
    )


@pytest.mark.parametrize("agent", list(CASES))
def test_agent_answers_are_schema_valid(vllm_server, agent):
    """20 sampled calls per agent, 8 at a time (vLLM batches them), all schema-valid."""
    model, _ = chat(vllm_server, temperature=1.0)
    schema, call = CASES[agent]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: call(model, i), range(CALLS)))
    check_answers(schema, results, "openai")


def test_the_image_reaches_the_model(vllm_server):
    model, _ = chat(vllm_server)  # temperature 0
    stats = {"brightness": 0.5}
    a, b, a2 = (agents.data_cot(model, image(i), "a fox", stats).output for i in (1, 2, 1))
    assert a == a2 and a != b


def test_eight_sessions_at_once(vllm_server, store, sd_tool):
    ctx = context(store, sd_tool, vllm_server)
    with ThreadPoolExecutor(8) as pool:
        summaries = list(pool.map(lambda i: run_session(ctx, prompt=f"a fox number {i}"), range(8)))
    assert len({s.run_id for s in summaries}) == 8
    for s in summaries:
        run = store.get_run(s.run_id)
        assert run["status"] in ("accepted", "max_iters", "plateau")
        assert len(run["steps"]) == s.iterations >= 1
        assert all(set(step["agents"]) == AGENTS for step in run["steps"])


def test_cli_run_against_the_server(vllm_server, tmp_path):
    """A CLI run with an API key: the key reaches the server, never a file, log or export."""
    artloop = str(Path(sys.executable).with_name("artloop"))
    secret = "sk-artloop-test-0123456789"
    env = {**os.environ, "ARTLOOP_CHAT__API_KEY": secret}
    proc = subprocess.run(
        [
            artloop,
            "run",
            "a red fox in the snow",
            "--max-iters",
            "2",
            "--chat-backend",
            "openai",
            "--base-url",
            vllm_server.base_url,
            "--chat-model",
            "tiny-qwen2vl",
            "--diffusion-model",
            "tiny-sd",  # with its loop, enhancer included (tiny-shapes-sd's world has none)
            "--home",
            str(tmp_path / "home"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    export = subprocess.run(
        [
            artloop,
            "export",
            str(tmp_path / "export"),
            "--format",
            "raw",
            "--home",
            str(tmp_path / "home"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert export.returncode == 0, export.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 5 and all(secret.encode() not in p.read_bytes() for p in written)
    assert secret not in proc.stdout + proc.stderr + export.stdout + export.stderr
    run = TrajectoryStore(tmp_path / "home").get_run(json.loads(proc.stdout)["run_id"])
    assert run["models"]["chat"]["backend"] == "openai"
    assert run["models"]["chat"]["base_url"] == vllm_server.base_url
    assert all(set(step["agents"]) == AGENTS for step in run["steps"])
    assert all(
        f == {"openai": 0} or list(f) == ["openai"]
        for step in run["steps"]
        for f in step["parse_failures"].values()
    )


def test_server_killed_mid_run_then_resumed(vllm_server, store, sd_tool):
    """The server dies after Data-CoT: bounded retries, then an error naming the URL; once the
    server is back, resuming finishes the session from its checkpoint."""
    ctx = context(store, sd_tool, vllm_server, max_retries=2, retry_backoff_s=0.2)

    def kill_after_data_cot(node: str, update: dict) -> None:
        if node == "data_cot":
            vllm_server.kill()

    with pytest.raises(ChatServerError) as failure:
        run_session(ctx, prompt="a fox", run_id="00000000000000bb", on_update=kill_after_data_cot)
    message = str(failure.value)
    assert vllm_server.base_url in message and "failed 3 times" in message
    assert "Connection" in message
    run = store.get_run("00000000000000bb")
    assert run["status"] == "failed" and vllm_server.base_url in run["error"]

    vllm_server.start()  # the server is back
    summary = run_session(ctx, run_id="00000000000000bb")
    assert summary.status in ("accepted", "max_iters", "plateau")
    run = store.get_run("00000000000000bb")
    assert run["status"] == summary.status and len(run["steps"]) == summary.iterations
    assert all(set(step["agents"]) == AGENTS for step in run["steps"])


@pytest.mark.parametrize("fault", ["transient 5xx", "5xx", "slow"])
def test_a_failing_or_slow_server_then_resume(vllm_server, store, sd_tool, fault):
    """Behind a proxy that injects faults from Data-CoT on: a few 5xx are retried away; a
    server that keeps failing, or answers past the timeout, is retried a bounded number of
    times, then the run fails naming it; once the server is healthy, resume finishes it."""
    from fakes import FaultProxy

    proxy = FaultProxy(vllm_server.base_url.removesuffix("/v1"))
    rid = {
        "transient 5xx": "00000000000000c1",
        "5xx": "00000000000000c2",
        "slow": "00000000000000c3",
    }[fault]
    kw = {"base_url": proxy.base_url, "max_retries": 2, "retry_backoff_s": 0.1}
    # 12 s: a healthy CPU server answers well within it even beside the other test worker;
    # the slow fault answers after twice that.
    ctx = context(store, sd_tool, None, timeout_s=12.0, **kw)
    injected: list[int] = []

    def inject(node: str, update: dict) -> None:
        if node == "data_cot" and not injected:
            injected.append(len(proxy.seen))
            proxy.fail_next = {"transient 5xx": 2, "5xx": 10**6, "slow": 0}[fault]
            proxy.delay_s = 24.0 if fault == "slow" else 0.0

    try:
        if fault == "transient 5xx":
            summary = run_session(ctx, prompt="a fox", run_id=rid, on_update=inject)
            assert summary.status in ("accepted", "max_iters", "plateau")
            assert store.get_run(rid)["status"] == summary.status
            return
        with pytest.raises(ChatServerError) as failure:
            run_session(ctx, prompt="a fox", run_id=rid, on_update=inject)
        message = str(failure.value)
        assert proxy.base_url in message and "failed 3 times" in message
        assert ("Error code: 503" if fault == "5xx" else "Timeout") in message
        assert len(proxy.seen) - injected[0] == 3  # bounded: one call and two retries
        assert store.get_run(rid)["status"] == "failed"
        proxy.fail_next, proxy.delay_s = 0, 0.0  # healthy again
        # Healthy again: the resume waits as long as a real configuration would.
        summary = run_session(context(store, sd_tool, None, timeout_s=60.0, **kw), run_id=rid)
        run = store.get_run(rid)
        assert run["status"] == summary.status in ("accepted", "max_iters", "plateau")
        assert all(set(step["agents"]) == AGENTS for step in run["steps"])
    finally:
        proxy.close()


def test_a_bad_flag_fails_with_the_log(vllm_exe, tmp_path):
    from conftest import free_port

    cfg = ServeConfig(
        model="tiny-qwen2vl",
        vllm=vllm_exe,
        port=free_port(),
        extra_args=["--no-such-flag"],
        startup_timeout_s=300,
    )
    with pytest.raises(ServerError, match=r"(?s)exited with status \d+.*no-such-flag"):
        VLMServer(cfg, tmp_path / "log").start()
