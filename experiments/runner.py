"""Running an experiment: every (variant, prompt, seed) through the batch runner (concurrent,
resumable, a failure stored and isolated), then every final image (and each iteration's kept
image) scored by the evaluation scorers.

The experiment's directory is the artloop home of its runs (`artloop show RUN --home DIR`
works), beside its own state:

    DIR/experiment.toml      the file as last run
    DIR/experiment.json      what the report reads: prompts, seeds, columns, cells' run ids
    DIR/variants/NAME.json   each column's resolved config and its hash, written once
    DIR/scores.jsonl         one line per (image, prompt, scorer), appended as scored
    DIR/train/               with [train]: the stages' data, LoRAs and train.json (training.py)

Run ids come from (experiment, variant, prompt, seed) only, so a rerun after a kill skips the
finished runs and resumes the others from their checkpoints; a line of scores.jsonl cut by a
kill is ignored and scored again. A column whose stored hash differs from what the file now
resolves to is refused (`check_drift`) before anything runs or is written.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from artloop.config import ArtloopConfig
from artloop.experiments.prompt_sets import PromptItem
from artloop.experiments.spec import BASELINE, Experiment, ExperimentError
from artloop.graphs.batch import BatchResult, run_batch
from artloop.graphs.context import RefineContext, build_context, open_store
from artloop.rewards import JudgeWatch, reward_entry, scorers_config
from artloop.store.trajectories import FINAL_STATUSES, StoreError, TrajectoryStore
from artloop.tools.images import atomic_write

SCORES = "scores.jsonl"
STATE = "experiment.json"
Progress = Callable[[str, BatchResult], None]


def _differences(old: Any, new: Any, key: str = "") -> list[str]:
    """The dotted keys where two configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _differences(old.get(k), new.get(k), f"{key}.{k}" if key else k)
        return out
    return [] if old == new else [key]


def check_drift(exp: Experiment) -> None:
    """Each column's runs were made with the config the file now resolves to: ExperimentError
    naming the first column that was not (and what changed); nothing is touched. A
    directory that holds another experiment is refused too."""
    if (held := exp.directory / STATE).is_file():
        other = json.loads(held.read_text())["name"]
        if other != exp.name:
            raise ExperimentError(
                f"{exp.directory} holds experiment '{other}', not '{exp.name}': give another --out"
            )
    for name, digest in exp.hashes.items():
        stored = exp.directory / "variants" / f"{name}.json"
        if not stored.is_file():
            continue
        before = json.loads(stored.read_text())
        if before["hash"] != digest:
            changed = _differences(before["config"], exp.records[name])
            raise ExperimentError(
                f"variant '{name}': its runs in {exp.directory} were made with another config "
                f"than {exp.path.name} now gives ({', '.join(changed[:3]) or 'hash'} changed); "
                "nothing was changed: restore the file, or run it under a new name or --out"
            )


def state(exp: Experiment) -> dict[str, Any]:
    """What the report needs of the experiment, without reading the file again."""
    spec, plan = exp.spec, exp.train
    return {
        "name": exp.name,
        "description": spec.description,
        "file": str(exp.path),
        "prompts": [p.as_dict() for p in exp.prompts],
        "seeds": spec.seeds,
        "columns": exp.variants,
        "baseline": spec.baseline,
        "reference": exp.reference,
        "scorers": spec.scorers,
        "scorer_identity": {s: reward_entry(s).identity() for s in spec.scorers},
        "judged": exp.judged,
        "hashes": exp.hashes,
        "max_iters": {n: cfg.loop.max_iters for n, cfg in exp.configs.items()},
        "score_iterations": spec.score_iterations,
        "bootstrap": spec.bootstrap,
        "grid_rows": spec.grid_rows,
        # Columns without a loop (no accepted count): the baseline, and the LoRA columns.
        "no_loop": [BASELINE, *(plan.loras if plan else ())],
        "train": None
        if plan is None
        else {
            "loop": plan.collect_from,
            "loras": {n: {"trainer": t, "seed": s} for n, (t, s) in plan.loras.items()},
        },
        "cells": [
            {"variant": v, "prompt": p.id, "seed": s, "run_id": exp.run_id(v, p, s)}
            for v in exp.variants
            for p in exp.prompts
            for s in spec.seeds
        ],
    }


def prepare(exp: Experiment) -> None:
    """Create the directory and its state: each column's config (once: a later run must
    match it), the file as run and experiment.json (rewritten: prompts or seeds may grow)."""
    check_drift(exp)
    (exp.directory / "variants").mkdir(parents=True, exist_ok=True)
    for name in exp.configs:
        stored = exp.directory / "variants" / f"{name}.json"
        if not stored.is_file():
            record = {"name": name, "hash": exp.hashes[name], "config": exp.records[name]}
            atomic_write(stored, json.dumps(record, indent=2).encode())
    shutil.copyfile(exp.path, exp.directory / "experiment.toml.tmp")
    (exp.directory / "experiment.toml.tmp").replace(exp.directory / "experiment.toml")
    atomic_write(exp.directory / STATE, json.dumps(state(exp), indent=1).encode())


def _tool_key(cfg: ArtloopConfig) -> str:
    """What the models of a context depend on: columns that agree share them (a diffusion
    pipeline is loaded once, not once per variant)."""
    d = cfg.diffusion
    tool = (d.model, d.family, d.device, d.dtype, d.batch_window_ms, d.max_batch, d.inpaint_model)
    lora = d.lora.model_dump(mode="json") if d.lora else None
    return json.dumps([cfg.chat.model_dump(mode="json"), tool, lora], sort_keys=True, default=str)


def contexts(configs: dict[str, ArtloopConfig]) -> dict[str, RefineContext]:
    """One refine context per column, sharing the models, the store and the checkpointer
    where the columns' model settings agree."""
    built: dict[str, RefineContext] = {}
    out = {}
    for name, cfg in configs.items():
        key = _tool_key(cfg)
        if key not in built:
            built[key] = build_context(cfg)
        out[name] = replace(
            built[key],
            loop=cfg.loop,
            chat_config=cfg.chat,
            diffusion_config=cfg.diffusion,
            agents_config=cfg.agents,
            judge_watch=JudgeWatch(schedule=cfg.scorers.canaries),  # each column's own
        )
    return out


def lora_missing(exp: Experiment, name: str) -> bool:
    """A LoRA column whose LoRA is not trained yet (the [train] stages stopped before it)."""
    plan = exp.train
    return plan is not None and name in plan.loras and not trained(plan.lora_dir(name))


def trained(lora: Path) -> bool:
    """`artloop train` wrote its summary, which it writes after the LoRA: the LoRA is whole."""
    return (lora / "train_summary.json").is_file()


async def run_cells(
    exp: Experiment,
    ctxs: dict[str, RefineContext],
    *,
    stop: threading.Event | None = None,
    on_progress: Progress | None = None,
) -> dict[str, BatchResult]:
    """Every column's sessions, a column at a time (its sessions at once, `concurrency`);
    finished ones skipped. The counts per column."""
    results = {}
    for name in exp.variants:
        if stop is not None and stop.is_set():
            break
        if lora_missing(exp, name):
            continue
        cells = [(p, s) for p in exp.prompts for s in exp.spec.seeds]
        results[name] = await run_column(
            exp, ctxs[name], name, exp.configs[name], cells, stop=stop, on_progress=on_progress
        )
    return results


async def run_column(
    exp: Experiment,
    ctx: RefineContext,
    name: str,
    cfg: ArtloopConfig,
    cells: list[tuple[PromptItem, int]],
    *,
    stop: threading.Event | None = None,
    on_progress: Progress | None = None,
    tags: tuple[str, ...] = (),
) -> BatchResult:
    """One column's sessions (or a [train] stage's: `name` is then `train:...`); a LoRA
    column's pipeline is let go once it is done."""
    config = cfg.public_dict()
    config |= {
        "tags": [*config.get("tags", []), f"experiment:{exp.name}", f"variant:{name}", *tags],
        "experiment": {"name": exp.name, "variant": name, "hash": exp.hashes.get(name)},
    }
    try:
        return await run_batch(
            ctx,
            [exp.item(name, p, s) for p, s in cells],
            name=f"{exp.name}/{name}",
            concurrency=exp.spec.concurrency,
            config=config,
            on_progress=(lambda r: on_progress(name, r)) if on_progress else None,
            stop=stop,
            run_ids=[exp.run_id(name, p, s) for p, s in cells],
        )
    finally:
        if cfg.diffusion.lora is not None:
            ctx.diffusion.unload()


# --- scoring -------------------------------------------------------------------------------------
def read_scores(directory: Path) -> dict[tuple[str, str, str], float | None]:
    """(image, prompt, scorer) -> score (None: the scorer refused it); a line cut short by a
    kill is skipped (it is scored again)."""
    found: dict[tuple[str, str, str], float | None] = {}
    path = directory / SCORES
    if not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        found[(row["image"], row["prompt"], row["scorer"])] = row.get("score")
    return found


def images_to_score(run: dict[str, Any], iterations: bool) -> list[str]:
    """A finished run's final image, and each iteration's kept image when asked."""
    images = [run["final_image"]] if run.get("final_image") else []
    if iterations:
        images += [s["result_image"] for s in run["steps"] if s.get("result_image")]
    return list(dict.fromkeys(images))


def score_cells(
    exp: Experiment,
    store: TrajectoryStore,
    cells: dict[str, list[tuple[PromptItem, int]]] | None = None,
    scorers: list[str] | None = None,
) -> int:
    """Score every finished cell's images not scored yet by each evaluation scorer, each
    against the cell's original prompt (`metadata.caption` too, for the shapes scorer);
    appended to scores.jsonl a batch at a time. How many scores were added. `cells` (column
    -> (prompt, seed)) and `scorers`: others than the experiment's (the [train] trials')."""
    done = read_scores(exp.directory)
    if cells is None:
        cells = {n: [(p, s) for p in exp.prompts for s in exp.spec.seeds] for n in exp.variants}
    wanted: list[tuple[str, str]] = []
    for name, pairs in cells.items():
        for prompt, seed in pairs:
            try:
                run = store.get_run(exp.run_id(name, prompt, seed))
            except StoreError:
                continue
            if run["status"] in FINAL_STATUSES:
                many = exp.spec.score_iterations and name != BASELINE
                wanted += [(im, prompt.prompt) for im in images_to_score(run, many)]
    wanted = list(dict.fromkeys(wanted))
    size = scorers_config().batch_size
    added = 0
    with (exp.directory / SCORES).open("a", encoding="utf-8") as out:
        for scorer in scorers or exp.spec.scorers:
            todo = [(im, p) for im, p in wanted if (im, p, scorer) not in done]
            for start in range(0, len(todo), size):
                rows = _score(scorer, todo[start : start + size], store)
                out.write("".join(json.dumps(r) + "\n" for r in rows))
                out.flush()
                added += len(rows)
    return added


def _score(scorer: str, pairs: list[tuple[str, str]], store: TrajectoryStore) -> list[dict]:
    """One batch's scores; where the scorer refuses the batch (a prompt it cannot read, a
    ValueError), each image alone, a refused one recorded with why (score None)."""
    try:
        values, _ = reward_entry(scorer).fn(
            [store.images.get(im) for im, _ in pairs],
            [p for _, p in pairs],
            [{"caption": p} for _, p in pairs],
        )
    except ValueError as e:
        if len(pairs) > 1:
            return [row for pair in pairs for row in _score(scorer, [pair], store)]
        (image, prompt), why = pairs[0], " ".join(str(e).split())[:300]
        return [{"image": image, "prompt": prompt, "scorer": scorer, "score": None, "error": why}]
    return [
        {"image": im, "prompt": p, "scorer": scorer, "score": float(v)}
        for (im, p), v in zip(pairs, values, strict=True)
    ]


def existing(directory: Path) -> tuple[dict[str, Any], TrajectoryStore]:
    """An experiment directory's state and store (ExperimentError when it holds none)."""
    path = directory / STATE
    if not path.is_file():
        raise ExperimentError(f"no experiment in {directory} (no {STATE}): run it first")
    try:
        store = TrajectoryStore(directory, create=False)
    except StoreError as e:
        raise ExperimentError(str(e)) from None
    return json.loads(path.read_text()), store


def store_of(exp: Experiment) -> TrajectoryStore:
    return open_store(exp.configs[exp.variants[0]])
