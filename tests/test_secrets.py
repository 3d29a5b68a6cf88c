"""Secrets, wherever configured (chat.custom_kwargs, serve.env, serve.extra_args, URL user info),
are never written or printed: masked by name and by value (config.mask_secrets). A config file
is trusted input, but even so `chat.custom_class` only ever calls a langchain chat model class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from artloop.config import ChatConfig, ConfigError, load_config, mask_secrets
from artloop.models.chat import build_chat_model

ARTLOOP = str(Path(sys.executable).with_name("artloop"))
S_KWARG, S_ENV, S_ARG, S_URL = (
    "sk-kwarg-7f3a91",
    "hf_envtoken_52c8",
    "hf_argtoken_9d14",
    "pw-url-6e02",
)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ARTLOOP, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "ARTLOOP_DIFFUSION__STEPS": "2",
            "ARTLOOP_DIFFUSION__WIDTH": "64",
            "ARTLOOP_DIFFUSION__HEIGHT": "64",
        },
    )


def test_masking_by_name_flag_url_and_value():
    data = {
        "HF_TOKEN": "a",
        "apiKey": "b",
        "X-Api-Key": "c",
        "max_new_tokens": 9,
        "unset_key": None,
        "headers": {"Authorization": "Bearer d"},
        "note": f"made with {S_KWARG}",
        "args": ["--hf-token", "e", "--api-key=f", "--port", "8000"],
        "url": f"http://bob:{S_URL}@vlm.local/v1",
    }
    assert mask_secrets(data, {S_KWARG}) == {
        "HF_TOKEN": "***",
        "apiKey": "***",
        "X-Api-Key": "***",
        "max_new_tokens": 9,
        "unset_key": None,
        "headers": {"Authorization": "***"},
        "note": "made with ***",
        "args": ["--hf-token", "***", "--api-key=***", "--port", "8000"],
        "url": "http://***@vlm.local/v1",
    }


def test_the_config_knows_its_secrets():
    cfg = load_config(
        None,
        {
            "chat.custom_kwargs": {"api_key": S_KWARG},
            "serve.env": {"HF_TOKEN": S_ENV},
            "serve.extra_args": ["--hf-token", S_ARG],
            "tags": [f"by {S_ENV}"],
            "checkpointer": f"postgresql://me:{S_URL}@db/x",
        },
    )
    assert cfg.secrets() >= {S_KWARG, S_ENV, S_ARG, S_URL}
    shown = json.dumps(cfg.public_dict()) + repr(cfg)
    assert not any(s in shown for s in (S_KWARG, S_ENV, S_ARG, S_URL)), shown


def test_the_store_masks_what_any_caller_gives_it(store):
    """The LangGraph server path registers runs without the CLI's public_dict: still masked."""
    store.create_run(
        "0123456789abcdef",
        "a fox",
        {"chat": {"custom_kwargs": {"api_key": S_KWARG}}},
        {"chat": {"base_url": f"http://u:{S_URL}@h/v1"}},
        "v1",
    )
    raw = store.db_path.read_bytes()
    assert S_KWARG.encode() not in raw and S_URL.encode() not in raw
    run = store.get_run("0123456789abcdef")
    assert run["config"]["chat"]["custom_kwargs"]["api_key"] == "***"


@pytest.mark.slow  # `artloop` processes
def test_a_cli_run_leaves_no_configured_secret_anywhere(tmp_path):
    """A real run, show, list and export: no file under the home or the export, and no output,
    holds any of the secrets configured."""
    home, out, conf = tmp_path / "home", tmp_path / "export", tmp_path / "artloop.toml"
    conf.write_text(f"""
[chat]
backend = "custom"
custom_class = "artloop.models.scripted:ScriptedChat"
base_url = "http://bob:{S_URL}@vlm.local:8000/v1"
[chat.custom_kwargs]
api_key = "{S_KWARG}"
default_headers = {{ X-Trace = "run by {S_KWARG}" }}
[chat.custom_kwargs.scripts]
Verdict = [{{ verdict = "accept", score = 9.0, better_than_before = true, reasons = ["ok"] }}]
[serve]
extra_args = ["--hf-token", "{S_ARG}"]
[serve.env]
HF_TOKEN = "{S_ENV}"
""")
    run = cli(
        "run", "a red fox", "--max-iters", "1", "--config", str(conf), "--home", str(home), "--json"
    )
    assert run.returncode == 0, run.stderr
    run_id = json.loads(run.stdout)["run_id"]
    outputs = [
        run,
        cli("show", run_id, "--json", "--home", str(home)),
        cli("list", "--home", str(home)),
        cli("export", str(out), "--format", "raw", "--home", str(home)),
    ]
    assert all(p.returncode == 0 for p in outputs), [p.stderr for p in outputs]
    shown = json.loads(outputs[1].stdout)["config"]
    assert shown["chat"]["custom_kwargs"]["api_key"] == "***"
    assert shown["serve"]["env"] == {"HF_TOKEN": "***"}
    assert shown["serve"]["extra_args"] == ["--hf-token", "***"]
    assert shown["chat"]["custom_kwargs"]["default_headers"] == {"X-Trace": "run by ***"}
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != conf]
    assert {"artloop.sqlite", "README.md", "steps.jsonl"} <= {p.name for p in files}
    assert any(p.suffix == ".html" for p in files)  # the report
    for secret in (S_KWARG, S_ENV, S_ARG, S_URL):
        assert not [p for p in files if secret.encode() in p.read_bytes()], secret
        assert not [p for p in outputs if secret in p.stdout + p.stderr], secret


@pytest.mark.slow
def test_custom_class_must_be_a_chat_model_before_it_is_called(tmp_path):
    """`os:system` with a command as its kwarg: refused in one line, the command never runs."""
    marker = tmp_path / "ran"
    conf = tmp_path / "evil.toml"
    conf.write_text(
        f'[chat]\nbackend = "custom"\ncustom_class = "os:system"\n'
        f'[chat.custom_kwargs]\ncommand = "touch {marker}"\n'
    )
    proc = cli(
        "run", "a fox", "--max-iters", "1", "--config", str(conf), "--home", str(tmp_path / "home")
    )
    assert proc.returncode == 2 and not marker.exists()
    assert proc.stderr.strip().splitlines() == [
        "error: chat.custom_class: os:system is not a langchain chat model class (a subclass of "
        "BaseChatModel); nothing was called"
    ]
    for name in ("builtins:dict", "artloop.models.chat:build_chat_model"):
        with pytest.raises(ConfigError, match="not a langchain chat model class"):
            build_chat_model(ChatConfig(backend="custom", custom_class=name))
    with pytest.raises(ConfigError, match="refused them: scripts: Input should be a valid dict"):
        build_chat_model(
            ChatConfig(
                backend="custom",
                custom_kwargs={"scripts": S_KWARG},
                custom_class="artloop.models.scripted:ScriptedChat",
            )
        )


def test_a_vllm_log_tail_is_shown_without_the_secrets_it_was_given(tmp_path):
    """A server that dies at start echoing its environment and flags: the error quotes its log,
    the configured secrets masked."""
    exe = tmp_path / "vllm"
    exe.write_text('#!/bin/sh\necho "token $HF_TOKEN args $*"\nexit 3\n')
    exe.chmod(0o755)
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'home = "{tmp_path / "home"}"\n[serve]\nextra_args = ["--hf-token", '
        f'"{S_ARG}"]\n[serve.env]\nHF_TOKEN = "{S_ENV}"\n'
    )
    proc = cli(
        "serve",
        "vlm",
        "--model",
        str(tmp_path),
        "--vllm",
        str(exe),
        "--port",
        "1",
        "--config",
        str(conf),
    )
    assert proc.returncode == 1 and "exited with status 3" in proc.stderr, proc.stderr
    assert "token *** args" in proc.stderr and "--hf-token ***" in proc.stderr
    assert S_ENV not in proc.stderr + proc.stdout and S_ARG not in proc.stderr + proc.stdout
