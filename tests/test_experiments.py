"""The experiment harness without running the loop: the statistics on constructed scores, the
prompt sets (local files, the shapes set, the named sets offline), the experiment file's
checks (each bad input one line, nothing created), run ids and config drift, and the help that
lists every field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from artloop.cli import app
from artloop.experiments.prompt_sets import (
    PromptSetError,
    load_prompts,
    read_file,
    shapes_set,
)
from artloop.experiments.runner import check_drift, prepare
from artloop.experiments.schema import ExperimentError, ExperimentFile, Prompts
from artloop.experiments.spec import load_experiment, run_id
from artloop.experiments.stats import excludes_zero, mean_ci, paired, sign_flip_p
from artloop.world.language import parse
from typer.testing import CliRunner, Result


# --- statistics ----------------------------------------------------------------------------------
def test_a_known_difference_is_found():
    rng = np.random.default_rng(1)
    control = rng.uniform(0.2, 0.8, 40)
    treatment = control + 0.1 + rng.normal(0, 0.03, 40)  # better by 0.1 on every pair, noisily
    result = paired(treatment, control)
    assert result["n"] == 40 and abs(result["diff"] - 0.1) < 0.02
    assert excludes_zero(result) and result["lo"] > 0.05 and result["p"] < 0.001
    assert result["win"] > 0.95 and result["tie"] == 0.0
    # The means alone, unpaired, overlap: pairing is what finds it.
    a, b = mean_ci(treatment), mean_ci(control)
    assert a["lo"] < b["hi"]


def test_no_difference_gives_an_interval_that_covers_zero():
    rng = np.random.default_rng(2)
    control = rng.uniform(0.2, 0.8, 40)
    noise = rng.normal(0, 0.05, 20)
    treatment = control + np.concatenate([noise, -noise])  # differences symmetric about 0
    result = paired(treatment, control)
    assert result["lo"] < 0 < result["hi"] and not excludes_zero(result)
    assert result["p"] > 0.5
    same = paired(control, control)  # identical scores: all ties, p 1
    assert (same["diff"], same["tie"], same["p"]) == (0.0, 1.0, 1.0)


def test_win_rates_count_ties_apart_and_p_is_exact_for_few_pairs():
    result = paired([1.0, 1.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.4])
    assert (result["win"], result["tie"], result["loss"]) == (0.25, 0.5, 0.25)
    # Exact: of the 2^3 sign patterns of (1, 1, 1), two reach |mean| 1.
    assert sign_flip_p([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)
    assert mean_ci([0.3]) == {"n": 1, "mean": 0.3, "lo": 0.3, "hi": 0.3}
    assert mean_ci([])["mean"] is None and paired([], [])["p"] is None
    values = np.random.default_rng(3).uniform(size=30)
    assert mean_ci(values) == mean_ci(values)  # seeded: the same scores, the same interval
    big = np.random.default_rng(4).normal(0.05, 0.1, 200)  # Monte Carlo past 16 pairs
    assert 0 < sign_flip_p(big) < 0.01


# --- prompt sets ---------------------------------------------------------------------------------
def test_local_files_keep_categories_and_stable_ids(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red fox\n\na blue bird\na red fox\n")
    items = read_file(txt)
    assert [i.prompt for i in items] == ["a red fox", "a blue bird", "a red fox"]
    assert len({i.id for i in items}) == 3 and items[2].id == items[0].id + "-2"
    txt.write_text("a blue bird\na red fox\n")  # reordered: each prompt keeps its id
    assert {i.prompt: i.id for i in read_file(txt)} == {i.prompt: i.id for i in items[:2]}

    csv = tmp_path / "p.csv"
    csv.write_text('Prompt,Category\n"a cat, sleeping",Animals\na car,Vehicles|Colors\n')
    got = read_file(csv)
    assert [(i.prompt, i.categories) for i in got] == [
        ("a cat, sleeping", ("Animals",)),
        ("a car", ("Vehicles", "Colors")),
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        '{"prompt": "a cat", "category": "animals", "id": "c1"}\n{"prompt": "a car"}\n'
    )
    assert [(i.id, i.categories) for i in read_file(jsonl)][0] == ("c1", ("animals",))
    tifa = tmp_path / "tifa.json"
    tifa.write_text(
        json.dumps(
            [
                {"id": "coco_301091", "caption": "a surfer on a beach", "coco_val_id": "1"},
                {"id": "drawbench_12", "caption": "a green apple"},
            ]
        )
    )
    items = load_prompts("tifa", tifa)
    assert [(i.id, i.categories) for i in items] == [
        ("coco_301091", ("coco",)),
        ("drawbench_12", ("drawbench",)),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("text_prompt,x\nhello,1\n")
    with pytest.raises(PromptSetError, match="no prompt column"):
        read_file(bad)


def test_the_shapes_set_is_fixed_balanced_and_parsable():
    items = shapes_set()
    assert items == shapes_set() and len(items) == 60
    assert len({i.id for i in items}) == 60
    first = [i.categories[0] for i in items[:6]]
    assert {"colour", "count", "relation"} <= set(first)  # any prefix is balanced
    for item in items:
        parse(item.prompt)  # every caption names shapes the scorer can read
    counts = load_prompts("shapes", None, categories=["count"], limit=4)
    assert len(counts) == 4 and all("count" in i.categories for i in counts)


def test_a_prompt_set_that_cannot_be_found_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptSetError, match="unknown prompt set 'drawbnech'"):
        load_prompts("drawbnech", None)
    with pytest.raises(PromptSetError, match="prompts file not found"):
        load_prompts(None, tmp_path / "missing.txt")
    with pytest.raises(PromptSetError, match="is not on the Hugging Face hub"):
        load_prompts("tifa-v1.0", None)
    with pytest.raises(PromptSetError, match="not in the set"):
        load_prompts("shapes", None, categories=["texture"])
    for name, dataset in [
        ("drawbench", "sayakpaul/drawbench"),
        ("partiprompts", "nateraw/parti-prompts"),
        ("genai-bench", "BaiqiL/GenAI-Bench-1600"),
        ("hpsv2", "zhwang/HPDv2"),
    ]:
        monkeypatch.setenv("HPS_ROOT", str(tmp_path / "no-hps"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
        with pytest.raises(PromptSetError) as e:
            load_prompts(name, None)
        message = str(e.value)
        assert "\n" not in message and dataset in message and "prompts.file" in message


def test_hpsv2_prompts_from_the_packages_cache(tmp_path, monkeypatch):
    bench = tmp_path / "datasets" / "benchmark"
    bench.mkdir(parents=True)
    for style in ("anime", "concept-art", "paintings", "photo"):
        (bench / f"{style}.json").write_text(json.dumps([f"{style} one", f"{style} two"]))
    monkeypatch.setenv("HPS_ROOT", str(tmp_path))
    items = load_prompts("hpsv2", None, categories=["photo"])
    assert [(i.prompt, i.categories) for i in items] == [
        ("photo one", ("photo",)),
        ("photo two", ("photo",)),
    ]


# --- the experiment file -------------------------------------------------------------------------
BASE = """\
name = "demo"
seeds = [0, 1]
scorers = ["shapes"]
[prompts]
set = "shapes"
limit = 2
[base.chat]
backend = "scripted"
[base.diffusion]
model = "tiny-shapes-sd"
width = 64
height = 64
steps = 2
[base.loop]
max_iters = 1
[variants.full]
[variants.merged]
loop = {critics = "merged"}
"""


def write(tmp_path: Path, text: str = BASE, extra: str = "") -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text + extra)
    return path


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def one_line(result: Result, *words: str) -> None:
    """Exit 2, and stderr is one `error:` line holding every word."""
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], result.stderr


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ("[variants.broken]\nloop = {critcs = []}\n", ("variant 'broken'", "loop.critcs")),
        ("[variants.bad]\nloop = {max_iters = 0}\n", ("variant 'bad'", "loop.max_iters")),
        ("[variants.judged]\nloop = {judge = 'nosuch'}\n", ("variant 'judged'", "nosuch")),
        ("[variants.watch]\nloop = {watch_scorers = ['nosuch']}\n", ("variant 'watch'", "nosuch")),
        ("[variants.baseline]\n", ("baseline",)),
        ("concurency = 2\n", ("concurency", "not an experiment field")),
    ],
)
def test_bad_variants_are_one_line_and_create_nothing(tmp_path, extra, words):
    # A key after a table header belongs to that table: put top-level keys first.
    text = extra + BASE if not extra.startswith("[") else BASE + extra
    path = write(tmp_path, text)
    result = cli("experiment", "run", str(path), "--out", str(tmp_path / "out"), "--no-report")
    one_line(result, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (('set = "shapes"', 'set = "nosuch"'), ("unknown prompt set 'nosuch'",)),
        (('set = "shapes"', 'file = "gone.txt"'), ("prompts file not found", "gone.txt")),
        (('scorers = ["shapes"]', 'scorers = ["shapez"]'), ("scorers:", "shapez")),
        (('scorers = ["shapes"]', 'scorers = ["vlm"]'), ("'vlm' is variant 'full''s judge",)),
        (("seeds = [0, 1]", "seeds = [0, 0]"), ("seeds", "twice")),
    ],
)
def test_bad_experiment_files_are_one_line(tmp_path, change, words):
    path = write(tmp_path, BASE.replace(*change))
    one_line(cli("experiment", "run", str(path), "--out", str(tmp_path / "out")), *words)
    assert not (tmp_path / "out").exists()


def test_judge_as_scorer_only_when_allowed_and_then_marked(tmp_path):
    text = "allow_judge_as_scorer = true\n" + BASE.replace('["shapes"]', '["shapes", "vlm"]')
    exp = load_experiment(write(tmp_path, text), tmp_path)
    assert exp.judged == {"vlm": ["full", "merged"]}  # the baseline judges nothing
    text = "reference = 'nosuch'\n" + BASE
    with pytest.raises(ExperimentError, match="reference: 'nosuch' is not a variant"):
        load_experiment(write(tmp_path, text), tmp_path)


def test_run_ids_depend_on_the_cell_alone(tmp_path):
    exp = load_experiment(write(tmp_path), tmp_path)
    assert exp.variants == ["baseline", "full", "merged"]
    assert exp.directory == tmp_path / "experiments" / "demo"
    cells = {exp.run_id(v, p, s) for v in exp.variants for p in exp.prompts for s in [0, 1]}
    assert len(cells) == 3 * 2 * 2
    more = load_experiment(write(tmp_path, BASE.replace("limit = 2", "limit = 3")), tmp_path)
    assert more.run_id("full", more.prompts[1], 1) == run_id("demo", "full", exp.prompts[1], 1)
    # Speed settings are not part of a column's config hash; what it makes is.
    fast = BASE.replace("steps = 2", "steps = 2\nmax_batch = 4")
    assert load_experiment(write(tmp_path, fast), tmp_path).hashes == exp.hashes
    slow = BASE.replace("steps = 2", "steps = 3")
    changed = load_experiment(write(tmp_path, slow), tmp_path).hashes
    assert all(changed[n] != exp.hashes[n] for n in exp.hashes)


def test_config_drift_is_refused_naming_the_variant_and_nothing_is_lost(tmp_path):
    exp = load_experiment(write(tmp_path), tmp_path)
    prepare(exp)
    before = {p: p.read_bytes() for p in exp.directory.rglob("*") if p.is_file()}
    changed = BASE.replace(
        'loop = {critics = "merged"}', 'loop = {critics = "merged", max_iters = 2}'
    )
    drifted = load_experiment(write(tmp_path, changed), tmp_path)
    with pytest.raises(ExperimentError) as e:
        check_drift(drifted)
    assert "variant 'merged'" in str(e.value) and "loop.max_iters" in str(e.value)
    result = cli("experiment", "run", str(tmp_path / "exp.toml"), "--home", str(tmp_path))
    one_line(result, "variant 'merged'", "another config")
    after = {p: p.read_bytes() for p in exp.directory.rglob("*") if p.is_file()}
    assert after == before
    # Another experiment in the same directory is refused too.
    other = load_experiment(
        write(tmp_path, BASE.replace('"demo"', '"other"')), tmp_path, exp.directory
    )
    with pytest.raises(ExperimentError, match="holds experiment 'demo'"):
        check_drift(other)


def test_the_help_explains_every_field():
    shown = " ".join(cli("experiment", "--help").stdout.split())
    run = " ".join(cli("experiment", "run", "--help").stdout.split())
    for name in ExperimentFile.model_fields:
        if name != "prompts":
            assert f"{name}:" in shown and f"{name}:" in run, name
    for name in Prompts.model_fields:
        assert f"prompts.{name}:" in shown, name
    assert "[variants.merged]" in shown  # the example, brackets and all


def test_the_readme_shows_the_experiment_ci_runs(tmp_path):
    from test_experiment_run import CI_EXPERIMENT

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert CI_EXPERIMENT in readme, "README.md's experiment file is not the one CI runs"
    exp = load_experiment(write(tmp_path, CI_EXPERIMENT), tmp_path)
    assert exp.variants == ["baseline", "full", "no_concept_cot", "merged"]
    assert len(exp.prompts) == 6 and exp.spec.seeds == [0, 1]


def test_report_and_compare_of_what_is_not_an_experiment(tmp_path):
    one_line(cli("experiment", "report", str(tmp_path)), "no experiment in", "run it first")
    exp = load_experiment(write(tmp_path), tmp_path)
    prepare(exp)  # its state, no store yet
    one_line(cli("experiment", "report", str(exp.directory)), "holds no artloop store")
    one_line(cli("experiment", "compare", str(exp.directory), str(exp.directory)), "the same")
