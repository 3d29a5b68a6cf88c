"""Experiments run for real (slow): the CI experiment (3 variants, 6 shapes-world prompts,
2 seeds and the baseline, scored by `shapes`) killed with SIGKILL mid-way, then finished by a
rerun without redoing a finished run, end to end: every table, the grid and the plots in its
report, `report` and `compare`, and a changed file refused. (One experiment, run once: the
kill and the end-to-end checks used to run it twice.)

The agents are the scripted chat: tiny-shapes-qwen2vl in-process (about 1 s a call on 2 cores,
~140 calls here) would take most of the 3 minutes; the scripted answers still drive every node
of each variant (enhance, the critics or the merged critic, edits, validate). Diffusion is
tiny-shapes-sd at 64 px, 4 steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from artloop.cli import app
from artloop.store.trajectories import FINAL_STATUSES, TrajectoryStore
from typer.testing import CliRunner

ARTLOOP = str(Path(sys.executable).with_name("artloop"))

CI_EXPERIMENT = """\
name = "critics-ci"
description = "The full loop, the loop without Concept-CoT, and one merged critic call."
seeds = [0, 1]
scorers = ["shapes"]
concurrency = 4

[prompts]
set = "shapes"
limit = 6

[base.chat]
backend = "scripted"

[base.diffusion]
model = "tiny-shapes-sd"
width = 64
height = 64
steps = 4

[base.loop]
max_iters = 2
enhancer = true  # tiny-shapes-sd's world turns it off; here every node runs

[base.scorers]
canaries = "off"  # the scripted validator answers alike whatever it sees

[variants.full]

[variants.no_concept_cot]
loop = {critics = ["data_cot", "thesis_cot"]}

[variants.merged]
loop = {critics = "merged"}
"""
COLUMNS = ["baseline", "full", "no_concept_cot", "merged"]


@pytest.mark.slow
def test_the_ci_experiment_killed_resumed_and_reported(tmp_path):
    path = tmp_path / "critics.toml"
    path.write_text(CI_EXPERIMENT)
    out = tmp_path / "critics"
    command = ["experiment", "run", str(path), "--out", str(out), "-q"]
    start = time.monotonic()
    proc = subprocess.Popen(
        [ARTLOOP, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    finished: dict[str, dict] = {}
    while not (out / "artloop.sqlite").is_file():  # the first process makes the store
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    store = TrajectoryStore(out, create=False)
    while len(finished) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
        try:
            runs = store.list_runs(limit=-1)
        except sqlite3.OperationalError:  # the file is there, its tables not yet
            continue
        finished = {r["run_id"]: r for r in runs if r["status"] in FINAL_STATUSES}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    before = {run_id: store.get_run(run_id) for run_id in finished}
    assert len(before) < 48  # killed mid-way

    # The rerun: the same command, in this process (a second process would only add its start).
    result = CliRunner().invoke(app, command)
    wall = time.monotonic() - start
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert wall < 180, f"the CI experiment took {wall:.0f} s"
    summary = json.loads(result.stdout)
    assert list(summary["columns"]) == COLUMNS
    columns = summary["columns"].values()
    skipped = sum(c["skipped"] for c in columns)
    done = sum(c["done"] for c in columns)
    assert skipped >= len(before) and skipped + done == 48
    for c in columns:  # every cell finished, in the killed process or the rerun
        assert (c["total"], c["done"] + c["skipped"], c["failed"]) == (12, 12, 0)
    for run_id, run in before.items():  # untouched: the same record, the same update time
        assert store.get_run(run_id) == run
    runs = store.list_runs(limit=-1)
    assert len(runs) == 48 and all(r["status"] in FINAL_STATUSES for r in runs)

    report = json.loads((out / "report" / "report.json").read_text())
    assert report["experiment"]["prompts"] == 6 and report["experiment"]["reference"] == "full"
    means = report["means"]["shapes"]
    assert list(means) == COLUMNS and all(m["n"] == 12 for m in means.values())
    assert set(report["vs_baseline"]["shapes"]) == set(COLUMNS) - {"baseline"}
    assert set(report["vs_reference"]["shapes"]) == set(COLUMNS) - {"full"}
    assert all(r["n"] == 12 for r in report["vs_baseline"]["shapes"].values())
    assert len(report["categories"]) >= 2 and report["by_category_vs_baseline"]
    cost = report["cost"]
    # VLM calls per session: 5 agents an iteration, 4 without Concept-CoT, 3 merged; none at all
    # for the baseline, which is one text-to-image of the raw prompt.
    calls = {n: cost[n]["vlm_calls"] for n in COLUMNS}
    assert calls == {"baseline": 0, "full": 10, "no_concept_cot": 8, "merged": 6}
    assert cost["baseline"]["iterations"] == 1 and cost["full"]["iterations"] == 2
    assert all(cost[n]["diffusion_s"] > 0 and cost[n]["wall_s"] > 0 for n in COLUMNS)
    assert len(report["by_iteration"]["shapes"]["full"]) == 2

    html = (out / "report" / "index.html").read_text()
    for heading in (
        "Mean per column",
        "Paired against baseline",
        "Paired against the reference, full",
        "By category: mean",
        "By category: mean difference against baseline",
        "Cost per column",
        "Images",
    ):
        assert heading in html, heading
    assert html.count('<img src="data:image/png;base64,') == 12 * 4  # the grid: every cell
    assert html.count("<svg") == 2  # score vs cost, score by iteration
    markdown = (out / "report" / "report.md").read_text()
    assert "## shapes" in markdown and "## Cost per column" in markdown

    # The file changed after the runs: refused, naming the variant; nothing collected is lost.
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "sqlite" not in p.name}
    changed = CI_EXPERIMENT.replace("[variants.full]", "[variants.full]\nloop = {max_iters = 3}")
    path.write_text(changed)
    drifted = CliRunner().invoke(app, ["experiment", "run", str(path), "--out", str(out)])
    assert drifted.exit_code == 2, drifted.stderr
    lines = [line for line in drifted.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "variant 'full'" in lines[0] and "loop.max_iters" in lines[0]
    assert {p: p.read_bytes() for p in kept} == kept and len(store.list_runs(limit=-1)) == 48

    again = CliRunner().invoke(app, ["experiment", "report", str(out)])
    assert again.exit_code == 0 and "Paired against baseline" in again.stdout
    # A scorer that is also a column's judge (allow_judge_as_scorer) is marked wherever shown.
    state = json.loads((out / "experiment.json").read_text())
    (out / "experiment.json").write_text(json.dumps(state | {"judged": {"shapes": ["full"]}}))
    marked = CliRunner().invoke(app, ["experiment", "report", str(out)])
    assert "**Marked:** `shapes` is also the judge of full" in marked.stdout
    assert "| full (judge) | 12 |" in marked.stdout
    assert "Marked:</b> <code>shapes</code>" in (out / "report" / "index.html").read_text()
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    compared = CliRunner().invoke(app, ["experiment", "compare", str(out), str(twin), "--json"])
    assert compared.exit_code == 0, compared.stderr
    diffs = json.loads(compared.stdout)["scorers"]["shapes"]["b_minus_a"]
    assert set(diffs) == set(COLUMNS)
    assert all((d["n"], d["diff"], d["tie"]) == (12, 0.0, 1.0) for d in diffs.values())
