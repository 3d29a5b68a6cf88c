"""ArtAug's rounds (`artloop rounds`, experiments/rounds.py). Fast: a ROUNDS file resolves into
one experiment per round, round N's model being the base with rounds 1..N-1's LoRAs, and its
mistakes are one line each. Slow: bench/shapes_rounds_ci.toml, two rounds end to end through the
CLI, stopped after round 1 and run again: round 1 is not redone, round 2 collects with round 1's
LoRA (its runs' model identity lists it), and the rounds table has both rounds.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from artloop.cli import app
from artloop.experiments import rounds as rounds_module
from artloop.experiments.rounds import load_rounds
from artloop.experiments.spec import ExperimentError
from artloop.store.trajectories import TrajectoryStore
from typer.testing import CliRunner

BENCH = Path(__file__).resolve().parents[1] / "bench"
CI_FILE = (BENCH / "shapes_rounds_ci.toml").read_text(encoding="utf-8")
LORA = "pytorch_lora_weights.safetensors"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rounds.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_each_round_draws_with_the_earlier_rounds_loras(tmp_path):
    found = load_rounds(BENCH / "shapes_rounds_ci.toml", tmp_path, tmp_path / "out")
    one, two = found.experiments
    assert [e.name for e in found.experiments] == [
        "shapes-rounds-ci-round1",
        "shapes-rounds-ci-round2",
    ]
    assert one.directory == tmp_path / "out" / "round-1"
    assert one.configs["loop"].diffusion.lora is None  # round 1 collects on the base model
    lora1 = tmp_path / "out" / "round-1" / "train" / "loras" / "sft-seed0"
    lora2 = tmp_path / "out" / "round-2" / "train" / "loras" / "sft-seed0"
    assert one.configs["sft-seed0"].diffusion.lora.path == lora1  # after round 1: base + LoRA 1
    for column in ("loop", "baseline"):  # round 2 collects with LoRA 1, and starts from it
        assert two.configs[column].diffusion.lora.path == lora1
    assert two.configs["sft-seed0"].diffusion.lora.path == [lora1, lora2]
    assert two.configs["baseline"].loop.max_iters == 1  # no loop
    assert one.train.base_model is None  # round 1 trains on the base model,
    assert two.train.base_model == str(two.directory / "train" / "base")  # round 2 on it + LoRA 1
    assert len(one.prompts) == 3 and len(one.train.prompts) == 4
    assert one.train.options["sft"].get("differential", False) == found.differential


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (("learning_rate = 1e-3", "learning_rate = [1e-3, 1e-2]"), "one rate (each round"),
        (("train_steps = 4", "train_steps = 4\nseed = 3"), "train.sft.seed: set by the rounds"),
        (("train_steps = 4", "train_steps = 0"), "SFTConfig.train_steps: invalid value 0"),
        (("rounds = 2", "rounds = 0"), "rounds: Input should be greater than or equal to 1"),
        (("rounds = 2", "rounds = 2\nepochs = 3"), "epochs: not a rounds field"),
        (('set = "shapes-train"', 'set = "shapes"'), "train.prompts: 3 of them are evaluation"),
        (('scorers = ["shapes"]', 'scorers = ["nope"]'), "scorers: "),
        (("accepted_only = true", "top_fraction = 2.0"), "filter.top_fraction: Input should be"),
    ],
)
def test_mistakes_are_one_line(tmp_path, change, words):
    old, new = change
    assert old in CI_FILE
    with pytest.raises(ExperimentError) as e:
        load_rounds(write(tmp_path, CI_FILE.replace(old, new)), tmp_path)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_differential_follows_the_trainer(tmp_path, monkeypatch):
    """auto: differential training where `artloop train sft` has it, plain sft where not; asked
    for where it has not, one line."""
    monkeypatch.setattr(rounds_module, "differential_supported", lambda: False)
    found = load_rounds(BENCH / "shapes_rounds_ci.toml", tmp_path)
    assert (
        not found.differential and "differential" not in found.experiments[0].train.options["sft"]
    )
    path = write(
        tmp_path, CI_FILE.replace("[train.sft]", "[train]\ndifferential = true\n[train.sft]")
    )
    with pytest.raises(ExperimentError, match="has no --differential"):
        load_rounds(path, tmp_path)
    monkeypatch.setattr(rounds_module, "differential_supported", lambda: True)
    found = load_rounds(BENCH / "shapes_rounds_ci.toml", tmp_path)
    assert found.differential and found.experiments[1].train.options["sft"]["differential"]


def test_the_filters_reach_the_export_and_the_loras_hash(tmp_path):
    """[filter] becomes the export's filters, and part of what the LoRA column's hash is of: a
    changed filter is refused like any changed setting; the collection is not affected."""
    plain = load_rounds(BENCH / "shapes_rounds_ci.toml", tmp_path).experiments[0]
    path = write(tmp_path, CI_FILE.replace("min_gain = 0.0", "min_gain = 0.5\ntop_fraction = 0.5"))
    strict = load_rounds(path, tmp_path).experiments[0]
    assert plain.train.filters == {"min_gain": 0.0}
    assert strict.train.filters == {"min_gain": 0.5, "top_fraction": 0.5}
    assert strict.hashes["sft-seed0"] != plain.hashes["sft-seed0"]
    assert strict.hashes["loop"] == plain.hashes["loop"]


def files(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in directory.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_two_rounds_stopped_after_the_first_and_resumed(tmp_path):
    out = tmp_path / "rounds"
    command = ["rounds", str(BENCH / "shapes_rounds_ci.toml"), "--out", str(out), "-q"]
    start = time.monotonic()
    first = CliRunner().invoke(app, [*command, "--stop-after", "1"])
    assert first.exit_code == 0, (first.stderr, first.exception)
    table = json.loads(first.stdout)
    assert table["done"] == 1 and [r["round"] for r in table["rows"]] == [0, 1]
    assert (out / "round-1" / "round.json").is_file() and not (out / "round-2").exists()
    assert "stopped after round 1 of 2" in first.stderr
    kept = files(out / "round-1")
    lora1 = out / "round-1" / "train" / "loras" / "sft-seed0" / LORA

    second = CliRunner().invoke(app, command)
    wall = time.monotonic() - start
    assert second.exit_code == 0, (second.stderr, second.exception)
    assert wall < 120, f"two rounds took {wall:.0f} s"
    assert files(out / "round-1") == kept  # round 1 was not redone, nor written to
    table = json.loads(second.stdout)
    assert table == json.loads((out / "rounds.json").read_text())
    assert table["done"] == 2 and [r["round"] for r in table["rows"]] == [0, 1, 2]

    # Round 2 collected with round 1's LoRA: its sessions' model identity lists it; its LoRA
    # column draws with both, in order; its LoRA learnt on the base with LoRA 1 fused in.
    lora2 = out / "round-2" / "train" / "loras" / "sft-seed0" / LORA
    store = TrajectoryStore(out / "round-2", create=False)
    drawn: dict[str, list] = {}
    for run in store.list_runs(limit=-1):
        run = store.get_run(run["run_id"])
        variant = next(t for t in run["config"]["tags"] if t.startswith("variant:"))
        drawn.setdefault(variant, []).append(run["models"]["diffusion"].get("lora"))
    assert {v: len(d) for v, d in drawn.items()} == {
        "variant:train:collect": 4, "variant:baseline": 6, "variant:sft-seed0": 6,
    }  # fmt: skip
    one = {"path": str(lora1), "sha256": sha(lora1), "scale": 1.0}
    assert all(d == one for d in drawn["variant:train:collect"] + drawn["variant:baseline"])
    two = {"path": str(lora2), "sha256": sha(lora2), "scale": 1.0}
    assert all(d == [one, two] for d in drawn["variant:sft-seed0"])
    fused = json.loads((out / "round-2" / "train" / "base" / "artloop_fused.json").read_text())
    assert fused["loras"] == [one]
    summary = json.loads((out / "round-2" / "round.json").read_text())
    assert summary["lora"]["trained_on"] == str(out / "round-2" / "train" / "base")

    # The table: each round's sessions, what the filter kept, its LoRA, and the evaluation
    # (6 held-out cells) against the round before, whose "after" is this round's "before".
    base, r1, r2 = table["rows"]
    for row, lora in ((r1, lora1), (r2, lora2)):
        assert (row["sessions"], row["accepted"], row["kept"]) == (4, 4, 4)
        assert row["lora"]["sha256"] == sha(lora)
        assert row["scores"]["shapes"]["mean"]["n"] == row["scores"]["shapes"]["change"]["n"] == 6
    before2 = summary["eval"]["shapes"]["before"]["mean"]
    assert before2 == pytest.approx(r1["scores"]["shapes"]["mean"]["mean"], abs=0.02)
    change = r2["scores"]["shapes"]["change"]["diff"]
    assert r2["scores"]["shapes"]["mean"]["mean"] == pytest.approx(before2 + change)
    assert base["scores"]["shapes"]["mean"]["n"] == 6
    markdown = (out / "rounds.md").read_text()
    assert "| 2 | base + 2 LoRA(s) | 4 | 4 | 4 | round-2/train/loras/sft-seed0" in markdown
    assert (out / "round-2" / "eval.md").is_file()

    # A finished run, run again, redoes nothing and writes nothing.
    everything = files(out)
    third = CliRunner().invoke(app, command)
    assert third.exit_code == 0, (third.stderr, third.exception)
    assert files(out) == everything
