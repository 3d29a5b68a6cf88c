"""The CLI end to end on the embedded tiny default, and its bad inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from artloop.cli import app
from artloop.store.trajectories import TrajectoryStore
from typer.testing import CliRunner

AGENTS = {"data_cot", "concept_cot", "thesis_cot", "validate"}  # the world's loop: no enhancer
PROMPT = "a red circle to the left of a blue square"
ARTLOOP = str(Path(sys.executable).with_name("artloop"))


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed `artloop` command, in a fresh process, as a user runs it."""
    return subprocess.run(
        [ARTLOOP, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The main job: one real run on the embedded default, the shapes world (tiny-shapes-qwen2vl
    in-process as the agents, tiny-shapes-sd drawing, `shapes` watching)."""
    home = tmp_path_factory.mktemp("home")
    proc = cli(
        "run",
        PROMPT,
        "--max-iters",
        "2",
        "--home",
        str(home),
        "--json",
        "--tag",
        "demo",
    )
    assert proc.returncode == 0, proc.stderr
    return home, json.loads(proc.stdout), proc.stderr


@pytest.mark.slow  # these share one `artloop run` process on the tiny models
def test_run_end_to_end(finished):
    home, summary, progress = finished
    assert set(summary) >= {"run_id", "status", "iterations", "scores", "best_score", "report"}
    assert summary["status"] in ("accepted", "max_iters", "plateau")
    run = TrajectoryStore(home).get_run(summary["run_id"])
    assert 1 <= len(run["steps"]) == summary["iterations"] <= 2
    for i, step in enumerate(run["steps"]):
        assert step["iteration"] == i and set(step["agents"]) == AGENTS
        assert step["image"] in TrajectoryStore(home).images
        assert step["edited_image"] in TrajectoryStore(home).images
        assert isinstance(step["score"], float) and step["params"]["seed"] == 0
        assert (step["params"]["width"], step["params"]["num_inference_steps"]) == (64, 20)
        # The world's exact judge watched the image and the edit (no agent saw it).
        for watched in step["watch"].values():
            assert 0 <= watched["shapes"]["score"] <= 1
    assert run["config"]["tags"] == ["demo"] and run["config"]["loop"]["judge"] == "vlm"
    assert run["models"]["chat"] == {
        "backend": "inprocess",
        "model": "tiny-shapes-qwen2vl",
        "temperature": 0.0,
    }
    assert run["models"]["diffusion"]["model"] == "tiny-shapes-sd" and run["prompts_version"]
    # A progress line per node, on stderr, with the shapes score of each image.
    assert re.search(r"\[iter 1\] generate .*shapes \d\.\d\d", progress)
    for name in (
        "compose",
        "generate",
        "data_cot",
        "concept_cot",
        "thesis_cot",
        "edit",
        "validate",
        "decide",
    ):
        assert re.search(rf"\[iter 1\] {name}\s+\d+\.\d\ds", progress), name


@pytest.mark.slow
def test_report_shows_every_iteration(finished):
    home, summary, _ = finished
    html = Path(summary["report"]).read_text()
    run = TrajectoryStore(home).get_run(summary["run_id"])
    for step in run["steps"]:
        assert f'id="iteration-{step["iteration"] + 1}"' in html
        for digest in (step["image"], step["edited_image"]):
            src = re.search(rf'src="([^"]*{digest}\.png)"', html).group(1)
            assert (Path(summary["report"]).parent / src).resolve().is_file()
        for agent in AGENTS:
            assert f"<h3>{agent}</h3>" in html


@pytest.mark.slow
def test_show(finished):
    home, summary, _ = finished
    runner = CliRunner()
    as_json = runner.invoke(app, ["show", summary["run_id"], "--home", str(home), "--json"])
    assert json.loads(as_json.stdout) == TrajectoryStore(home).get_run(summary["run_id"])
    text = runner.invoke(app, ["show", summary["run_id"], "--home", str(home)])
    assert PROMPT in text.stdout and "iteration 1" in text.stdout
    listing = runner.invoke(app, ["list", "--home", str(home)])
    assert summary["run_id"] in listing.stdout


@pytest.mark.slow
def test_run_with_flux(tmp_path):
    """A run on tiny-flux, in this process; the agents are the scripted chat (the chat model is
    not what this is about: the run above has the default one)."""
    args = ["run", "a lighthouse", "--max-iters", "1", "--diffusion-model", "tiny-flux"]
    args += ["--chat-backend", "scripted", "--home", str(tmp_path), "--json"]
    proc = CliRunner().invoke(app, args)
    assert proc.exit_code == 0, (proc.stderr, proc.exception)
    run = TrajectoryStore(tmp_path).get_run(json.loads(proc.stdout)["run_id"])
    assert run["models"]["diffusion"]["family"] == "flux" and len(run["steps"]) == 1


def test_models_commands():
    runner = CliRunner()
    built = runner.invoke(app, ["models", "build-tiny", "tiny-sd"])
    assert (
        built.exit_code == 0
        and (Path(built.stdout.split("\t")[1].strip()) / "model_index.json").is_file()
    )
    listing = runner.invoke(app, ["models", "list"])
    assert all(n in listing.stdout for n in ("tiny-qwen2vl", "tiny-sd", "tiny-flux"))
    assert runner.invoke(app, ["models", "build-tiny", "tiny-gpt"]).exit_code == 2


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[loop]\nmax_iters = -1\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a café at dusk\n".encode("latin-1"))
    return {
        "empty prompt": (["run", ""], "prompt is empty"),
        "whitespace prompt": (["run", "  \t "], "prompt is empty"),
        "huge prompt": (["run", "x" * 100_000], "prompt is 100000 characters; the limit is 2000"),
        "non-UTF-8 prompt": (
            ["run", "a caf\udce9 fox"],
            "prompt is not UTF-8 text (a bad byte at position 5)",
        ),
        "non-UTF-8 prompts file": (["batch", str(latin1)], "cannot read prompts file"),
        "unknown diffusion model": (
            ["run", "a fox", "--diffusion-model", "nosuch/model"],
            "nosuch/model",
        ),
        "diffusion model path missing": (
            ["run", "a fox", "--diffusion-model", "/no/such/dir"],
            "unknown model '/no/such/dir'",
        ),
        "unknown chat model": (
            ["run", "a fox", "--chat-model", "./no-such-model"],
            "chat.model: unknown model './no-such-model'",
        ),
        "unreachable server": (
            ["run", "a fox", "--chat-backend", "openai", "--base-url", "http://127.0.0.1:9/v1"],
            "cannot reach chat server at http://127.0.0.1:9/v1",
        ),
        "openai without url": (
            ["run", "a fox", "--chat-backend", "openai"],
            "chat.base_url: required",
        ),
        "bad backend": (["run", "a fox", "--chat-backend", "magic"], "chat.backend"),
        "bad max iters": (["run", "a fox", "--max-iters", "0"], "loop.max_iters"),
        "unknown judge": (["run", "a fox", "--judge", "darknes"], "loop.judge"),
        "bad config file": (["run", "a fox", "--config", str(bad_toml)], "loop.max_iters"),
        "missing config file": (
            ["run", "a fox", "--config", str(tmp_path / "nope.toml")],
            "config file not found",
        ),
        "home not writable": (["run", "a fox", "--home", str(blocker / "home")], "is not writable"),
        "unknown run": (["show", "0123456789abcdef"], "no run 0123456789abcdef"),
        "malformed run id": (["show", "../../etc"], "not a run id"),
        "resume unknown run": (["resume", "0123456789abcdef"], "no run 0123456789abcdef"),
        "export into the home": (
            ["export", "{home}/out", "--format", "raw"],
            "inside the artloop home",
        ),
        "unknown export format": (
            ["export", str(tmp_path / "out"), "--format", "csv"],
            "unknown format 'csv'",
        ),
    }


@pytest.mark.slow
def test_bad_inputs_fail_clearly_and_lose_nothing(finished, tmp_path, monkeypatch):
    home, summary, _ = finished
    before = TrajectoryStore(home).get_run(summary["run_id"])
    runs_before = TrajectoryStore(home).list_runs()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    for name, (args, message) in _bad_inputs(tmp_path).items():
        args = [a.replace("{home}", str(home)) for a in args]
        if "--home" not in args:
            args = [*args, "--home", str(home)]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.output, result.exception)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert message in " ".join(result.stderr.split()), (name, result.stderr)
    assert TrajectoryStore(home).get_run(summary["run_id"]) == before
    assert TrajectoryStore(home).list_runs() == runs_before  # no half-made run was added


def test_failed_run_resumes_from_the_cli(tmp_path):
    """A chat server that dies mid-run: exit 1 naming the cause and the resume command;
    `artloop resume` then finishes the run from its checkpoint."""
    marker = tmp_path / "fail-once"
    marker.touch()
    config = tmp_path / "flaky.toml"
    config.write_text(
        f'home = "{tmp_path / "home"}"\n[chat]\nbackend = "custom"\ncustom_class = "fakes:FlakyChat"\n'
        "max_retries = 1\nretry_backoff_s = 0\n"
        f'[chat.custom_kwargs]\nmarker = "{marker}"\nfail_on = 7\nfailures = 2\n'
        '[diffusion]\nmodel = "tiny-sd"\nwidth = 64\nheight = 64\nsteps = 2\n'
        "[loop]\nmax_iters = 2\nplateau_patience = 5\n"
    )
    runner = CliRunner()
    failed = runner.invoke(app, ["run", "a fox", "--config", str(config)])
    assert failed.exit_code == 1, failed.output
    err = " ".join(failed.stderr.split())
    assert "chat server FlakyChat failed 2 times" in err
    assert "connection refused by the chat server" in err
    run_id = re.search(r"artloop resume ([0-9a-f]{16})", err).group(1)
    store = TrajectoryStore(tmp_path / "home")
    assert store.get_run(run_id)["status"] == "failed" and len(store.get_run(run_id)["steps"]) == 1

    resumed = runner.invoke(app, ["resume", run_id, "--config", str(config), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["status"] == "max_iters"
    run = store.get_run(run_id)
    assert run["status"] == "max_iters" and [s["iteration"] for s in run["steps"]] == [0, 1]
    assert all(set(s["agents"]) == AGENTS | {"enhance"} for s in run["steps"])  # tiny-sd's loop


def test_package_installs_under_one_name():
    """Nothing generic (agents, tools, ...) is importable from site-packages."""
    code = "import importlib.util as u; print([n for n in ('agents','graphs','tools','models','prompts','serve','trainers') if u.find_spec(n)])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True
    )
    assert out.stdout.strip() == "[]"
