"""An experiment's results as numbers: each cell (column, prompt, seed) read back from the store
and the scores file, then the tables the report shows: means with intervals (overall and per
category), paired differences against the baseline and the reference column, cost per column,
and the score of the image kept after each iteration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artloop.experiments.runner import existing, read_scores
from artloop.experiments.spec import BASELINE
from artloop.experiments.stats import mean_ci, paired, share
from artloop.runtime.accounting import add_up
from artloop.store.trajectories import FINAL_STATUSES, StoreError

COST_KEYS = (
    "iterations",
    "vlm_calls",
    "prompt_tokens",
    "completion_tokens",
    "diffusion_s",
    "wall_s",
)


@dataclass
class Cell:
    """One (column, prompt, seed): its run's status, final image, scores and cost."""

    variant: str
    prompt: str  # the prompt's id
    seed: int
    run_id: str
    status: str = "missing"  # a run status, or missing (never started)
    error: str | None = None
    final_image: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)  # scorer -> final's
    by_iteration: dict[str, list[float | None]] = field(default_factory=dict)
    cost: dict[str, float | None] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


def vlm_calls(step: dict[str, Any]) -> int:
    """A step's VLM requests: its call records where it has them; in a step stored before
    them, one per agent answer plus its refused ones (best-of: one per candidate), reward
    judges left out."""
    if "calls" in step:
        return len(step["calls"])
    total = 0
    for agent, failures in step.get("parse_failures", {}).items():
        for backend, refused in failures.items():
            if not str(backend).startswith("reward:"):
                answers = len(step.get("candidates", [])) if agent == "pick" else 1
                total += answers + int(refused or 0)
    return total


def run_cost(run: dict[str, Any]) -> dict[str, float | None]:
    """A run's iterations, VLM calls, tokens (None where the backend never said), diffusion
    and wall seconds (the time its nodes ran), from its stored steps."""
    steps = run["steps"]
    spent = add_up([part for s in steps for part in s.get("accounting", {}).values()])
    tokens: dict[str, float | None] = {
        k: spent.get(k) for k in ("prompt_tokens", "completion_tokens")
    }
    if tokens["prompt_tokens"] is None:  # no node counted any: the agents' own records
        usage = [u for s in steps for u in s.get("agent_usage", {}).values() if u]
        for key in tokens:
            known = [u[key] for u in usage if u.get(key) is not None]
            tokens[key] = float(sum(known)) if known else None
    return {
        "iterations": len(steps),
        "vlm_calls": sum(vlm_calls(s) for s in steps),
        **tokens,
        "diffusion_s": spent["diffusion"],
        "wall_s": spent["total"],
    }


def kept_after(run: dict[str, Any], k: int) -> str | None:
    """The image the run had kept after k iterations: the best judged so far (the first of
    equals, as `decide` keeps it), its final image once it has stopped."""
    steps = run["steps"]
    if k >= len(steps):
        return run.get("final_image")
    best, kept = None, None
    for step in steps[:k]:
        if best is None or (step.get("score") or 0) > best:
            best, kept = step.get("score") or 0, step.get("result_image")
    return kept


@dataclass
class Collected:
    state: dict[str, Any]
    cells: list[Cell]
    training: dict[str, Any] | None = None  # DIR/train/train.json: what [train]'s stages did

    @property
    def prompts(self) -> dict[str, dict[str, Any]]:
        return {p["id"]: p for p in self.state["prompts"]}

    def column(self, name: str) -> dict[tuple[str, int], Cell]:
        return {(c.prompt, c.seed): c for c in self.cells if c.variant == name}


def collect(directory: Path) -> Collected:
    """Every cell of the experiment in `directory`, as it stands (a run not finished yet, or
    failed, is a cell without scores)."""
    st, store = existing(directory)
    scores = read_scores(directory)
    text = {p["id"]: p["prompt"] for p in st["prompts"]}
    cells = []
    for c in st["cells"]:
        cell = Cell(c["variant"], c["prompt"], c["seed"], c["run_id"])
        cells.append(cell)
        try:
            run = store.get_run(c["run_id"])
        except StoreError:
            continue
        cell.status, cell.error, cell.final_image = run["status"], run["error"], run["final_image"]
        cell.cost = run_cost(run)
        if not cell.finished:
            continue
        prompt = text[c["prompt"]]
        for scorer in st["scorers"]:
            cell.scores[scorer] = scores.get((run["final_image"], prompt, scorer))
            iters = st["max_iters"].get(c["variant"], 1)
            cell.by_iteration[scorer] = [
                scores.get((kept_after(run, k), prompt, scorer)) for k in range(1, iters + 1)
            ]
    record = directory / "train" / "train.json"
    training = json.loads(record.read_text()) if record.is_file() else None
    return Collected(st, cells, training)


# --- tables --------------------------------------------------------------------------------------
def _scored(column: dict[tuple[str, int], Cell], scorer: str, keys=None) -> list[float]:
    return [
        c.scores[scorer]
        for key, c in column.items()
        if (keys is None or key[0] in keys) and c.scores.get(scorer) is not None
    ]


def compare(
    treatment: dict[Any, Cell], control: dict[Any, Cell], scorer: str, resamples: int, keys=None
) -> dict:
    """Paired over the (prompt, seed) both columns scored."""
    shared = [
        k
        for k in treatment
        if k in control
        and (keys is None or k[0] in keys)
        and treatment[k].scores.get(scorer) is not None
        and control[k].scores.get(scorer) is not None
    ]
    return paired(
        [treatment[k].scores[scorer] for k in shared],
        [control[k].scores[scorer] for k in shared],
        resamples,
    )


def cost_table(data: Collected, name: str) -> dict[str, Any]:
    """A column's sessions and what they cost: per finished session, and wall time per
    accepted image (a column whose runs are accepted by a verdict; not the baseline)."""
    column = list(data.column(name).values())
    done = [c for c in column if c.finished]
    row: dict[str, Any] = {
        "sessions": len(column),
        "finished": len(done),
        "failed": sum(c.status == "failed" for c in column),
        "unfinished": sum(not c.finished and c.status != "failed" for c in column),
        "accepted": None
        if name in data.state.get("no_loop", [BASELINE])
        else sum(c.status == "accepted" for c in done),
    }
    for key in COST_KEYS:
        known = [c.cost[key] for c in done if c.cost.get(key) is not None]
        row[key] = sum(known) / len(known) if known else None
    wall = sum(c.cost.get("wall_s") or 0.0 for c in done)
    row["wall_total_s"] = wall
    row["wall_per_accepted_s"] = wall / row["accepted"] if row["accepted"] else None
    return row


def lora_shares(data: Collected, scorer: str, resamples: int) -> dict[str, Any]:
    """Each LoRA column against the loop it learnt from ([train]), over the (prompt, seed)
    the baseline, the loop and the LoRA all scored: the LoRA's change over the baseline, the
    loop's gain over it, and the change as a share of the gain (ArtAug's goal: half); and
    per trainer, the mean share over its training seeds."""
    train = data.state["train"]
    base, loop = data.column(BASELINE), data.column(train["loop"])
    columns: dict[str, Any] = {}
    for name in train["loras"]:
        lora = data.column(name)
        keys = [
            k
            for k in base
            if all(k in c and c[k].scores.get(scorer) is not None for c in (base, loop, lora))
        ]
        b = [base[k].scores[scorer] for k in keys]
        changes = [lora[k].scores[scorer] - v for k, v in zip(keys, b, strict=True)]
        gains = [loop[k].scores[scorer] - v for k, v in zip(keys, b, strict=True)]
        columns[name] = {
            "change": paired([lora[k].scores[scorer] for k in keys], b, resamples),
            "loop_gain": paired([loop[k].scores[scorer] for k in keys], b, resamples),
            "share": share(changes, gains, resamples),
        }
    trainers: dict[str, Any] = {}
    for name, lora in train["loras"].items():
        trainers.setdefault(lora["trainer"], []).append(columns[name]["share"]["share"])
    return {
        "loop": train["loop"],
        "columns": columns,
        "trainers": {
            t: {"seeds": len(v), "mean_share": _mean([x for x in v if x is not None])}
            for t, v in trainers.items()
        },
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def tables(data: Collected) -> dict[str, Any]:
    """Everything the report shows, as numbers."""
    st = data.state
    resamples, columns, scorers = st["bootstrap"], st["columns"], st["scorers"]
    cols = {name: data.column(name) for name in columns}
    categories = sorted({c for p in st["prompts"] for c in p["categories"]})
    in_category = {
        cat: {p["id"] for p in st["prompts"] if cat in p["categories"]} for cat in categories
    }
    out: dict[str, Any] = {
        "means": {
            s: {n: mean_ci(_scored(cols[n], s), resamples) for n in columns} for s in scorers
        },
        "by_category": {
            cat: {
                s: {n: mean_ci(_scored(cols[n], s, keys), resamples) for n in columns}
                for s in scorers
            }
            for cat, keys in in_category.items()
        },
        "vs_baseline": {},
        "by_category_vs_baseline": {},
        "vs_reference": {
            s: {
                n: compare(cols[n], cols[st["reference"]], s, resamples)
                for n in columns
                if n != st["reference"]
            }
            for s in scorers
        },
        "cost": {n: cost_table(data, n) for n in columns},
        "by_iteration": {},
        "lora_share": {},
    }
    if st.get("train") and BASELINE in cols:
        out["lora_share"] = {s: lora_shares(data, s, resamples) for s in scorers}
    if BASELINE in cols:
        others = [n for n in columns if n != BASELINE]
        base = cols[BASELINE]
        out["vs_baseline"] = {
            s: {n: compare(cols[n], base, s, resamples) for n in others} for s in scorers
        }
        out["by_category_vs_baseline"] = {
            cat: {
                s: {n: compare(cols[n], base, s, resamples, keys) for n in others} for s in scorers
            }
            for cat, keys in in_category.items()
        }
    for s in scorers:
        curves = {}
        for n in columns:
            rows = [c.by_iteration.get(s) or [] for c in cols[n].values() if c.finished]
            width = max((len(r) for r in rows), default=0)
            curves[n] = [
                _mean([r[k] for r in rows if k < len(r) and r[k] is not None]) for k in range(width)
            ]
        out["by_iteration"][s] = curves
    return out
