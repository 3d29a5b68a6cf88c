"""The scorer registry (issue 17): what a registered reward records of itself, where scorers run
and which weights they load, composites (AGFSync's and any weights), third-party scorers by
"package.module:function", by `scorers.plugins` alone and by the `artloop.rewards` entry points,
and the one-line errors for each bad name."""

from __future__ import annotations

import os
import sys
import textwrap
import uuid

import numpy as np
import pytest
from artloop.cli import app
from artloop.config import ConfigError, ScorersConfig, load_config
from artloop.graphs.context import check_judge
from artloop.rewards import (
    AGFSYNC,
    PRESETS,
    REWARDS,
    UnknownRewardError,
    configure_scorers,
    get_reward,
    judge_by_reward,
    judge_reward,
    registry,
    reward,
    reward_entry,
    scorer_device,
    scorer_model,
    scorers_config,
)
from artloop.store.trajectories import TrajectoryStore
from artloop.trainers.common import TrainerConfigError
from artloop.trainers.ddpo import DDPOConfig
from PIL import Image
from typer.testing import CliRunner

GREY = Image.new("RGB", (32, 32), (64, 64, 64))  # brightness 64/255
WHITE = Image.new("RGB", (32, 32), (255, 255, 255))
B = 64 / 255


@pytest.fixture(autouse=True)
def registry_state(monkeypatch):
    """Each test starts from the environment's scorers section (none set) and leaves the
    registry as it found it: what it registered, plugins and imports included."""
    for var in [v for v in os.environ if v.startswith("ARTLOOP_SCORERS__")]:
        monkeypatch.delenv(var)
    saved = dict(REWARDS), dict(registry._plugins), dict(registry._imported)
    configure_scorers(None)
    yield
    configure_scorers(None)
    for live, before in zip((REWARDS, registry._plugins, registry._imported), saved, strict=True):
        live.clear()
        live.update(before)


def module(tmp_path, monkeypatch, body: str) -> str:
    """A module of `body` importable from tmp_path (a fresh name per call); its name."""
    name = f"artloop_test_scorers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)  # and gone again after the test
    return name


PLUGIN = """
    import numpy as np

    def plug_score(images, prompts, metadata):
        # twice the mean luma: on 0-2
        return np.array([2 * np.asarray(im.convert("L")).mean() / 255 for im in images]), {
            "plugged": len(images)
        }

    plug_score.range = (0.0, 2.0)
    plug_score.model = {"id": "test/plug", "revision": "local", "sha256": "0123456789abcdef"}

    def unscaled(images, prompts, metadata):
        return np.ones(len(images)), {}

    def lower(images, prompts, metadata):
        return np.array([np.asarray(im.convert("L")).mean() / 255 for im in images]), {}

    lower.range = (0, 1)
    lower.higher_is_better = False

    NOT_A_FUNCTION = 3
"""


# --- what an entry records -----------------------------------------------------------------------
def test_identity_carries_range_direction_and_the_models_identity():
    weights = {"id": "org/scorer", "revision": "abc123", "sha256": "0123456789abcdef"}
    calls = []

    def model():
        calls.append(1)
        return weights

    reward("t-modelled", range=(1.0, 10.0), higher_is_better=False, model=model)(
        REWARDS["brightness"].fn
    )
    assert calls == []  # registering computes nothing
    assert reward_entry("t-modelled").identity() == {
        "name": "t-modelled",
        "range": (1.0, 10.0),
        "higher_is_better": False,
        "model": weights,
    }
    assert reward_entry("brightness").identity() == {
        "name": "brightness",
        "range": (0.0, 1.0),
        "higher_is_better": True,
        "model": None,
    }


def test_scorer_device_and_model_follow_the_scorers_section(monkeypatch):
    import torch

    assert scorer_device() == ("cuda" if torch.cuda.is_available() else "cpu", "float32")
    assert scorers_config().batch_size == 16
    monkeypatch.setenv("ARTLOOP_SCORERS__DEVICE", "cpu")
    monkeypatch.setenv("ARTLOOP_SCORERS__DTYPE", "bfloat16")
    monkeypatch.setenv("ARTLOOP_SCORERS__MODELS", '{"clip": "tiny-clip"}')
    assert scorer_device() == ("cpu", "bfloat16")
    assert scorer_model("clip", "openai/clip-vit-large-patch14") == "tiny-clip"
    assert scorer_model("pickscore", "yuvalkirstain/PickScore_v1") == "yuvalkirstain/PickScore_v1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    configure_scorers(ScorersConfig(dtype="float16"))  # a file's section wins over the env
    assert scorer_device() == ("cuda", "float16")
    configure_scorers(ScorersConfig(device="cuda:1"))
    assert scorer_device() == ("cuda:1", "float32")
    with pytest.raises(ConfigError, match="scorers.plugins: 'nope' is not 'package.module:"):
        load_config(overrides={"scorers.plugins": ["nope"]})


# --- composites ----------------------------------------------------------------------------------
def test_composite_is_a_weighted_sum_of_range_normalised_scores():
    reward("t-lower", range=(0.0, 2.0), higher_is_better=False)(
        lambda ims, p, m: (np.array([2 * np.asarray(i.convert("L")).mean() / 255 for i in ims]), {})
    )
    name = "composite:brightness=3,darkness=1,t-lower=4"  # weights 3/8, 1/8, 4/8
    entry = reward_entry(name)
    scores, info = entry.fn([GREY, WHITE], ["a", "b"], [{}, {}])
    # brightness B, darkness 1 - B, t-lower 2B on 0-2 lower the better: 1 - B
    expected = [(3 * B + 1 * (1 - B) + 4 * (1 - B)) / 8, 3 / 8]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)  # luma in float32
    assert info["weights"] == {"brightness": 0.375, "darkness": 0.125, "t-lower": 0.5}
    assert info["scores"]["t-lower"] == pytest.approx([2 * B, 2.0])
    assert info["units"]["t-lower"] == pytest.approx([1 - B, 0.0])
    assert (entry.range, entry.higher_is_better) == ((0.0, 1.0), True)
    identity = entry.identity()
    assert identity["name"] == name and identity["range"] == (0.0, 1.0)
    assert identity["model"]["weights"] == info["weights"]
    assert identity["model"]["parts"]["t-lower"]["range"] == (0.0, 2.0)
    # a composite judges the loop: its own range is (0, 1)
    assert judge_reward(name) is not None
    verdict = judge_by_reward(WHITE, GREY, "a fox", name, accept_score=5.0).output
    assert verdict.better_than_before and verdict.verdict == "accept"
    assert verdict.score == pytest.approx(10 * scores[0], abs=0.05)
    # a composite of composites: the inner one is a part on 0-1
    outer = reward_entry("composite:composite:brightness=1=1,darkness=1")
    assert outer.fn([WHITE], ["a"], [{}])[0].tolist() == pytest.approx([0.5])


def test_presets_resolve_lazily_from_the_registry_and_the_config(monkeypatch):
    # the authors' released build_dataset.py (rewards/composite.py cites the commit and lines)
    assert PRESETS["agfsync"] is AGFSYNC and AGFSYNC == {"clip": 0.85, "aesthetic": 0.15}
    assert PRESETS["agfsync-vqa"] == {"aesthetic": 0.3, "vqa": 0.7}
    paper = PRESETS["agfsync-paper"]  # recalled, unconfirmed: VQA, CLIP and aesthetic
    assert set(paper) == {"vqa", "clip", "aesthetic"} and sum(paper.values()) == pytest.approx(1)
    # a preset whose parts are not registered yet resolves once they are
    configure_scorers(ScorersConfig(composites={"later": {"t-late": 1.0, "brightness": 1.0}}))
    with pytest.raises(ValueError, match="composite 'composite:later': part 't-late': unknown"):
        reward_entry("composite:later")
    reward("t-late", range=(0.0, 1.0))(REWARDS["darkness"].fn)
    assert reward_entry("composite:later").fn([GREY], ["a"], [{}])[0].tolist() == [
        pytest.approx(0.5)
    ]
    assert "composite:later" in str(pytest.raises(ValueError, judge_reward, "sharpness").value)
    # AGFSync's presets on the three scorers' units (stand-ins here, whichever of clip,
    # aesthetic and vqa are registered already): each part on [0, 1] by its range, then weighted
    for name, value in {"vqa": 1.0, "clip": 50.0, "aesthetic": 10.0}.items():
        lo, hi = {"vqa": (0.0, 1.0), "clip": (0.0, 100.0), "aesthetic": (1.0, 10.0)}[name]
        fn = (lambda v: lambda ims, p, m: (np.full(len(ims), v), {}))(value)
        monkeypatch.setitem(REWARDS, name, registry.Reward(name, fn, range=(lo, hi)))
    scores, _ = get_reward("composite:agfsync")([GREY], ["a"], [{}])
    assert scores.tolist() == [pytest.approx(0.85 / 2 + 0.15)]
    scores, _ = get_reward("composite:agfsync-paper")([GREY], ["a"], [{}])
    assert scores.tolist() == [pytest.approx(paper["vqa"] + paper["clip"] / 2 + paper["aesthetic"])]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("composite:brightness=0,darkness=0", "weights sum to 0, not to a positive number"),
        ("composite:brightness=-1,darkness=2", "the weight of 'brightness' is negative"),
        ("composite:brightness=x", "the weight of 'brightness', 'x', is not a number"),
        (
            "composite:brightness",
            "unknown composite preset 'brightness'; choose from agfsync, agfsync-paper, agfsync-vqa",
        ),
        ("composite:brightness=1,brightness=2", "names 'brightness' twice"),
        ("composite:", "names no preset and no weights"),
        ("composite:brightness=1,nope=1", "part 'nope': unknown reward 'nope'; choose from"),
        (
            "composite:brightness=1,sharpness=1",
            "part 'sharpness' has no declared range (or normaliser)",
        ),
    ],
)
def test_bad_composites_are_one_line_errors_naming_the_problem(name, message):
    with pytest.raises(ValueError) as e:
        reward_entry(name)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:  # and as the loop's judge, a config error
        check_judge(load_config(overrides={"loop.judge": name}).loop)
    assert str(e.value).startswith("loop.judge: ") and message in str(e.value)


def test_a_preset_that_includes_itself_is_refused():
    configure_scorers(ScorersConfig(composites={"loop": {"composite:loop": 1.0}}))
    with pytest.raises(ValueError, match="'composite:loop' includes itself"):
        reward_entry("composite:loop")


# --- names and their errors ----------------------------------------------------------------------
def test_unknown_names_are_one_line_value_and_key_errors_listing_the_choices():
    for kind in (ValueError, KeyError):
        with pytest.raises(kind) as e:
            get_reward("beauty")
        assert isinstance(e.value, UnknownRewardError)
    message = str(e.value)
    assert message.startswith("unknown reward 'beauty'; choose from aesthetic, brightness, clip, ")
    assert "composite:agfsync" in message and "package.module:function" in message
    with pytest.raises(TrainerConfigError, match="DDPOConfig.reward: unknown reward 'beauty'"):
        DDPOConfig(data="x", reward="beauty")
    with pytest.raises(ConfigError, match="loop.judge: unknown judge 'beauty'; a judge is vlm"):
        check_judge(load_config(overrides={"loop.judge": "beauty"}).loop)


def test_third_party_scorers_by_package_module_function(tmp_path, monkeypatch):
    mod = module(tmp_path, monkeypatch, PLUGIN)
    entry = reward_entry(f"{mod}:plug_score")
    assert entry.range == (0.0, 2.0) and entry.higher_is_better
    assert entry.identity()["model"] == {
        "id": "test/plug",
        "revision": "local",
        "sha256": "0123456789abcdef",
    }
    scores, info = entry.fn([GREY, WHITE], ["a", "b"], [{}, {}])
    assert scores.tolist() == pytest.approx([2 * B, 2.0]) and info == {"plugged": 2}
    assert reward_entry(f"{mod}:plug_score") is entry  # imported once
    lower = judge_reward(f"{mod}:lower")  # a third-party scorer with a range judges
    assert not lower.higher_is_better and lower.unit(0.25) == pytest.approx(0.75)
    with pytest.raises(ValueError, match=f"reward '{mod}:unscaled' has no declared range"):
        judge_reward(f"{mod}:unscaled")
    mixed = reward_entry(f"composite:{mod}:plug_score=1,brightness=1")
    assert mixed.fn([WHITE], ["a"], [{}])[0].tolist() == pytest.approx([1.0])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("artloop_no_such_pkg.scores:fn", "package 'artloop_no_such_pkg' is not installed"),
        ("json.no_such_module:fn", "module 'json.no_such_module' not found"),
        ("{mod}:nope", "module '{mod}' has no attribute 'nope'"),
        ("{mod}:NOT_A_FUNCTION", "is not callable (it is a int)"),
        ("{mod}:plug score", "is not 'package.module:function'"),
    ],
)
def test_bad_third_party_names_are_one_line_errors(tmp_path, monkeypatch, spec, message):
    mod = module(tmp_path, monkeypatch, PLUGIN)
    spec, message = spec.format(mod=mod), message.format(mod=mod)
    with pytest.raises(ValueError) as e:
        reward_entry(spec)
    assert message in str(e.value) and spec in str(e.value) and "\n" not in str(e.value)
    assert not isinstance(e.value, KeyError)  # it is known, it cannot load
    with pytest.raises(TrainerConfigError, match="DDPOConfig.reward: scorer "):
        DDPOConfig(data="x", reward=spec)


def test_a_plugin_from_the_config_alone(tmp_path, monkeypatch):
    mod = module(tmp_path, monkeypatch, PLUGIN)
    monkeypatch.setenv("ARTLOOP_SCORERS__PLUGINS", f'["{mod}:plug_score", "dim={mod}:lower"]')
    assert "plug_score" not in REWARDS and mod not in sys.modules  # nothing loads before a lookup
    assert get_reward("plug_score")([WHITE], ["a"], [{}])[0].tolist() == pytest.approx([2.0])
    assert REWARDS["plug_score"].range == (0.0, 2.0)
    assert judge_reward("dim").higher_is_better is False  # registered under the name given
    assert DDPOConfig(data="x", reward="plug_score").reward == "plug_score"
    check_judge(load_config(overrides={"loop.judge": "dim"}).loop)
    # a plugin may not shadow a built-in, and a broken one says which entry it is
    configure_scorers(ScorersConfig(plugins=[f"{mod}:lower", f"brightness={mod}:lower"]))
    with pytest.raises(ValueError, match=f"'brightness={mod}:lower' would replace the reward"):
        get_reward("anything")
    configure_scorers(ScorersConfig(plugins=["artloop_no_such_pkg:fn"]))
    with pytest.raises(ValueError, match="scorers.plugins entry 'artloop_no_such_pkg:fn': package"):
        get_reward("anything")


def test_an_entry_point_scorer(tmp_path, monkeypatch):
    """A package that declares `[artloop.rewards] ep-bright = module:function` (a real
    dist-info on sys.path) provides the name ep-bright, loaded on its first lookup."""
    mod = module(tmp_path, monkeypatch, PLUGIN)
    dist = tmp_path / "artloop_test_scorers-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: artloop-test-scorers\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(
        f"[artloop.rewards]\nep-bright = {mod}:plug_score\nep-broken = artloop_no_such_pkg:fn\n"
    )
    assert "ep-bright" in registry.available() and mod not in sys.modules
    entry = judge_reward("ep-bright")
    assert entry.name == "ep-bright" and entry.range == (0.0, 2.0) and REWARDS["ep-bright"] is entry
    assert entry.identity()["model"]["id"] == "test/plug"
    with pytest.raises(ValueError, match="entry point 'ep-broken' .*package 'artloop_no_such_pkg'"):
        get_reward("ep-broken")


# --- the loop's judge from the command line ----------------------------------------------------
def test_cli_run_judged_by_a_composite_of_a_plugin_and_a_registered_reward(tmp_path, monkeypatch):
    mod = module(tmp_path, monkeypatch, PLUGIN)
    reward("t-bright", range=(0.0, 1.0))(REWARDS["brightness"].fn)
    home = tmp_path / "home"
    config = tmp_path / "artloop.toml"
    config.write_text(
        f'home = "{home}"\n[chat]\nbackend = "scripted"\n'
        '[diffusion]\nmodel = "tiny-sd"\nwidth = 64\nheight = 64\nsteps = 2\n[loop]\nmax_iters = 1\n'
        f'[scorers]\nplugins = ["{mod}:plug_score"]\n'
    )
    judge = "composite:plug_score=0.6,t-bright=0.4"
    result = CliRunner().invoke(
        app, ["run", "a fox", "--judge", judge, "--config", str(config), "--json", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    # the file's scorers section was that command's: the registry is back on the environment's
    assert scorers_config().plugins == []
    store = TrajectoryStore(home)
    (summary,) = store.list_runs()
    run = store.get_run(summary["run_id"])
    step = run["steps"][0]
    assert run["config"]["loop"]["judge"] == judge
    assert step["parse_failures"]["validate"] == {f"reward:{judge}": 0}
    # the score is 10 x the composite of the image kept (the better of the two)
    configure_scorers(ScorersConfig(plugins=[f"{mod}:plug_score"]))
    composite = get_reward(judge)
    images = [store.images.get(step["image"]), store.images.get(step["edited_image"])]
    values, _ = composite(images, ["a fox"] * 2, [{}, {}])
    assert step["score"] == pytest.approx(10 * max(values), abs=0.051)
    assert f"{judge} " in step["agents"]["validate"]["reasons"][0]
