"""The effect study as an experiment file ([train]: collect, export, choose a learning rate,
train LoRAs, draw with each and no loop). Fast: a [train] table's mistakes are one line each,
and bench/shapes_effect.toml (the full-size study) resolves. Slow: bench/shapes_effect_ci.toml,
the study in miniature, end to end through `artloop experiment run`; a rerun redoes nothing, and
a changed training setting is refused naming the column and the setting.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from artloop.cli import app
from artloop.experiments.spec import ExperimentError, load_experiment
from artloop.store.trajectories import TrajectoryStore
from typer.testing import CliRunner

BENCH = Path(__file__).resolve().parents[1] / "bench"
CI_FILE = (BENCH / "shapes_effect_ci.toml").read_text(encoding="utf-8")
COLUMNS = ["baseline", "loop", "sft-seed0", "dpo-seed0"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "effect.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_full_study_resolves(tmp_path):
    exp = load_experiment(BENCH / "shapes_effect.toml", tmp_path)
    assert exp.variants == ["baseline", "loop", "sft-seed0", "sft-seed1", "sft-seed2"]
    plan = exp.train
    assert len(exp.prompts) == 30 and len(plan.prompts) == 120 and len(plan.validation) == 20
    assert list(plan.trials) == ["train:sft-lr0.0003", "train:sft-lr0.001"]
    assert exp.configs["loop"].chat.model == "tiny-shapes-qwen2vl"
    lora = exp.configs["sft-seed1"].diffusion.lora
    assert lora.path == exp.directory / "train" / "loras" / "sft-seed1" and lora.scale == 1.0
    assert exp.configs["sft-seed1"].loop.max_iters == 1  # no loop: the baseline's settings
    assert exp.records["sft-seed1"]["diffusion"]["lora"]["path"] == "train/loras/sft-seed1"
    assert plan.select_by == "shapes"  # none given: the first scorer


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (('collect_from = "loop"', 'collect_from = "nope"'), "train.collect_from: 'nope' is not"),
        (('set = "shapes-train"', 'set = "shapes"'), "train.prompts: 3 of them are evaluation"),
        (("train_steps = 4", "train_steps = 4\nranks = 4"), "train.sft: unknown field 'ranks'"),
        (("train_steps = 4", "train_steps = 4\nseed = 3"), "train.sft.seed: set by the [train]"),
        (("batch_size = 2\ncheck", "batch_size = 0\ncheck"), "SFTConfig.batch_size: invalid"),
        (("beta = 10.0", "beta = 0.0"), "DPOConfig.beta: invalid value"),
        (("[1e-3, 1e-2]", '["fast"]'), "train.sft.learning_rate: a number, or a list"),
        (('[train.validation]\nset = "shapes-val"\nlimit = 2\n', ""), "train.validation: several"),
        (("[variants.loop]", "[variants.loop]\n[variants.sft-seed0]"), "'sft-seed0': the name"),
        (("concurrency = 4", "concurrency = 4\nbaseline = false"), "needs the baseline"),
        (("training_seeds = [0]", "training_seeds = [0, 0]"), "a seed is listed twice"),
    ],
)
def test_train_mistakes_are_one_line(tmp_path, change, words):
    old, new = change
    assert old in CI_FILE
    with pytest.raises(ExperimentError) as e:
        load_experiment(write(tmp_path, CI_FILE.replace(old, new)), tmp_path)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_bad_train_table_creates_nothing(tmp_path):
    path = write(tmp_path, CI_FILE.replace("train_steps = 4", "train_steps = 0"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["experiment", "run", str(path), "--out", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.sft: SFTConfig.train_steps: invalid value 0" in lines[0]
    assert not out.exists()


def files(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file the stages and the runs wrote, with its modification time and size (the
    report, and the experiment's own state rewritten by every run, left out)."""
    skip = {"experiment.json", "experiment.toml"}
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in directory.rglob("*")
        if p.is_file() and "report" not in p.parts and p.name not in skip
    }


@pytest.mark.slow
def test_the_effect_study_in_miniature(tmp_path):
    out = tmp_path / "effect"
    command = ["experiment", "run", str(BENCH / "shapes_effect_ci.toml"), "--out", str(out), "-q"]
    start = time.monotonic()
    result = CliRunner().invoke(app, command)
    wall = time.monotonic() - start
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert wall < 120, f"the study in miniature took {wall:.0f} s"
    summary = json.loads(result.stdout)
    assert list(summary["columns"]) == COLUMNS
    assert all((c["done"], c["failed"]) == (6, 0) for c in summary["columns"].values())

    # Every stage ran: 4 collection sessions (tagged), both exports, a rate chosen between two
    # trial LoRAs drawn on 2 validation captions x 2 seeds, an sft and a dpo LoRA.
    train = summary["train"]
    assert train == json.loads((out / "train" / "train.json").read_text())
    assert train["collect"]["sessions"] == 4 and train["collect"]["accepted"] == 4
    assert all(train["data"][fmt]["rows"] > 0 for fmt in ("sft", "dpo"))
    choice = train["choice"]["sft"]
    assert choice["cells"] == 4 and set(choice["means"]) == {"0.001", "0.01"}
    best = max(choice["means"], key=choice["means"].get)
    assert choice["learning_rate"] == float(best)
    store = TrajectoryStore(out, create=False)
    runs = store.list_runs(limit=-1)
    by_variant = {}
    for run in runs:
        tags = store.get_run(run["run_id"])["config"]["tags"]
        variant = next(t.removeprefix("variant:") for t in tags if t.startswith("variant:"))
        by_variant.setdefault(variant, []).append(tags)
    assert {v: len(t) for v, t in by_variant.items()} == {
        "train:collect": 4, "train:sft-lr0.001": 4, "train:sft-lr0.01": 4,
        "baseline": 6, "loop": 6, "sft-seed0": 6, "dpo-seed0": 6,
    }  # fmt: skip
    assert all("stage:collect" in t for t in by_variant["train:collect"])
    chosen = out / "train" / "trials" / f"sft-lr{best}" / "pytorch_lora_weights.safetensors"
    for column in ("sft-seed0", "dpo-seed0"):
        lora = out / "train" / "loras" / column / "pytorch_lora_weights.safetensors"
        digest = hashlib.sha256(lora.read_bytes()).hexdigest()
        assert train["loras"][column]["sha256"] == digest
        state = json.loads((out / "experiment.json").read_text())
        cell = next(c for c in state["cells"] if c["variant"] == column)
        drawn = store.get_run(cell["run_id"])["models"]["diffusion"]["lora"]
        assert drawn["sha256"] == digest and drawn["path"] == str(lora)
    assert chosen.read_bytes() == (out / "train/loras/sft-seed0" / chosen.name).read_bytes()

    # The LoRA columns are scored, and set beside the loop's gain over the baseline.
    report = json.loads((out / "report" / "report.json").read_text())
    assert all(report["means"]["shapes"][n]["n"] == 6 for n in COLUMNS)
    shares = report["lora_share"]["shapes"]
    assert shares["loop"] == "loop" and set(shares["columns"]) == {"sft-seed0", "dpo-seed0"}
    for r in shares["columns"].values():
        assert r["change"]["n"] == r["loop_gain"]["n"] == r["share"]["n"] == 6
        if r["loop_gain"]["diff"]:
            ratio = r["change"]["diff"] / r["loop_gain"]["diff"]
            assert r["share"]["share"] == pytest.approx(ratio)
    assert set(shares["trainers"]) == {"sft", "dpo"}
    assert report["cost"]["sft-seed0"]["accepted"] is None  # no loop: nothing to accept
    markdown = (out / "report" / "report.md").read_text()
    assert "share of the loop's gain [95% CI]" in markdown and "## Training" in markdown
    assert "mean share of the loop's gain over 1 training seed(s)" in markdown
    html = (out / "report" / "index.html").read_text()
    assert "The LoRAs against the loop they learnt from, loop" in html
    assert "<h2>Training</h2>" in html

    # A rerun redoes nothing: no session, export, training or score; not a file touched.
    before = files(out)
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, (again.stderr, again.exception)
    rerun = json.loads(again.stdout)
    assert all((c["done"], c["skipped"]) == (0, 6) for c in rerun["columns"].values())
    assert rerun["scored"] == 0 and rerun["train"] == train
    assert files(out) == before

    # A training setting changed afterwards: refused, naming the column and the setting.
    changed = write(tmp_path, CI_FILE.replace("train_steps = 4", "train_steps = 5"))
    drifted = CliRunner().invoke(app, ["experiment", "run", str(changed), "--out", str(out)])
    assert drifted.exit_code == 2
    line = drifted.stderr.strip()
    assert "variant 'sft-seed0'" in line and "train.options.train_steps" in line, line
    assert files(out) == before
