"""Config: TOML < environment < flags; bad values name the field; home and prompt checks."""

from __future__ import annotations

import pytest
from artloop.config import MAX_PROMPT_CHARS, ConfigError, ensure_home, load_config, validate_prompt


def test_defaults_are_the_tiny_embedded_stack(monkeypatch):
    monkeypatch.delenv("ARTLOOP_HOME", raising=False)
    cfg = load_config()
    assert (cfg.chat.backend, cfg.chat.model, cfg.diffusion.model) == (
        "inprocess",
        "tiny-qwen2vl",
        "tiny-sd",
    )
    assert cfg.home.name == ".artloop"


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
