"""`artloop export` on a real store of real runs (tiny SD, scripted verdicts): every format read
back with `datasets`, the run filters, atomicity, refusals and the CLI."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace

import numpy as np
import pytest
from artloop.cli import app
from artloop.config import ChatConfig
from artloop.graphs.runner import run_session
from artloop.models.structured import ChatServerError
from artloop.prompts import PROMPTS_VERSION
from artloop.store import export as export_mod
from artloop.store.export import ExportError, ExportFilters, export_dataset
from artloop.store.trajectories import TrajectoryStore
from datasets import load_dataset
from fakes import DEFAULTS, ScriptedChat
from PIL import Image
from test_graph import make_ctx, verdict
from typer.testing import CliRunner

SECRET = "hunter2"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, _sd_pipeline_cache):
    """Five runs, oldest first: accepted at iteration 2 after a rejected edit (gain 6), max_iters
    (gain 1) after an edit the validator found worse but did not reject, failed mid-run, accepted at once through an "openai" chat whose URL holds a
    password (gain 0, same prompt as the first), interrupted."""
    store = TrajectoryStore(tmp_path_factory.mktemp("export") / "home")

    def session(verdicts, prompt, chat_config=None, **kw):
        ctx = make_ctx(
            store,
            _sd_pipeline_cache,
            ScriptedChat(scripts=verdicts),
            max_iters=kw.pop("max_iters", 3),
            plateau_patience=5,
        )
        if chat_config:
            ctx = replace(ctx, chat_config=chat_config)
        return run_session(ctx, prompt=prompt, **kw).run_id

    ids = {
        "accepted": session(
            {"Verdict": [worse("reject", 3.0), verdict("accept", 9.0)]}, "a red fox"
        ),
        "max_iters": session(
            {"Verdict": [worse("revise", 4.0), verdict("revise", 5.0)]}, "a blue bird", max_iters=2
        ),
    }
    with pytest.raises(ChatServerError):
        session(
            {"EditPlan": [DEFAULTS["EditPlan"], ConnectionError("server went away")]},
            "a failed cat",
            run_id="00000000000000fa",
        )
    ids["failed"] = "00000000000000fa"
    url = f"http://bob:{SECRET}@vlm.local:8000/v1"
    openai = ChatConfig(
        backend="openai",
        base_url=url,
        model="Qwen/Qwen2-VL-7B-Instruct",
        api_key=SECRET,
        retry_backoff_s=0,
    )
    ids["quick"] = session(
        {"Verdict": [verdict("accept", 8.0)]},
        "a red fox",
        openai,
        config={"chat": {"base_url": url, "api_key": "***"}},
    )
    ids["interrupted"] = session({}, "an owl", interrupt_before=["edit"])
    statuses = {k: store.get_run(v)["status"] for k, v in ids.items()}
    assert statuses == {
        "accepted": "accepted",
        "max_iters": "max_iters",
        "failed": "failed",
        "quick": "accepted",
        "interrupted": "interrupted",
    }
    return store, ids


FINISHED = ("accepted", "max_iters", "quick")


def worse(v: str, score: float) -> dict:
    """A verdict whose judge found the edit not better than the image before it."""
    return {**verdict(v, score), "better_than_before": False}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_sft_parquet_and_imagefolder(runs, tmp_path):
    store, ids = runs
    result = export_dataset(store, tmp_path / "sft", "sft")
    assert (result.rows, result.runs_kept, result.runs_considered) == (3, 3, 5)
    out = tmp_path / "sft"
    ds = load_dataset(
        "parquet",
        data_files=str(out / "data/train-00000-of-00001.parquet"),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert ds.column_names == ["image", "text", "original", "run_id", "score", "gain"]
    assert ds["run_id"] == [ids[k] for k in FINISHED] and ds["gain"] == [6.0, 1.0, 0.0]
    for row in ds:
        run = store.get_run(row["run_id"])
        assert isinstance(row["image"], Image.Image) and row["text"] == run["prompt"]
        assert np.array_equal(pixels(row["image"]), pixels(store.images.get(run["final_image"])))
        assert row["score"] == run["best_score"]
        # `original`: the first iteration's drawn image, before any edit (ArtAug's LoRA1 data)
        first = run["steps"][0]
        assert np.array_equal(pixels(row["original"]), pixels(store.images.get(first["image"])))
    accepted = ds[0]  # its best image is the second iteration's edit: not the original
    assert not np.array_equal(pixels(accepted["original"]), pixels(accepted["image"]))
    # The imagefolder layout diffusers' train_text_to_image_lora.py reads, loaded offline.
    folder = load_dataset(
        "imagefolder", data_dir=str(out / "imagefolder"), cache_dir=str(tmp_path / "cache")
    )["train"]
    assert sorted(folder["text"]) == sorted(ds["text"]) and len(folder) == 3
    assert set(folder.column_names) == {"image", "text", "original"}
    # The originals are a second image column, not extra rows: each row's is its run's.
    by_image = {pixels(r["image"]).tobytes(): r for r in ds}
    for row in folder:
        twin = by_image[pixels(row["image"]).tobytes()]
        assert np.array_equal(pixels(row["original"]), pixels(twin["original"]))
    meta = [json.loads(line) for line in (out / "imagefolder/train/metadata.jsonl").open()]
    assert meta[0] == {
        "file_name": f"{ids['accepted']}.png",
        "text": "a red fox",
        "original_file_name": f"original/{ids['accepted']}.png",
    }
    # The card's configs make the directory itself a loadable dataset.
    card = (out / "README.md").read_text()
    assert (
        card.startswith("---\nconfigs:\n- config_name: default\n") and "path: data/train-*" in card
    )
    whole = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert whole["run_id"] == ds["run_id"]
    # --overwrite knows every file it wrote, the originals under imagefolder/train/original too
    assert export_dataset(store, out, "sft", overwrite=True).rows == 3


def test_dpo_pairs_follow_the_verdicts(runs, tmp_path):
    store, ids = runs
    export_dataset(store, tmp_path / "dpo", "dpo")
    ds = load_dataset(
        "parquet",
        data_files=str(tmp_path / "dpo" / export_mod.PARQUET),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert ds.features["jpg_0"].dtype == "binary" and ds.features["label_0"].dtype == "float64"
    rows = {k: [r for r in ds if r["run_id"] == ids[k]] for k in FINISHED}
    assert {r["run_id"] for r in ds} == {ids[k] for k in FINISHED}  # nothing from failed runs
    accepted = store.get_run(ids["accepted"])
    reject, accept = accepted["steps"]
    assert [(r["source"], r["label_0"], r["label_1"]) for r in rows["accepted"]] == [
        ("edit", 1.0, 0.0),  # the rejected edit: before preferred
        ("edit", 0.0, 1.0),  # the accepted edit: after preferred
        ("best_worst", 1.0, 0.0),
    ]
    assert [(r["source"], r["label_0"]) for r in rows["max_iters"]] == [
        ("edit", 1.0),  # "revise", but not better than before: before preferred
        ("edit", 0.0),
        ("best_worst", 1.0),
    ]
    assert [r["source"] for r in rows["quick"]] == ["edit"]  # one step: no best/worst pair
    expected = [
        (reject["image"], reject["edited_image"]),
        (accept["image"], accept["edited_image"]),
        (accept["result_image"], reject["result_image"]),
    ]
    for row, (first, second) in zip(rows["accepted"], expected, strict=True):
        assert row["caption"] == "a red fox"
        pngs = [pixels(store.images.get(d)) for d in (first, second)]
        for data, mine, other in ((row["jpg_0"], *pngs), (row["jpg_1"], *pngs[::-1])):
            image = Image.open(io.BytesIO(data))
            assert image.format == "JPEG"  # lossy, but nearer its own image than the other
            assert np.abs(pixels(image) - mine).mean() < np.abs(pixels(image) - other).mean() / 2


def test_dpo_export_reads_as_diffusers_dpo_example_reads_it(runs, tmp_path):
    """diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py (not in the
    diffusers wheel or sdist, so re-enacted here): load_dataset(--dataset_name, split=
    --dataset_split_name), then per row each of jpg_0, jpg_1 decoded from its bytes with PIL as
    RGB, the pair swapped where label_0 == 0 (chosen first), the caption tokenized."""
    store, ids = runs
    out = tmp_path / "dpo"
    export_dataset(store, out, "dpo")
    card = (out / "README.md").read_text()
    flags = "--dataset_name <this dir> --dataset_split_name train"
    assert flags in card and flags == export_mod.DPO_FLAGS
    cache = str(tmp_path / "cache")
    # The script's default split, `validation`, is not there: the card's flag is needed.
    with pytest.raises(ValueError, match="validation"):
        load_dataset(str(out), cache_dir=cache, split="validation")
    ds = load_dataset(str(out), cache_dir=cache, split="train")
    assert {"caption", "jpg_0", "jpg_1", "label_0"} <= set(ds.column_names)

    def preprocess(examples: dict) -> dict:  # the script's preprocess_train, minus tensors
        decoded = [
            [Image.open(io.BytesIO(b)).convert("RGB") for b in examples[col]]
            for col in ("jpg_0", "jpg_1")
        ]
        chosen_first = []
        for pair, label_0 in zip(zip(*decoded, strict=True), examples["label_0"], strict=True):
            chosen_first.append(pair[::-1] if label_0 == 0 else pair)
        return {"pairs": chosen_first, "caption": examples["caption"]}

    batch = preprocess(ds.with_format(None)[:])
    assert len(batch["pairs"]) == len(ds) == 7  # the three runs' pairs, as above
    run = store.get_run(ids["accepted"])
    reject, accept = run["steps"]
    # Per the judge: the rejected edit's image before it, the accepted edit's image after it,
    # the best step's result over the worst's; each chosen image nearer its own PNG.
    chosen = [reject["image"], accept["edited_image"], accept["result_image"]]
    rows = [i for i, r in enumerate(ds) if r["run_id"] == ids["accepted"]]
    for i, digest in zip(rows, chosen, strict=True):
        first, second = batch["pairs"][i]
        mine = pixels(store.images.get(digest))
        assert first.mode == "RGB" and first.size == second.size
        assert np.abs(pixels(first) - mine).mean() < np.abs(pixels(second) - mine).mean()
        assert batch["caption"][i] == "a red fox"


@pytest.mark.parametrize(
    ("validator", "person", "label_0"),
    [
        (worse("revise", 4.0), None, 1.0),  # the judge found it worse: before preferred
        (worse("accept", 8.0), None, 1.0),  # good enough, but not better than before
        (verdict("revise", 4.0), None, 0.0),  # better, not yet good: after preferred
        (verdict("reject", 3.0), None, None),  # rejects an edit it calls better: no pair
        (worse("revise", 4.0), "accept", 0.0),  # a person's verdict overrules the validator
        (verdict("accept", 9.0), "reject", 1.0),
    ],
)
def test_dpo_edit_pair_label_follows_the_judges_comparison(validator, person, label_0):
    step = {
        "image": "a" * 64,
        "edited_image": "b" * 64,
        "agents": {"validate": validator},
        "verdict": person or validator["verdict"],
        "score": validator["score"],
        "decided_by": {"verdict": "human" if person else "agent"},
    }
    pairs = list(export_mod.dpo_pairs({"steps": [step]}))
    assert pairs == ([] if label_0 is None else [("a" * 64, "b" * 64, label_0, "edit")])


def test_prompts_and_raw(runs, tmp_path):
    store, ids = runs
    export_dataset(store, tmp_path / "prompts", "prompts")
    lines = [json.loads(x) for x in (tmp_path / "prompts/prompts.jsonl").read_text().splitlines()]
    assert lines == [
        {"prompt": store.get_run(ids[k])["prompt"], "run_id": ids[k]} for k in FINISHED
    ]
    assert (tmp_path / "prompts/prompts.txt").read_text() == "a red fox\na blue bird\n"

    result = export_dataset(store, tmp_path / "raw", "raw")
    records = [json.loads(x) for x in (tmp_path / "raw/steps.jsonl").read_text().splitlines()]
    assert result.rows == len(records) == 5  # 2 + 2 + 1 steps
    for record in records:
        run = store.get_run(record["run_id"])
        assert record["step"] == run["steps"][record["step"]["iteration"]]
        assert (record["prompt"], record["status"]) == (run["prompt"], run["status"])
        for digest in export_mod.step_images(record["step"]):
            saved = Image.open(tmp_path / "raw/images" / f"{digest}.png")
            assert np.array_equal(pixels(saved), pixels(store.images.get(digest)))
    digests = {d for r in records for d in export_mod.step_images(r["step"])}
    assert {p.stem for p in (tmp_path / "raw/images").iterdir()} == digests


def test_card_has_provenance_and_no_secrets(runs, tmp_path):
    store, _ = runs
    export_dataset(store, tmp_path / "raw", "raw", ExportFilters(accepted_only=True))
    card = (tmp_path / "raw/README.md").read_text()
    provenance = json.loads(re.search(r"```json\n(.*?)\n```", card, re.S).group(1))
    assert provenance["artloop_version"] and provenance["prompts_versions"] == [PROMPTS_VERSION]
    assert (provenance["runs_considered"], provenance["runs_kept"], provenance["rows"]) == (5, 2, 3)
    assert provenance["filters"]["accepted_only"] is True
    chats = sorted(m["chat"]["backend"] for m in provenance["models"])
    assert chats == ["inprocess", "openai"]
    assert all(m["diffusion"]["model"] == "tiny-sd" for m in provenance["models"])
    assert "http://***@vlm.local:8000/v1" in card
    for path in (tmp_path / "raw").rglob("*"):
        assert path.is_dir() or SECRET.encode() not in path.read_bytes(), path


def test_filters(runs, tmp_path):
    store, ids = runs
    created = {k: store.get_run(v)["created_at"] for k, v in ids.items()}
    from datetime import datetime

    middle = datetime.fromtimestamp((created["accepted"] + created["max_iters"]) / 2)
    cases = {
        ExportFilters(): FINISHED,
        ExportFilters(accepted_only=True): ("accepted", "quick"),
        ExportFilters(min_gain=1.0): ("accepted", "max_iters"),
        ExportFilters(min_gain=2.0): ("accepted",),
        ExportFilters(top_fraction=0.5): ("accepted",),
        ExportFilters(top_fraction=0.01): ("accepted",),  # at least one
        ExportFilters(top_fraction=1.0): FINISHED,
        ExportFilters(run_ids=(ids["max_iters"], ids["failed"])): ("max_iters",),
        ExportFilters(since=middle): ("max_iters", "quick"),
        ExportFilters(until=middle): ("accepted",),
        ExportFilters(accepted_only=True, since=middle): ("quick",),
    }
    for i, (filters, expected) in enumerate(cases.items()):
        result = export_dataset(store, tmp_path / f"p{i}", "prompts", filters)
        lines = (tmp_path / f"p{i}/prompts.jsonl").read_text().splitlines()
        assert [json.loads(x)["run_id"] for x in lines] == [ids[k] for k in expected], filters
        assert result.rows == result.runs_kept == len(expected)


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (ExportFilters(min_gain=100), r"no runs match: status in .*, gain >= 100 \(5 run"),
        (ExportFilters(run_ids=("00000000000000fa",)), "no runs match: .*run ids 00000000000000fa"),
        (ExportFilters(run_ids=("0123456789abcdef",)), "no run 0123456789abcdef in"),
        (ExportFilters(run_ids=("../etc",)), "not a run id"),
        (ExportFilters(top_fraction=0), r"top_fraction must be in \(0, 1\]"),
    ],
)
def test_nothing_to_export_is_an_error(runs, tmp_path, filters, message):
    store, _ = runs
    with pytest.raises(ExportError, match=message):
        export_dataset(store, tmp_path / "out", "sft", filters)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_half_way_leaves_nothing(runs, tmp_path, monkeypatch):
    store, _ = runs

    def broken(path, features, rows):
        next(iter(rows))  # the images are being read
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "_write_parquet", broken)
    with pytest.raises(ExportError, match="cannot write the export to .*sft: disk full"):
        export_dataset(store, tmp_path / "sft", "sft")
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary directory


def test_existing_output_needs_overwrite(runs, tmp_path):
    store, _ = runs
    out = tmp_path / "out"
    export_dataset(store, out, "prompts")
    with pytest.raises(ExportError, match="exists and is not empty; pass --overwrite"):
        export_dataset(store, out, "raw")
    assert (out / "prompts.jsonl").is_file() and not (out / "steps.jsonl").exists()
    export_dataset(store, out, "raw", overwrite=True)
    assert (out / "steps.jsonl").is_file() and not (out / "prompts.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old export is gone
    (tmp_path / "empty").mkdir()
    assert export_dataset(store, tmp_path / "empty", "prompts").rows == 3  # empty is fine


def test_output_in_or_around_the_home_is_refused(runs, tmp_path):
    store, _ = runs
    with pytest.raises(ExportError, match="inside the artloop home"):
        export_dataset(store, store.home / "images" / "export", "sft")
    with pytest.raises(ExportError, match="contains the artloop home"):
        export_dataset(store, store.home.parent, "sft", overwrite=True)
    assert store.home.is_dir() and not (store.home / "images" / "export").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is not a directory"):
        export_dataset(store, tmp_path / "file", "sft", overwrite=True)
    with pytest.raises(ExportError, match="unknown format 'lora'"):
        export_dataset(store, tmp_path / "out", "lora")  # type: ignore[arg-type]


def test_cli(runs, tmp_path):
    store, ids = runs
    runner = CliRunner()
    home = ["--home", str(store.home)]
    done = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "ds"),
            "--format",
            "dpo",
            "--run",
            ids["accepted"],
            "--since",
            "2000-01-01",
            "--json",
            *home,
        ],
    )
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["rows"] == 3 and summary["path"] == str((tmp_path / "ds").resolve())
    assert summary["filters"]["run_ids"] == [ids["accepted"]]
    text = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "p"),
            "--format",
            "prompts",
            "--accepted-only",
            "--top-fraction",
            "1",
            *home,
        ],
    )
    assert text.exit_code == 0 and "exported 2 prompts row(s) from 2 run(s)" in text.stdout
    bad = {
        "top fraction": (["--format", "sft", "--top-fraction", "2"], "top_fraction must be in"),
        "date": (["--format", "sft", "--since", "last week"], "not an ISO date: 'last week'"),
        "format": (["--format", "lora"], "unknown format 'lora'"),
        "no match": (["--format", "sft", "--min-gain", "50"], "no runs match"),
        "not empty": (["--format", "sft"], "is not empty; pass --overwrite"),
    }
    for name, (args, message) in bad.items():
        target = tmp_path / ("ds" if name == "not empty" else "new")
        result = runner.invoke(app, ["export", str(target), *args, *home])
        assert result.exit_code == 2, (name, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert message in " ".join(result.stderr.split()), (name, result.stderr)
    assert not (tmp_path / "new").exists()
