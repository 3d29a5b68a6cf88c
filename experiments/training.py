"""An experiment's [train] stages (the effect study: does a LoRA trained on the loop's accepted
sessions draw, with no loop, what the loop reached?), run in order before the columns:

1. collect: the `collect_from` variant's sessions on the collection prompts x seeds (run ids
   from the pseudo-column `train:collect`, tagged `stage:collect`), in the experiment's store;
2. export: those sessions (the accepted ones, unless `accepted_only = false`) as an sft and/or
   dpo dataset (store/export.py) in DIR/train/data/FORMAT;
3. choose: where a trainer has several learning rates, a LoRA per rate (the first training
   seed) in DIR/train/trials/, each drawn with no loop on the validation prompts (the trial
   columns `train:sft-lr0.001`, ...) and scored by `select_by`; the best rate wins;
4. train: a LoRA per trainer and training seed at its rate in DIR/train/loras/COLUMN (the
   trial's LoRA, copied, for the first seed), which its column then draws with.

Each stage's outputs found on disk are not made again: finished sessions are skipped (a
killed one resumes), an export with its dataset card is kept, a LoRA with its
train_summary.json is kept (one cut short resumes from its checkpoint), scores are cached in
scores.jsonl. What the stages did is in DIR/train/train.json, which the report shows.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from artloop.experiments.prompt_sets import PromptItem
from artloop.experiments.runner import (
    Progress,
    contexts,
    read_scores,
    run_column,
    score_cells,
    store_of,
    trained,
)
from artloop.experiments.spec import (
    BASELINE,
    TRAINER_CONFIGS,
    Experiment,
    ExperimentError,
    TrainPlan,
)
from artloop.graphs.context import RefineContext
from artloop.rewards import reward_entry
from artloop.store.export import ExportError, ExportFilters, export_dataset, provenance
from artloop.store.trajectories import FINAL_STATUSES, StoreError, TrajectoryStore
from artloop.tools.images import atomic_write
from artloop.tools.lora import LORA_FILE, sha256
from artloop.trainers.common import TrainerConfigError
from artloop.trainers.dpo import train_dpo
from artloop.trainers.sft import train_sft

COLLECT = "train:collect"  # the collection sessions' pseudo-column (a colon: no variant's name)
RECORD = "train.json"
TRAIN_FUNCTIONS = {"sft": train_sft, "dpo": train_dpo}
Log = Callable[[str], None]


def _finished(
    exp: Experiment, store: TrajectoryStore, name: str, cells: list[tuple[PromptItem, int]]
) -> list[dict[str, Any]]:
    """The stage's sessions, every one finished: ExperimentError naming how many were not."""
    runs, errors = [], []
    for prompt, seed in cells:
        try:
            run = store.get_run(exp.run_id(name, prompt, seed))
        except StoreError:
            run = {"status": "missing", "error": None}
        if run["status"] not in FINAL_STATUSES:
            errors.append(run.get("error") or run["status"])
        runs.append(run)
    if errors:
        raise ExperimentError(
            f"train: {len(errors)} of {len(cells)} {name} sessions did not finish (the first: "
            f"{' '.join(str(errors[0]).split())[:200]}); run the experiment again to retry them"
        )
    return runs


def _export(exp: Experiment, store: TrajectoryStore, fmt: str, run_ids: list[str]) -> None:
    """The collected sessions as a `fmt` dataset in DIR/train/data/FMT. Exports are refused
    inside an artloop home (the experiment's directory is one), so it is written beside the
    directory and moved in whole."""
    plan = exp.train
    assert plan is not None
    target = plan.directory / "data" / fmt
    filters = ExportFilters(
        accepted_only=plan.spec.accepted_only, run_ids=tuple(run_ids), **plan.filters
    )
    scratch = Path(tempfile.mkdtemp(prefix=f".{exp.directory.name}.", dir=exp.directory.parent))
    try:
        export_dataset(store, scratch / fmt, fmt, filters)  # type: ignore[arg-type]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)  # one cut short (no card)
        (scratch / fmt).replace(target)
    except ExportError as e:
        raise ExperimentError(f"train: no {fmt} data from the collected sessions ({e})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train(exp: Experiment, trainer: str, out: Path, rate: float, seed: int, log: Log) -> None:
    """One LoRA, unless it is there (a run cut short resumes from its checkpoint)."""
    plan = exp.train
    assert plan is not None
    if trained(out):
        return
    log(f"train: {trainer} LoRA, learning rate {rate:g}, seed {seed} -> {out}")
    try:
        cfg = TRAINER_CONFIGS[trainer](
            data=str(plan.directory / "data" / trainer),
            output_dir=str(out),
            model=plan.base_model or exp.configs[BASELINE].diffusion.model,
            learning_rate=rate,
            seed=seed,
            **plan.options[trainer],
        )
        TRAIN_FUNCTIONS[trainer](cfg, progress=False)
    except TrainerConfigError as e:
        raise ExperimentError(f"train.{trainer}: {e}") from None


def lora_record(out: Path, trainer: str, seed: int, rate: float) -> dict[str, Any]:
    summary = json.loads((out / "train_summary.json").read_text())
    return {
        "trainer": trainer,
        "seed": seed,
        "learning_rate": rate,
        "examples": summary.get("examples"),
        "steps": summary.get("steps"),
        "first_loss": summary.get("first_loss"),
        "last_loss": summary.get("last_loss"),
        "sha256": sha256(out / LORA_FILE),
    }


async def _choose(
    exp: Experiment,
    store: TrajectoryStore,
    trainer: str,
    *,
    stop: threading.Event | None,
    on_progress: Progress | None,
    log: Log,
) -> dict[str, Any]:
    """Each rate's LoRA (the first training seed) drawn on the validation prompts with no
    loop, scored by `select_by`: the means and the best rate (empty: stopped)."""
    plan = exp.train
    assert plan is not None
    seed = plan.spec.training_seeds[0]
    trials = {name: rate for name, (t, rate) in plan.trials.items() if t == trainer}
    for name, rate in trials.items():
        _train(exp, trainer, plan.trial_dir(name), rate, seed, log)
    cells = [(p, s) for p in plan.validation for s in plan.validation_seeds]
    ctxs = contexts({n: plan.trial_configs[n] for n in trials})
    for name in trials:
        cfg = plan.trial_configs[name]
        await run_column(exp, ctxs[name], name, cfg, cells, stop=stop, on_progress=on_progress)
        if stop is not None and stop.is_set():
            return {}
    for name in trials:
        _finished(exp, store, name, cells)
    score_cells(exp, store, {n: cells for n in trials}, [plan.select_by])
    scores = read_scores(exp.directory)
    means = {}
    for name in trials:
        values = []
        for prompt, s in cells:
            run = store.get_run(exp.run_id(name, prompt, s))
            values.append(scores.get((run["final_image"], prompt.prompt, plan.select_by)))
        known = [v for v in values if v is not None]
        means[name] = sum(known) / len(known) if known else None
    scored = [n for n in means if means[n] is not None]
    if not scored:
        raise ExperimentError(f"train.select_by: {plan.select_by} scored no validation image")
    sign = 1 if reward_entry(plan.select_by).higher_is_better else -1
    best = max(scored, key=lambda n: sign * means[n])
    return {
        "scorer": plan.select_by,
        "cells": len(cells),
        "means": {f"{trials[n]:g}": m for n, m in means.items()},
        "learning_rate": trials[best],
    }


def read_record(plan: TrainPlan) -> dict[str, Any]:
    path = plan.directory / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


async def run_stages(
    exp: Experiment,
    ctxs: dict[str, RefineContext],
    *,
    stop: threading.Event | None = None,
    on_progress: Progress | None = None,
    log: Log | None = None,
) -> dict[str, Any] | None:
    """Collect, export, choose the learning rates, train: each stage skipped where its outputs
    are on disk. The stages' record (also DIR/train/train.json); None without [train] or when
    `stop` was set before the LoRAs were all trained."""
    plan = exp.train
    if plan is None:
        return None
    log = log or (lambda line: None)
    store = store_of(exp)
    record = read_record(plan)
    plan.directory.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # only when it changed: a rerun that redoes nothing writes nothing
        text = json.dumps(record, indent=1).encode()
        path = plan.directory / RECORD
        if not path.is_file() or path.read_bytes() != text:
            atomic_write(path, text)

    cells = [(p, s) for p in plan.prompts for s in plan.spec.seeds]
    source = plan.collect_from
    cfg = exp.configs[source]
    await run_column(
        exp, ctxs[source], COLLECT, cfg, cells, stop=stop, on_progress=on_progress,
        tags=("stage:collect",),
    )  # fmt: skip
    if stop is not None and stop.is_set():
        return None
    runs = _finished(exp, store, COLLECT, cells)
    record["collect"] = {
        "variant": source,
        "prompts": len(plan.prompts),
        "seeds": plan.spec.seeds,
        "sessions": len(runs),
        "accepted": sum(r["status"] == "accepted" for r in runs),
        "accepted_only": plan.spec.accepted_only,
    }
    data = record.setdefault("data", {})
    for fmt in plan.options:  # a trainer reads the export of its name
        target = plan.directory / "data" / fmt
        if provenance(target) is None:
            _export(exp, store, fmt, [r["run_id"] for r in runs])
        card = provenance(target) or {}
        data[fmt] = {"rows": card.get("rows"), "runs": card.get("runs_kept")}
        log(f"train: {data[fmt]['rows']} {fmt} rows from {data[fmt]['runs']} sessions")
    save()

    choice = record.setdefault("choice", {})
    rates = {}
    for trainer, given in plan.rates.items():
        if len(given) == 1:
            rates[trainer] = given[0]
            continue
        chosen = await _choose(exp, store, trainer, stop=stop, on_progress=on_progress, log=log)
        if not chosen:
            return None
        choice[trainer], rates[trainer] = chosen, chosen["learning_rate"]
        save()

    loras = record.setdefault("loras", {})
    first = plan.spec.training_seeds[0]
    for column, (trainer, seed) in plan.loras.items():
        if stop is not None and stop.is_set():
            return None
        out = plan.lora_dir(column)
        if not trained(out):
            trial = f"train:{trainer}-lr{rates[trainer]:g}"
            if seed == first and trial in plan.trials:  # chosen with this seed: the trial's
                _copy_lora(plan.trial_dir(trial), out)
            else:
                _train(exp, trainer, out, rates[trainer], seed, log)
        loras[column] = lora_record(out, trainer, seed, rates[trainer])
        save()
    return record


def _copy_lora(trial: Path, out: Path) -> None:
    """The chosen trial's LoRA and summary as a column's (written beside, then renamed)."""
    tmp = out.with_name(f".{out.name}.copy")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (LORA_FILE, "train_summary.json"):
        shutil.copy2(trial / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
