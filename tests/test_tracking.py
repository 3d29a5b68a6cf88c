"""Tracking (issue 20, item 5): each trainer's metrics and validation images through
accelerate's trackers, read back from MLflow's local file store, TensorBoard's event files and
W&B's offline run; a finished session's metrics and final image from `[tracking]`; off by
default; a bad tracker name is one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from artloop.cli import app
from artloop.config import ConfigError, TrackingConfig, load_config
from artloop.graphs.runner import run_session
from artloop.models.scripted import ScriptedChat
from artloop.runtime.tracking import log_metrics
from artloop.trainers.common import TrainerConfigError
from artloop.trainers.ddpo import DDPOConfig, train_ddpo
from artloop.trainers.dpo import DPOConfig, train_dpo
from artloop.trainers.sft import SFTConfig, train_sft
from conftest import make_ctx, scripted_stack, verdict
from PIL import Image
from typer.testing import CliRunner

TINY = {"resolution": 64, "checkpoint_every": 10, "validation_inference_steps": 2}


@pytest.fixture
def wandb_offline(monkeypatch):
    """W&B writes its run to local files only: no account, no network."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} at {uri}"
    return client, client.search_runs([found.experiment_id])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def read_wandb_history(run_dir: Path) -> tuple[dict, list[dict]]:
    """An offline W&B run's config and logged history rows (nested keys joined by dots), read
    from its run-*.wandb file:
    LevelDB's log format (32 KiB blocks of records with a 7-byte header: CRC, length, type
    full / first / middle / last) holding W&B's protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = (next(run_dir.glob("run-*.wandb"))).read_bytes()
    assert data[:4] == b":W&B"
    records, partial, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            partial = chunk
        elif kind in (3, 4):  # middle, last
            partial += chunk
        if kind in (1, 4):
            records.append(partial)
    config, rows = {}, []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append(
                {
                    ".".join(i.nested_key) or i.key: json.loads(i.value_json)
                    for i in record.history.item
                }
            )
        elif kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            config |= {i.key: json.loads(i.value_json) for i in update}
    return config, rows


# --- trainers ---------------------------------------------------------------------------------
def test_sft_logs_to_a_local_mlflow_file_store(sft_data, tmp_path):
    out = tmp_path / "lora"
    cfg = SFTConfig(
        data=str(sft_data), output_dir=str(out), train_steps=3, report_to="mlflow", **TINY
    )
    summary = train_sft(cfg, progress=False)
    client, runs = mlflow_runs((out / "mlruns").resolve().as_uri(), "artloop-train")
    (run,) = runs
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("sft-lora-")
    losses = history(client, run.info.run_id, "loss")
    assert losses == [(i + 1, pytest.approx(v)) for i, v in enumerate(summary["losses"])]
    assert history(client, run.info.run_id, "lr") == [(s, pytest.approx(1e-4)) for s in (1, 2, 3)]
    assert run.data.params["report_to"] == "mlflow" and run.data.params["rank"] == "8"
    (shown,) = [
        a.path
        for a in client.list_artifacts(run.info.run_id, "validation")
        if a.path.endswith(".png")
    ]
    assert shown == "validation/step-000003-0.png"  # at the end, the data's first prompt
    with Image.open(client.download_artifacts(run.info.run_id, shown, str(tmp_path))) as im:
        assert im.size == (64, 64)


def test_dpo_logs_to_tensorboard(dpo_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "lora"
    cfg = DPOConfig(
        data=str(dpo_data),
        output_dir=str(out),
        train_steps=2,
        report_to="tensorboard",
        validation_prompts=["a dark fox", "a bright fox"],
        validation_every=1,
        **TINY,
    )
    summary = train_dpo(cfg, progress=False)
    (run_dir,) = (out / "tensorboard" / "artloop-train").glob("dpo-lora-*")
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(i + 1, pytest.approx(v)) for i, v in enumerate(summary["losses"])]
    acc = [(e.step, e.value) for e in events.Scalars("implicit_acc")]
    assert [s for s, _ in acc] == [1, 2] and all(0.0 <= v <= 1.0 for _, v in acc)
    assert "lr" in events.Tags()["scalars"]
    shown = events.Images("validation")  # two prompts at step 1 and at step 2: one grid each
    assert [i.step for i in shown] == [1, 2] and shown[0].width >= 64 and shown[0].height >= 64


def test_ddpo_logs_to_wandb_offline(tmp_path, wandb_offline):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse\n")
    out = tmp_path / "lora"
    cfg = DDPOConfig(
        data=str(prompts),
        output_dir=str(out),
        train_steps=2,
        inner_epochs=1,
        sample_steps=2,
        batch_size=2,
        report_to="wandb",
        tracking_project="ddpo-test",
        **TINY,
    )
    summary = train_ddpo(cfg, progress=False)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    config, rows = read_wandb_history(run_dir)
    assert config["reward"] == "darkness" and config["report_to"] == "wandb"
    steps = {row["_step"]: row for row in rows}
    assert [steps[s]["loss"] for s in (1, 2)] == pytest.approx(summary["losses"])
    assert [steps[s]["reward_mean"] for s in (1, 2)] == pytest.approx(summary["mean_rewards"])
    assert steps[2]["validation._type"] == "images/separated"
    (image,) = steps[2]["validation.filenames"]
    with Image.open(run_dir / "files" / image) as im:
        assert im.size == (64, 64)


def test_trainers_track_nothing_by_default_and_refuse_an_unknown_tracker(sft_data, tmp_path):
    out = tmp_path / "lora"
    summary = train_sft(
        SFTConfig(data=str(sft_data), output_dir=str(out), train_steps=1, **TINY), progress=False
    )
    assert summary["config"]["report_to"] == "none"
    assert not {"mlruns", "tensorboard", "wandb"} & {p.name for p in out.iterdir()}
    with pytest.raises(TrainerConfigError, match=r"SFTConfig.report_to: unknown tracker 'neptune'"):
        SFTConfig(data="x", report_to="neptune")
    bad = CliRunner().invoke(
        app, ["train", "sft", "--data", str(sft_data), "--report-to", "neptune"]
    )
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert (
        bad.exit_code == 2
        and len(lines) == 1
        and lines[0].startswith("error: SFTConfig.report_to: unknown tracker 'neptune'")
    )


# --- sessions ---------------------------------------------------------------------------------
def test_a_finished_session_is_logged_to_mlflow(tmp_path, monkeypatch):
    """`artloop run` with `[tracking] backend = "mlflow"`: one MLflow run in HOME/mlruns named
    after the session, with its status, score and watch score per iteration, its totals and its
    final image."""
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    config = scripted_stack(tmp_path / "c.toml", home=home, max_iters=2)
    config.write_text(config.read_text() + '[tracking]\nbackend = "mlflow"\nexperiment = "loop"\n')
    args = ["run", "a fox", "--config", str(config), "--json", "--quiet", "--watch", "brightness"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    client, runs = mlflow_runs((home / "mlruns").resolve().as_uri(), "loop")
    (run,) = runs
    rid = run.info.run_id
    assert run.info.run_name == summary["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["status"] == summary["status"] and run.data.params["prompt"] == "a fox"
    assert run.data.params["config.loop.max_iters"] == "2"
    assert history(client, rid, "score") == [
        (i + 1, pytest.approx(s)) for i, s in enumerate(summary["scores"])
    ]
    watched = history(client, rid, "watch.brightness.image")
    assert [s for s, _ in watched] == list(range(1, summary["iterations"] + 1))
    assert run.data.metrics["iterations"] == summary["iterations"]
    for key in ("calls", "vlm_tokens", "wall_seconds"):
        assert run.data.metrics[f"totals.{key}"] == pytest.approx(summary["totals"][key])
    assert run.data.metrics["best_score"] == pytest.approx(summary["best_score"])
    assert [a.path for a in client.list_artifacts(rid, "images")] == ["images/final.png"]
    assert not (tmp_path / "mlruns").exists()  # under the home, not the working directory


def test_sessions_track_nothing_by_default(store, sd_tool, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    ctx = make_ctx(store, sd_tool, chat, max_iters=1)
    assert ctx.tracking_config.backend == "none"
    assert run_session(ctx, prompt="a fox").status == "accepted"
    found = [p for p in tmp_path.rglob("*") if p.name in ("mlruns", "tensorboard", "wandb")]
    assert found == []


def test_a_tracker_failure_does_not_fail_the_session(store, sd_tool, tmp_path, monkeypatch, caplog):
    import artloop.graphs.tracking

    def broken(*args, **kwargs):
        raise OSError("the tracking server is down")

    monkeypatch.setattr(artloop.graphs.tracking, "log_metrics", broken)
    ctx = make_ctx(store, sd_tool, ScriptedChat(), max_iters=1)
    ctx.tracking_config = TrackingConfig(backend="mlflow")
    assert run_session(ctx, prompt="a fox").status == "max_iters"
    assert "was not logged to mlflow: the tracking server is down" in caplog.text


def test_an_unknown_tracker_is_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[tracking]\nbackend = "neptune"\n')
    with pytest.raises(
        ConfigError,
        match=r"^invalid config: tracking.backend: Input should be 'none', 'mlflow', 'tensorboard' or 'wandb'$",
    ):
        load_config(config)
    result = CliRunner().invoke(app, ["run", "a fox", "--config", str(config)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "tracking.backend" in lines[0]


def test_a_tracker_that_is_not_installed_is_one_line(sft_data, tmp_path, monkeypatch):
    import artloop.runtime.tracking

    missing = {"wandb": ("no_such_wandb", "artloop[wandb]")}
    monkeypatch.setattr(artloop.runtime.tracking, "PACKAGES", missing)
    want = "tracker wandb needs no_such_wandb: pip install 'artloop[wandb]'"
    config = scripted_stack(tmp_path / "c.toml", home=tmp_path / "home")
    config.write_text(config.read_text() + '[tracking]\nbackend = "wandb"\n')
    runs = CliRunner().invoke(app, ["run", "a fox", "--config", str(config)])
    train = CliRunner().invoke(
        app, ["train", "sft", "--data", str(sft_data), "--report-to", "wandb"]
    )
    for result, field in ((runs, "tracking.backend"), (train, "SFTConfig.report_to")):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and lines == [f"error: {field}: {want}"], result.output
    assert not (tmp_path / "home" / "artloop.sqlite").exists()  # refused before anything ran


# --- log_metrics, what the experiment harness calls ---------------------------------------------
RECORD = {
    "params": {"variant": "v1", "chat": {"api_key": "sk-not-for-trackers", "model": "m"}},
    "metrics": {"mean_score": 6.5, "missing": None},
    "series": {"score": [5.0, None, 7.5]},
}


@pytest.mark.parametrize("backend", ["mlflow", "tensorboard", "wandb"])
def test_log_metrics_reads_back(backend, tmp_path, wandb_offline):
    image = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    tracking = TrackingConfig(backend=backend, experiment="exp")
    ran = log_metrics(tracking, "exp-v1", images={"final": image}, home=tmp_path, **RECORD)
    if backend == "mlflow":
        client, (run,) = mlflow_runs((tmp_path / "mlruns").resolve().as_uri(), "exp")
        assert run.info.run_id == ran and run.info.run_name == "exp-v1"
        assert run.data.params["chat.api_key"] == "***" and run.data.params["chat.model"] == "m"
        assert run.data.metrics == {"mean_score": 6.5, "score": 7.5}
        assert history(client, ran, "score") == [(1, 5.0), (3, 7.5)]
        assert [a.path for a in client.list_artifacts(ran, "images")] == ["images/final.png"]
    elif backend == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert Path(ran) == tmp_path / "tensorboard" / "exp" / "exp-v1"
        events = EventAccumulator(ran).Reload()
        assert [(e.step, e.value) for e in events.Scalars("score")] == [(1, 5.0), (3, 7.5)]
        assert [(e.step, e.value) for e in events.Scalars("mean_score")] == [(0, 6.5)]
        assert events.Tags()["images"] == ["final"]
        text = events.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
        assert "sk-not-for-trackers" not in text and "| chat.api_key | *** |" in text
    else:
        (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{ran}")
        config, rows = read_wandb_history(run_dir)
        assert config["chat.api_key"] == "***" and config["variant"] == "v1"
        assert [(r["_step"], r["score"]) for r in rows if "score" in r] == [(1, 5.0), (3, 7.5)]
        assert any(r.get("final._type") == "image-file" for r in rows)
