"""Config: TOML < environment < flags; bad values name the field; home and prompt checks."""

from __future__ import annotations

import pytest
from artloop import agents
from artloop.config import (
    MAX_PROMPT_CHARS,
    ChatConfig,
    ConfigError,
    ensure_home,
    load_config,
    validate_prompt,
)
from artloop.models.chat import build_chat_model, chat_identity
from artloop.tools.image_facts import measure
from PIL import Image


def test_defaults_are_the_shapes_world(monkeypatch):
    monkeypatch.delenv("ARTLOOP_HOME", raising=False)
    cfg = load_config()
    assert (cfg.chat.backend, cfg.chat.model, cfg.diffusion.model) == (
        "inprocess",
        "tiny-shapes-qwen2vl",
        "tiny-shapes-sd",
    )
    # The world's own image settings and loop, where nothing else is configured.
    assert (cfg.diffusion.width, cfg.diffusion.height, cfg.diffusion.steps) == (64, 64, 20)
    assert (cfg.loop.watch_scorers, cfg.loop.carry_edits, cfg.loop.enhancer) == (
        ["shapes"],
        True,
        False,
    )
    assert cfg.home.name == ".artloop"


def test_a_world_default_gives_way_to_what_is_configured(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[diffusion]\nwidth = 128\n[loop]\ncarry_edits = false\n")
    cfg = load_config(toml)
    assert (cfg.diffusion.width, cfg.diffusion.height, cfg.diffusion.steps) == (128, 64, 20)
    assert (cfg.loop.carry_edits, cfg.loop.watch_scorers) == (False, ["shapes"])
    # Another model: the general defaults, and no world's loop.
    toml.write_text('[diffusion]\nmodel = "tiny-sd"\n')
    cfg = load_config(toml)
    assert (cfg.diffusion.width, cfg.diffusion.steps) == (256, 4)
    assert (cfg.loop.carry_edits, cfg.loop.watch_scorers) == (False, [])


def test_layering(tmp_path, monkeypatch):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'home = "/tmp/x"\n[loop]\nmax_iters = 5\naccept_score = 8\n[diffusion]\nmodel = "tiny-flux"\n'
    )
    monkeypatch.setenv("ARTLOOP_LOOP__ACCEPT_SCORE", "6.5")
    cfg = load_config(toml, {"loop.max_iters": 2, "diffusion.seed": None})
    assert cfg.loop.max_iters == 2  # flag beats file
    assert cfg.loop.accept_score == 6.5  # env beats file
    assert cfg.diffusion.model == "tiny-flux" and str(cfg.home) == "/tmp/x"  # file beats default
    assert cfg.diffusion.seed == 0  # a None flag is "not given"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"loop.max_iters": 0}, "loop.max_iters"),
        ({"chat.temperature": "hot"}, "chat.temperature"),
        ({"chat.backend": "magic"}, "chat.backend"),
        ({"diffusion.width": 10_000}, "diffusion.width"),
        ({"loop.bogus": 1}, "loop.bogus"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"invalid config: {field}: "):
        load_config(None, overrides)


def test_bad_env_value_names_the_field(monkeypatch):
    monkeypatch.setenv("ARTLOOP_LOOP__MAX_ITERS", "lots")
    with pytest.raises(ConfigError, match="loop.max_iters"):
        load_config()


def test_bad_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[loop\nmax_iters = ")
    with pytest.raises(ConfigError, match="invalid config file"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_api_key_is_masked(monkeypatch):
    monkeypatch.setenv("ARTLOOP_CHAT__API_KEY", "sk-secret")
    cfg = load_config()
    assert cfg.chat.api_key.get_secret_value() == "sk-secret"
    assert "sk-secret" not in str(cfg.public_dict()) and "sk-secret" not in repr(cfg)


def test_home_must_be_writable(tmp_path):
    assert ensure_home(tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is not writable"):
        ensure_home(blocker / "home")


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompts_are_rejected(prompt):
    with pytest.raises(ConfigError, match="prompt is empty"):
        validate_prompt(prompt)


def test_huge_prompt_is_rejected():
    with pytest.raises(ConfigError, match=f"limit is {MAX_PROMPT_CHARS}"):
        validate_prompt("fox " * 1000)
    assert validate_prompt("  a fox  ") == "a fox"


def test_the_scripted_backend_answers_from_its_scripts():
    """`chat.backend = "scripted"`: fixed answers per schema from custom_kwargs.scripts, the
    defaults for the rest; kwargs it cannot take are one ConfigError naming it."""
    answer = {"prompt": "a fox, scripted", "negative_prompt": "blur"}
    cfg = ChatConfig(backend="scripted", custom_kwargs={"scripts": {"EnhancedPrompt": [answer]}})
    chat = build_chat_model(cfg)
    assert agents.enhance(chat, "a fox").output.model_dump() == answer
    image = Image.new("RGB", (64, 64))
    assert agents.data_cot(chat, image, "a fox", measure(image)).output.objects  # defaults
    assert chat_identity(cfg)["backend"] == "scripted"
    with pytest.raises(ConfigError, match="ScriptedChat refused them: scripts"):
        build_chat_model(ChatConfig(backend="scripted", custom_kwargs={"scripts": 3}))
