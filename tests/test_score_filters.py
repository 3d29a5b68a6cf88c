"""Export filters by a scorer's score of each run's best image (issue 17, item 3c):
`--min-score NAME=V` (repeatable), `--top-fraction F --by NAME`, cached per image under the home,
the scorers' identities on the card; an unknown scorer is one line, exit 2, nothing written.

The runs are written straight into a store (no loop): flat grey images of known brightness."""

from __future__ import annotations

import json

import pytest
from artloop.cli import app
from artloop.graphs import scoring
from artloop.rewards.registry import REWARDS, reward
from artloop.store.export import ExportError, ExportFilters, provenance, select_runs
from artloop.store.trajectories import TrajectoryStore
from PIL import Image
from typer.testing import CliRunner

LEVELS = {"a" * 16: 30, "b" * 16: 100, "c" * 16: 160, "d" * 16: 230}  # run id -> grey level


@pytest.fixture
def grey_store(tmp_path):
    store = TrajectoryStore(tmp_path / "home")
    for run_id, level in LEVELS.items():
        digest = store.images.put(Image.new("RGB", (16, 16), (level,) * 3))
        store.create_run(run_id, f"grey {level}", {"tags": []}, {"chat": {"id": "x"}}, "v1")
        step = {"iteration": 0, "image": digest, "result_image": digest, "score": 5.0}
        store.put_step(run_id, 0, step)
        store.finish_run(run_id, "accepted", final_image=digest, best_score=5.0)
    return store


@pytest.fixture
def counted():
    """A registered scorer that counts the images it scores (brightness, with a model id)."""
    calls: list[int] = []

    def fn(images, prompts, metadata):
        calls.append(len(images))
        return REWARDS["brightness"].fn(images, prompts, metadata)

    reward("test-counted", range=(0.0, 1.0), model=lambda: {"id": "test/counted", "sha256": "0"})(
        fn
    )
    yield calls
    REWARDS.pop("test-counted", None)


def invoke(store, out, *args):
    return CliRunner().invoke(
        app, ["export", str(out), "--format", "prompts", "--home", str(store.home), *args]
    )


def exported(out) -> list[str]:
    return sorted(json.loads(line)["run_id"][0] for line in open(out / "prompts.jsonl"))


def test_min_score_keeps_the_runs_whose_best_image_scores_at_least(grey_store, tmp_path):
    done = invoke(grey_store, tmp_path / "ds", "--min-score", "brightness=0.5")
    assert done.exit_code == 0, done.output
    assert exported(tmp_path / "ds") == ["c", "d"]
    # repeatable: every one must hold (darkness = 1 - brightness)
    both = invoke(
        grey_store, tmp_path / "ds2", "--min-score", "brightness=0.3", "--min-score", "darkness=0.5"
    )
    assert both.exit_code == 0, both.output
    assert exported(tmp_path / "ds2") == ["b"]
    card = provenance(tmp_path / "ds2")
    assert card["filters"]["min_scores"] == {"brightness": 0.3, "darkness": 0.5}
    assert set(card["scorers"]) == {"brightness", "darkness"}
    assert card["scorers"]["darkness"]["range"] == [0.0, 1.0]


def test_top_fraction_by_a_scorer(grey_store, tmp_path):
    done = invoke(grey_store, tmp_path / "ds", "--top-fraction", "0.5", "--by", "darkness")
    assert done.exit_code == 0, done.output
    assert exported(tmp_path / "ds") == ["a", "b"]  # the darkest half
    top = invoke(grey_store, tmp_path / "ds2", "--top-fraction", "0.25", "--by", "brightness")
    assert exported(tmp_path / "ds2") == ["d"], top.output


def test_scores_are_cached_per_image_and_the_card_names_the_model(grey_store, tmp_path, counted):
    first = invoke(grey_store, tmp_path / "one", "--min-score", "test-counted=0.5")
    assert first.exit_code == 0, first.output
    assert sum(counted) == 4 and (grey_store.home / scoring.CACHE).is_file()
    second = invoke(grey_store, tmp_path / "two", "--top-fraction", "0.5", "--by", "test-counted")
    assert second.exit_code == 0, second.output
    assert sum(counted) == 4  # nothing scored again
    assert exported(tmp_path / "two") == ["c", "d"]
    model = provenance(tmp_path / "two")["scorers"]["test-counted"]["model"]
    assert model == {"id": "test/counted", "sha256": "0"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--min-score", "no-such-scorer=1"], "'no-such-scorer'"),
        (["--top-fraction", "0.5", "--by", "no-such-scorer"], "'no-such-scorer'"),
        (["--min-score", "brightness"], "is not NAME=V"),
        (["--by", "brightness"], "--top-fraction, which is not given"),
    ],
)
def test_bad_scorer_input_is_one_line_and_writes_nothing(grey_store, tmp_path, args, message):
    before = sorted(p.name for p in grey_store.home.iterdir())
    done = invoke(grey_store, tmp_path / "ds", *args)
    assert done.exit_code == 2, done.output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "ds").exists()
    assert sorted(p.name for p in grey_store.home.iterdir()) == before  # no score cache either


def test_store_layer_needs_a_scorer_for_score_filters(grey_store):
    with pytest.raises(ExportError, match="need a scorer"):
        select_runs(grey_store, ExportFilters(min_scores=(("brightness", 0.5),)))
