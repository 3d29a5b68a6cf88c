"""Faults: a batch SIGKILLed at random points loses nothing, the store stays intact
(`artloop doctor`), and every failed write leaves what was stored before it as it was."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from artloop.graphs.batch import item_run_id, read_prompts
from artloop.store.doctor import check_store
from artloop.store.export import step_images
from artloop.store.trajectories import FINAL_STATUSES, TrajectoryStore
from conftest import scripted_stack

ARTLOOP = str(Path(sys.executable).with_name("artloop"))
SESSIONS = 16
KILLS = 3
CONCURRENCY = 8


def _config(tmp_path: Path) -> Path:
    return scripted_stack(tmp_path / "artloop.toml", home=tmp_path / "home")


def _running(store: TrajectoryStore) -> bool:
    """Whether a process is working on a session (a run reads `running` only while held)."""
    return any(r["status"] == "running" for r in store.list_runs(limit=-1))


def _finished(store: TrajectoryStore) -> dict[str, str]:
    """Each finished run's whole trajectory, as JSON text (to compare before and after)."""
    runs = [r for r in store.list_runs(limit=-1) if r["status"] in FINAL_STATUSES]
    return {r["run_id"]: json.dumps(store.get_run(r["run_id"]), sort_keys=True) for r in runs}


def _doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ARTLOOP, "doctor", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # five `artloop batch` processes
def test_sigkill_during_a_batch_loses_nothing(tmp_path):
    cfg = _config(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a red fox, take {i}\n" for i in range(SESSIONS)))
    store = TrajectoryStore(tmp_path / "home")
    n = str(CONCURRENCY)
    batch = [ARTLOOP, "batch", str(prompts), "--concurrency", n, "--config", str(cfg)]
    rng = random.Random(7)  # the kill points, reproducible
    kept: dict[str, str] = {}
    kills = []
    for _ in range(KILLS):
        # Kill once some (a random number of) further sessions have finished, a random
        # fraction of a second later: mid-step, mid-write or mid-diffusion.
        target = min(SESSIONS - 1, len(kept) + rng.randint(1, 3))
        proc = subprocess.Popen(
            batch,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        if SESSIONS - len(kept) > CONCURRENCY:
            while len(_finished(store)) < target and proc.poll() is None:
                assert time.monotonic() < deadline, "the batch made no progress"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.6))
        else:
            # The rest run as one cohort and finish together: counting finished sessions would
            # only see them all done. Kill a random moment after the cohort has started instead.
            while not _running(store) and proc.poll() is None:
                assert time.monotonic() < deadline, "the batch made no progress"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.2, 1.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        finished = _finished(store)
        kills.append(len(finished))
        assert {rid: finished[rid] for rid in kept} == kept  # a finished run is never touched
        kept = finished
        report = check_store(store)
        assert report.ok, report.errors  # intact: each run complete or marked incomplete
    assert kills[-1] < SESSIONS, f"every kill came after the end: {kills}"

    # What follows the kills is the same CLI in this process: a fresh process for each command
    # would only add its start (~4 s each); the killed processes are what needed processes.
    from artloop.cli import app
    from typer.testing import CliRunner

    done = CliRunner().invoke(app, batch[1:])
    assert done.exit_code == 0, (done.stderr, done.exception)
    summary = json.loads(done.stdout)
    assert summary["skipped"] == len(kept) and summary["failed"] == 0
    finished = _finished(store)
    assert {rid: finished[rid] for rid in kept} == kept
    items = read_prompts(prompts)
    expected = {item_run_id("prompts", i, item) for i, item in enumerate(items)}
    assert set(finished) == expected  # every session finished, each exactly once
    assert len(store.list_runs(limit=-1)) == SESSIONS  # and nothing else was stored
    for rid in expected:
        assert [s["iteration"] for s in store.get_run(rid)["steps"]] == [0, 1]
    report = json.loads(CliRunner().invoke(app, ["doctor", "--config", str(cfg), "--json"]).stdout)
    assert report["ok"] and report["checked"]["complete runs"] == SESSIONS, report
    images = {d for rid in expected for s in store.get_run(rid)["steps"] for d in step_images(s)}
    assert report["checked"]["images"] == len(images)  # every image was re-hashed

    export = tmp_path / "export"
    out = CliRunner().invoke(app, ["export", str(export), "--format", "raw", "--config", str(cfg)])
    assert out.exit_code == 0, (out.stderr, out.exception)
    checked = CliRunner().invoke(app, ["doctor", "--export", str(export)])
    assert checked.exit_code == 0 and "ok" in checked.stdout, checked.stdout
    print(f"kills after {kills} finished sessions; {SESSIONS} sessions, none lost")


class _Died(BaseException):
    """The process's death, as far as the session can tell (not an Exception: nothing in the
    session may handle it)."""


def _dying(put, at: int):
    """`put` that dies on its `at`-th call (counting from 1)."""
    calls = iter(range(1, 10_000))

    def dying(self, *a, **k):
        if next(calls) == at:
            raise _Died
        return put(self, *a, **k)

    return dying


def test_a_death_at_any_checkpoint_write_resumes_the_same_run(tmp_path, sd_tool, monkeypatch):
    """The kill test above once lost a session this way: a process dies after a node's writes
    were saved but before the checkpoint that follows them. That node's step is then missing
    from the snapshot's `next`; the re-run took the session for unstarted, and its new input
    made `begin` open a second run (a fresh id) on the thread. A SIGKILL cannot be aimed at
    that moment, so the saver's `put` dies there instead, at each of a session's checkpoints."""
    from artloop.graphs.batch import run_batch
    from artloop.models.scripted import ScriptedChat
    from conftest import make_ctx
    from langgraph.checkpoint.sqlite import SqliteSaver

    put = SqliteSaver.put
    (tmp_path / "prompts.txt").write_text("a red fox\n")
    item = read_prompts(tmp_path / "prompts.txt")
    calm = make_ctx(TrajectoryStore(tmp_path / "calm"), sd_tool, ScriptedChat(), max_iters=2)
    calls: list[int] = []
    counting = lambda self, *a, **k: calls.append(1) or put(self, *a, **k)  # noqa: E731
    monkeypatch.setattr(SqliteSaver, "put", counting)
    asyncio.run(run_batch(calm, item, name="t", concurrency=1))
    rid = item_run_id("t", 0, item[0])
    want = [s["iteration"] for s in calm.store.get_run(rid)["steps"]]
    assert want == [0, 1] and len(calls) > 10  # two iterations: the loop's back edge is crossed
    for dies_at in range(1, len(calls)):
        store = TrajectoryStore(tmp_path / f"dies-at-{dies_at}")
        ctx = make_ctx(store, sd_tool, ScriptedChat(), max_iters=2)

        monkeypatch.setattr(SqliteSaver, "put", _dying(put, dies_at))
        with pytest.raises(_Died):
            asyncio.run(run_batch(ctx, item, name="t", concurrency=1))
        monkeypatch.setattr(SqliteSaver, "put", put)
        again = asyncio.run(run_batch(ctx, item, name="t", concurrency=1))
        assert (again.done, again.failed) == (1, 0), (dies_at, again)
        runs = store.list_runs(limit=-1)
        assert [r["run_id"] for r in runs] == [rid], dies_at  # the same run, and only it
        assert runs[0]["status"] in FINAL_STATUSES, dies_at
        assert [s["iteration"] for s in store.get_run(rid)["steps"]] == want, dies_at


def test_doctor_finds_broken_stores_and_exports(tmp_path, store, sd_tool):
    """Each kind of damage is an error naming it (so the passing runs above mean something)."""
    from artloop.graphs.runner import run_session
    from artloop.store.doctor import check_export
    from artloop.store.export import export_dataset
    from conftest import make_ctx
    from fakes import ScriptedChat

    ctx = make_ctx(store, sd_tool, ScriptedChat(), max_iters=1)
    rid = run_session(ctx, prompt="a fox").run_id
    assert check_store(store).ok
    export_dataset(store, tmp_path / "raw", "raw")
    assert check_export(tmp_path / "raw").ok

    image = store.get_run(rid)["steps"][0]["image"]
    path = store.images.path(image)
    good = path.read_bytes()
    path.write_bytes(good[:-10])  # a truncated image file
    assert any("does not match its hash" in e for e in check_store(store).errors)
    path.unlink()
    assert any("is missing" in e for e in check_store(store).errors)
    path.write_bytes(good)
    (path.parent / f".{path.name}.x.tmp").write_bytes(b"half")  # left by a killed write
    report = check_store(store)
    assert report.ok and "interrupted write" in report.warnings[0]
    assert check_store(store, clean=True).ok and not list(path.parent.glob(".*.tmp"))

    lines = (tmp_path / "raw" / "steps.jsonl").read_text().splitlines()
    (tmp_path / "raw" / "steps.jsonl").write_text(lines[0] + "\n" + lines[0] + "\n")
    assert any("the card says 1 rows" in e for e in check_export(tmp_path / "raw").errors)

    store.db_path.write_bytes(b"not a database" * 100)
    assert "not a readable SQLite database" in check_store(store).errors[0]


def test_doctor_cli_exit_codes(tmp_path):
    empty = TrajectoryStore(tmp_path / "home")
    ok = _doctor("--home", str(empty.home))
    assert ok.returncode == 0 and "ok" in ok.stdout
    missing = _doctor("--export", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no export directory" in missing.stderr


def _files(store: TrajectoryStore) -> set[Path]:
    return set(store.images.root.rglob("*")) if store.images.root.exists() else set()


def test_diffusion_faults_are_clear_errors_and_store_nothing(store, sd_tool, monkeypatch):
    import torch
    from artloop.tools.diffusion import DiffusionError, GenParams

    params = GenParams(width=64, height=64, num_inference_steps=2, seed=1)
    before = _files(store)
    bias = sd_tool.pipeline.vae.post_quant_conv.bias
    # Real NaNs out of the real decoder, then a decoder that saturates to black.
    for value, message in ((float("nan"), "NaN/inf pixels"), (-1e4, "all-black image")):
        saved = bias.detach().clone()
        with torch.no_grad():
            bias.fill_(value)
        try:
            with pytest.raises(DiffusionError, match=message):
                sd_tool.text_to_image("a fox", "", params)
        finally:
            with torch.no_grad():
                bias.copy_(saved)

    def oom(*args, **kwargs):  # a CPU cannot be made to run out of GPU memory on demand
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(sd_tool.pipeline.unet, "forward", oom)
        with pytest.raises(DiffusionError, match="ran out of memory on 1 image.*max_batch"):
            sd_tool.text_to_image("a fox", "", params)
    assert _files(store) == before  # nothing stored half-way
    assert sd_tool.text_to_image("a fox", "", params)  # and the tool works again


def test_a_full_disk_mid_write_corrupts_nothing(store, monkeypatch):
    import errno

    from artloop.tools.images import ImageStoreError
    from PIL import Image

    kept = store.images.put(Image.new("RGB", (8, 8), (1, 2, 3)))
    rid = "0123456789abcdef"
    store.create_run(rid, "a fox", {}, {}, "1")
    store.put_step(rid, 0, {"iteration": 0, "image": kept})

    def full(fd):  # the bytes were written, then the disk filled before they reached it
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("artloop.tools.images.os.fsync", full)
        with pytest.raises(ImageStoreError, match="No space left on device"):
            store.images.put(Image.new("RGB", (8, 8), (9, 9, 9)))
    assert [p.name for p in _files(store) if p.is_file()] == [f"{kept}.png"]  # no partial file
    report = check_store(store)
    assert report.ok and report.checked["images"] == 1 and not report.warnings


def test_a_corrupt_lora_is_a_clear_error(tmp_path):
    from artloop.trainers.common import LORA_FILE, TrainerConfigError, check_lora

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / LORA_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(TrainerConfigError, match=r"EvalConfig.lora: .* is not a readable LoRA"):
        check_lora(lora, "EvalConfig.lora")
    (tmp_path / "p.txt").write_text("a fox\n")
    out = subprocess.run(
        [ARTLOOP, "eval", "--lora", str(lora), "--prompts", str(tmp_path / "p.txt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "not a readable LoRA" in out.stderr + out.stdout


def test_pickled_weights_are_never_loaded(tmp_path, store):
    """A model whose weights exist only as a pickle (.bin) is refused, not unpickled; and no
    artloop module calls torch.load or imports pickle."""
    import shutil

    import artloop
    import torch
    from artloop.models.tiny import resolve_model
    from artloop.tools.diffusion import DiffusionError, DiffusionTool
    from safetensors.torch import load_file

    model = tmp_path / "pickled-sd"
    shutil.copytree(resolve_model("tiny-sd"), model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(DiffusionError, match="cannot load diffusion model"):
        DiffusionTool(str(model), store=store.images).setup()
    root = Path(artloop.__file__).parent
    folders = ("agents", "graphs", "tools", "trainers", "prompts", "serve", "models")
    sources = [*root.glob("*.py"), *(p for f in folders for p in (root / f).rglob("*.py"))]
    assert len(sources) > 40
    for path in sources:
        text = path.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, path
