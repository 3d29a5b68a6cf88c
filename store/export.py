"""Export finished trajectories as training datasets in the layouts outside tools read.

- `sft`: (original prompt, best image, original image) triples, as a Hugging Face parquet
  dataset and as an imagefolder (diffusers' `train_text_to_image_lora.py` reads either; the
  original image is what ArtAug's differential training, `artloop train sft --differential`,
  learns first).
- `dpo`: preference pairs in the Pick-a-Pic schema (diffusers' `diffusion_dpo` reads it with
  `--dataset_split_name train`, which the card states).
- `prompts`: the prompts alone (DDPO).
- `raw`: every step record with the images it references.

An export is built in a temporary directory beside OUT and renamed into place: a failure leaves
neither OUT nor the temporary directory. Every export writes a dataset card (`README.md`).
"""

from __future__ import annotations

# Deliberately lazy: datasets (pyarrow) are imported inside the functions that use them, so that
# importing this module (the CLI's --help, the config, a test) does not load them.
import io
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args

from artloop import __version__
from artloop.config import mask_secrets
from artloop.store.trajectories import FINAL_STATUSES, StoreError, TrajectoryStore, check_run_id

Format = Literal["sft", "dpo", "prompts", "raw"]
FORMATS: tuple[str, ...] = get_args(Format)
PARQUET = "data/train-00000-of-00001.parquet"  # the Hub's shard naming
ROW_GROUP = 100  # rows per parquet row group: small groups for image rows, as the Hub does


class ExportError(ValueError):
    """An export cannot be made as asked (bad filter, bad target, nothing to export)."""


# Scores come from above this layer (store/ does not import rewards/): the CLI passes a
# `RunScorer`, (scorer name, runs) -> {run_id: score of the run's best image}, and the identity
# of each scorer it used (`Reward.identity()`), which the card records.
RunScorer = Callable[[str, list[dict]], dict[str, float]]
# The dpo writer's pairs of one run, when the CLI builds them (--pairs best-worst): (image 0,
# image 1, label_0, source) as `dpo_pairs` yields them.
PairSource = Callable[[dict], Iterable[tuple[str, str, float, str]]]


@dataclass(frozen=True)
class ExportFilters:
    """Which finished runs to export. `since` is inclusive, `until` exclusive (naive = local)."""

    accepted_only: bool = False
    min_gain: float | None = None  # gain = best score - score of the first step
    top_fraction: float | None = None  # keep this fraction of runs by gain (at least one)
    since: datetime | None = None
    until: datetime | None = None
    run_ids: tuple[str, ...] = ()  # only these, exported in this order (else oldest first)
    tags: tuple[str, ...] = ()  # a run must carry all of them (`artloop run --tag`)
    # (scorer, at least): the run's best image scored by that scorer at export time
    min_scores: tuple[tuple[str, float], ...] = ()
    top_by: str | None = None  # top_fraction by this scorer's score instead of by gain

    def scorers(self) -> list[str]:
        """The scorers these filters score with, in order, once each."""
        named = [n for n, _ in self.min_scores] + ([self.top_by] if self.top_by else [])
        return list(dict.fromkeys(named))

    def check(self) -> None:
        if self.min_gain is not None and not math.isfinite(self.min_gain):
            raise ExportError(f"min_gain must be a finite number, not {self.min_gain}")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ExportError(f"top_fraction must be in (0, 1], not {self.top_fraction}")
        if self.top_by is not None and self.top_fraction is None:
            raise ExportError(f"--by {self.top_by} ranks for --top-fraction, which is not given")
        for name, least in self.min_scores:
            if not math.isfinite(least):
                raise ExportError(f"min score {name}={least} is not a finite number")
        if self.since and self.until and _ts(self.since) >= _ts(self.until):
            raise ExportError(f"since ({self.since}) is not before until ({self.until})")
        for run_id in self.run_ids:
            try:
                check_run_id(run_id)
            except StoreError as e:
                raise ExportError(str(e)) from e

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self) | {
            "run_ids": list(self.run_ids),
            "tags": list(self.tags),
            "min_scores": dict(self.min_scores),
        }
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in d.items()}

    def describe(self) -> str:
        parts = [
            "status accepted" if self.accepted_only else f"status in {'|'.join(FINAL_STATUSES)}"
        ]
        if self.min_gain is not None:
            parts.append(f"gain >= {self.min_gain:g}")
        parts += [f"{name} >= {least:g}" for name, least in self.min_scores]
        if self.top_fraction is not None:
            parts.append(f"top {self.top_fraction:.4g} by {self.top_by or 'gain'}")
        if self.since:
            parts.append(f"created since {self.since.isoformat()}")
        if self.until:
            parts.append(f"created before {self.until.isoformat()}")
        if self.run_ids:
            parts.append(f"run ids {', '.join(self.run_ids)}")
        if self.tags:
            parts.append(f"tags {', '.join(self.tags)}")
        return ", ".join(parts)


@dataclass
class ExportResult:
    path: Path
    format: str
    rows: int
    runs_considered: int  # every run in the store
    runs_kept: int  # the runs that matched the filters
    filters: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"path": str(self.path)}


def parse_when(text: str | None) -> datetime | None:
    """An ISO date or date-time (`2025-01-31`, `2025-01-31T12:00:00+00:00`), or None."""
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ExportError(
            f"not an ISO date: {text!r} (e.g. 2025-01-31 or 2025-01-31T12:00)"
        ) from None


def _ts(when: datetime) -> float:
    return when.timestamp()  # naive datetimes are local time, like time.time()


def gain(run: dict[str, Any]) -> float:
    """How much the loop improved on its first image (0 when unknown)."""
    first = run["steps"][0].get("score") if run["steps"] else None
    best = run.get("best_score")
    return 0.0 if first is None or best is None else best - first


# --- which runs -------------------------------------------------------------------------------
def select_runs(
    store: TrajectoryStore, filters: ExportFilters, scorer: RunScorer | None = None
) -> tuple[list[dict], int]:
    """The matching runs (whole trajectories, oldest first, or in the order of the run ids
    the filters give) and how many runs the store holds.
    Score filters score each remaining run's best image with `scorer` (the scores land in the
    run's `scores`); a run with no best image has no score and does not pass them."""
    if filters.scorers() and scorer is None:
        raise ExportError(f"filters by {', '.join(filters.scorers())} need a scorer")
    listed = store.list_runs(limit=-1)  # SQLite: a negative LIMIT means no limit
    known = {r["run_id"] for r in listed}
    if unknown := [i for i in filters.run_ids if i not in known]:
        raise ExportError(f"no run {unknown[0]} in {store.home}")
    statuses = ("accepted",) if filters.accepted_only else FINAL_STATUSES
    since = _ts(filters.since) if filters.since else -math.inf
    until = _ts(filters.until) if filters.until else math.inf
    chosen = [
        r
        for r in listed
        if r["status"] in statuses
        and since <= r["created_at"] < until
        and (not filters.run_ids or r["run_id"] in filters.run_ids)
    ]
    # Given run ids: their order, so that the same runs give the same rows whatever order
    # concurrent sessions were created in (an experiment's collection: its cells' order).
    order = {run_id: i for i, run_id in enumerate(filters.run_ids)}
    key = (lambda r: order[r["run_id"]]) if order else (lambda r: r["created_at"])
    runs = [store.get_run(r["run_id"]) for r in sorted(chosen, key=key)]
    runs = [r | {"gain": gain(r)} for r in runs if r["steps"]]
    runs = [r for r in runs if set(filters.tags) <= set(r["config"].get("tags", []))]
    if filters.min_gain is not None:
        runs = [r for r in runs if r["gain"] >= filters.min_gain]
    for name, least in filters.min_scores:
        runs = _scored(runs, name, scorer)  # type: ignore[arg-type]  # checked above
        runs = [r for r in runs if r["scores"][name] >= least]
    if filters.top_fraction is not None and runs:
        by = filters.top_by
        if by is not None:
            runs = _scored(runs, by, scorer)  # type: ignore[arg-type]  # checked above
        rank = (lambda r: -r["gain"]) if by is None else (lambda r: -r["scores"][by])
        keep = max(1, int(len(runs) * filters.top_fraction)) if runs else 0
        top = {r["run_id"] for r in sorted(runs, key=rank)[:keep]}
        runs = [r for r in runs if r["run_id"] in top]
    return runs, len(listed)


def _scored(runs: list[dict], name: str, scorer: RunScorer) -> list[dict]:
    """The runs that have a `name` score (scored now where missing), each with it in `scores`."""
    todo = [r for r in runs if name not in r.get("scores", {})]
    found = scorer(name, todo) if todo else {}
    for r in todo:
        if r["run_id"] in found:
            r["scores"] = r.get("scores", {}) | {name: float(found[r["run_id"]])}
    return [r for r in runs if name in r.get("scores", {})]


# --- shared writing ---------------------------------------------------------------------------
def _png(store: TrajectoryStore, digest: str) -> bytes:
    path = store.images.path(digest)
    if not path.is_file():
        raise ExportError(f"image {digest[:12]} is missing from {store.images.root}")
    return path.read_bytes()


def _write_parquet(path: Path, features: Any, rows: Iterable[dict[str, Any]]) -> int:
    """Stream rows into one parquet file whose schema carries the `datasets` features."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    schema, count, batch = features.arrow_schema, 0, []
    with pq.ParquetWriter(path, schema) as writer:
        for row in rows:
            batch.append(row)
            if len(batch) == ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count, batch = count + len(batch), []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return count + len(batch)


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


# --- one writer per format: (store, runs, directory) -> rows ---------------------------------
def _write_sft(store: TrajectoryStore, runs: list[dict], out: Path) -> int:
    from datasets import Features, Image, Value

    folder = out / "imagefolder" / "train"
    (folder / ORIGINALS).mkdir(parents=True)
    kept = [r for r in runs if r.get("final_image") and original_image(r)]
    for run in kept:
        (folder / f"{run['run_id']}.png").write_bytes(_png(store, run["final_image"]))
        original = _png(store, original_image(run))  # type: ignore[arg-type]  # kept: it has one
        (folder / ORIGINALS / f"{run['run_id']}.png").write_bytes(original)
    metadata = (
        {
            "file_name": f"{r['run_id']}.png",
            "text": r["prompt"],
            # datasets' imagefolder reads a `<column>_file_name` key as another image column
            "original_file_name": f"{ORIGINALS}/{r['run_id']}.png",
        }
        for r in kept
    )
    _write_jsonl(folder / "metadata.jsonl", metadata)
    features = Features(
        {
            "image": Image(),
            "text": Value("string"),
            "original": Image(),
            "run_id": Value("string"),
            "score": Value("float64"),
            "gain": Value("float64"),
        }
    )

    def row(run: dict[str, Any]) -> dict[str, Any]:
        name = f"{run['run_id']}.png"
        return {
            "image": {"bytes": (folder / name).read_bytes(), "path": name},
            "text": run["prompt"],
            "original": {"bytes": (folder / ORIGINALS / name).read_bytes(), "path": name},
            "run_id": run["run_id"],
            "score": run["best_score"],
            "gain": run["gain"],
        }

    return _write_parquet(out / PARQUET, features, map(row, kept))


ORIGINALS = "original"  # imagefolder/train/original/<run_id>.png: each row's `original`


def original_image(run: dict[str, Any]) -> str | None:
    """The run's original image: its first iteration's image before any edit (what the base
    model drew for the prompt, the picked one of a best-of draw, or the person's image of a
    session started from one). ArtAug's differential training learns it first (LoRA1), so that
    the LoRA trained on the best images on top of it (LoRA2) learns only the enhancement."""
    return run["steps"][0].get("image") if run["steps"] else None


def edit_preferred(step: dict[str, Any]) -> bool | None:
    """Whether the judge found a step's edit better than the image before it: a person's
    verdict when one overruled the validator (accept: yes, reject: no), else the validator's
    `better_than_before`; None when the validator contradicts itself (rejects an edit it
    calls better): such a pair has no trustworthy label."""
    if step.get("decided_by", {}).get("verdict") == "human":
        return step.get("verdict") == "accept"
    judged = step.get("agents", {}).get("validate", {})
    better = judged.get("better_than_before")
    if better is None:  # a record without the comparison: the verdict alone says
        return step.get("verdict") != "reject"
    return None if better and judged.get("verdict") == "reject" else bool(better)


def dpo_pairs(run: dict[str, Any]) -> Iterator[tuple[str, str, float, str]]:
    """(image 0, image 1, label_0, source): each step's before vs after, labelled by the
    judge's comparison (`edit_preferred`), then the run's best vs worst step result."""
    for step in run["steps"]:
        before, after = step.get("image"), step.get("edited_image")
        if before and after and before != after:
            preferred = edit_preferred(step)
            if preferred is not None:
                yield before, after, 0.0 if preferred else 1.0, "edit"
    scored = [s for s in run["steps"] if s.get("score") is not None and s.get("result_image")]
    if len(scored) >= 2:
        best = max(scored, key=lambda s: s["score"])
        worst = min(scored, key=lambda s: s["score"])
        if best["score"] > worst["score"] and best["result_image"] != worst["result_image"]:
            yield best["result_image"], worst["result_image"], 1.0, "best_worst"


def _write_dpo(
    store: TrajectoryStore, runs: list[dict], out: Path, pairs: PairSource | None = None
) -> int:
    from datasets import Features, Value
    from PIL import Image

    @lru_cache(maxsize=64)  # the best result is usually also an edit pair's image
    def jpeg(digest: str) -> bytes:
        buf = io.BytesIO()
        Image.open(io.BytesIO(_png(store, digest))).convert("RGB").save(
            buf, "JPEG", quality=95, subsampling=0
        )
        return buf.getvalue()

    features = Features(
        {
            "caption": Value("string"),
            "jpg_0": Value("binary"),
            "jpg_1": Value("binary"),
            "label_0": Value("float64"),
            "label_1": Value("float64"),
            "run_id": Value("string"),
            "source": Value("string"),
        }
    )
    rows = (
        {
            "caption": run["prompt"],
            "jpg_0": jpeg(a),
            "jpg_1": jpeg(b),
            "label_0": label,
            "label_1": 1.0 - label,
            "run_id": run["run_id"],
            "source": source,
        }
        for run in runs
        for a, b, label, source in (pairs or dpo_pairs)(run)
    )
    return _write_parquet(out / PARQUET, features, rows)


def _write_prompts(store: TrajectoryStore, runs: list[dict], out: Path) -> int:
    unique = list(dict.fromkeys(r["prompt"] for r in runs))
    (out / "prompts.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in unique))
    records = ({"prompt": r["prompt"], "run_id": r["run_id"]} for r in runs)
    return _write_jsonl(out / "prompts.jsonl", records)


def step_images(step: dict[str, Any]) -> list[str]:
    """Every image hash a step record references (generated, edited, result, each edit's, each
    best-of candidate's)."""
    found = [step.get(k) for k in ("image", "edited_image", "result_image")]
    found += [op.get("image") for op in step.get("edits", [])]
    found += [c.get("image") for c in step.get("candidates", [])]
    return list(dict.fromkeys(d for d in found if d))


def _write_raw(store: TrajectoryStore, runs: list[dict], out: Path) -> int:
    (out / "images").mkdir()
    run_keys = (
        "run_id",
        "prompt",
        "status",
        "models",
        "prompts_version",
        "created_at",
        "best_score",
        "final_image",
    )
    for digest in {d for r in runs for s in r["steps"] for d in step_images(s)}:
        (out / "images" / f"{digest}.png").write_bytes(_png(store, digest))
    records = (
        {**{k: r[k] for k in run_keys}, "models": _public(r["models"]), "step": s}
        for r in runs
        for s in r["steps"]
    )
    return _write_jsonl(out / "steps.jsonl", records)


WRITERS: dict[str, Callable[[TrajectoryStore, list[dict], Path], int]] = {
    "sft": _write_sft,
    "dpo": _write_dpo,
    "prompts": _write_prompts,
    "raw": _write_raw,
}


# --- the card ---------------------------------------------------------------------------------
def _public(value: Any) -> Any:
    """Model identities without anything secret-looking (credentials, URL user info)."""
    return mask_secrets(value)


# What diffusers' Diffusion-DPO examples need to read a dpo export: they call
# load_dataset(--dataset_name, split=--dataset_split_name), whose default is "validation".
DPO_FLAGS = "--dataset_name <this dir> --dataset_split_name train"

ABOUT = {
    "sft": "One row per run: the user's original prompt (`text`), the run's best image "
    "(`image`) and its original image (`original`: the first iteration's image before any "
    "edit, what the base model drew for the prompt, or the person's image of a session "
    "started from one), with `run_id`, `score` and `gain`. Also as an imagefolder under "
    "`imagefolder/train/` (`metadata.jsonl` with `file_name`, `text` and "
    "`original_file_name`, the originals under `original/`). For diffusers' "
    "`train_text_to_image_lora.py`: `--dataset_name <this dir>` or "
    "`--train_data_dir <this dir>/imagefolder` (it reads `image` and `text`). "
    "`artloop train sft --differential` is ArtAug's differential training on the triples: "
    "a LoRA on `original`, fused into the base, then the LoRA that learns `image` on top.",
    "dpo": "Preference pairs in the Pick-a-Pic schema: `caption`, `jpg_0`/`jpg_1` (JPEG bytes), "
    "`label_0` (1.0 when `jpg_0` is preferred), `label_1`, `run_id`, `source` (`edit`: a step's "
    "image before vs after its edit, labelled by the judge's `better_than_before` or a person's "
    "verdict that overruled it, left out where the judge rejected an edit it called better; "
    "`best_worst`: a run's best vs worst step result; `best_worst_score`, with `--pairs "
    "best-worst`: the best vs the worst of N candidates for the run's prompt by the score the "
    "card's `pairs` names, whose model is under `scorers`). For "
    "diffusers' `diffusion_dpo` scripts (`train_diffusion_dpo.py`, `train_diffusion_dpo_sdxl.py`): "
    f"`{DPO_FLAGS}`. The split flag is needed: the scripts default to "
    "`--dataset_split_name validation` (Pick-a-Pic's small split), and this export has one "
    "split, `train`; a `validation` split holding the same rows would pass them off as held-out "
    "data, so there is none.",
    "prompts": "The runs' original prompts: `prompts.jsonl` (`prompt`, `run_id`) and "
    "`prompts.txt` (one per line, deduplicated).",
    "raw": "`steps.jsonl`: one line per step, the run's fields plus the whole step record "
    "(`step`); `images/<sha256>.png`: every image a step references.",
}


def _write_card(
    out: Path,
    result: ExportResult,
    runs: list[dict],
    scorers: dict[str, Any] | None = None,
    pairing: dict[str, Any] | None = None,
) -> None:
    models = {json.dumps(_public(r["models"]), sort_keys=True) for r in runs}
    provenance = {
        "artloop_version": __version__,
        "prompts_versions": sorted({r["prompts_version"] for r in runs}),
        "models": [json.loads(m) for m in sorted(models)],
        # the scorers this export scored with (filters, pairs): name -> Reward.identity()
        "scorers": _public(scorers or {}),
        **({"pairs": pairing} if pairing else {}),
        "filters": result.filters,
        "runs_considered": result.runs_considered,
        "runs_kept": result.runs_kept,
        "rows": result.rows,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    front = ["---"]
    if result.format in ("sft", "dpo"):
        front += [
            "configs:",
            "- config_name: default",
            "  data_files:",
            "  - split: train",
            "    path: data/train-*",
        ]
    front += ["task_categories:", "- text-to-image", "tags:", "- artloop", "- synthetic", "---"]
    body = [
        f"# artloop trajectories: {result.format}",
        "",
        ABOUT[result.format],
        "",
        f"Exported by artloop {__version__} from {result.runs_kept} of "
        f"{result.runs_considered} runs ({result.rows} rows).",
        "",
        "## Provenance",
        "",
        "```json",
        json.dumps(provenance, indent=2, ensure_ascii=False),
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(front + body), encoding="utf-8")


_PROVENANCE = re.compile(r"```json\n(.*?)\n```", re.S)


def provenance(out: Path) -> dict[str, Any] | None:
    """What the dataset card of the export in `out` records, or None: no card, or not one an
    artloop export wrote."""
    card = out / "README.md"
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    try:
        found = json.loads(match.group(1)) if (match := _PROVENANCE.search(text)) else None
    except json.JSONDecodeError:
        return None
    return found if isinstance(found, dict) and "artloop_version" in found else None


# Every path an export writes (any format), relative to OUT.
_EXPORT_FILES = re.compile(
    r"README\.md|steps\.jsonl|prompts\.(jsonl|txt)|data(/train-\d{5}-of-\d{5}\.parquet)?"
    r"|images(/[0-9a-f]{64}\.png)?"
    r"|imagefolder(/train(/([0-9a-f]{16}\.png|metadata\.jsonl|original(/[0-9a-f]{16}\.png)?))?)?"
)


def _replaceable(out: Path) -> None:
    """--overwrite replaces only an earlier export: its card, and nothing an export does not
    write (a user's file in it, or an unrelated directory, is refused, naming why)."""
    if provenance(out) is None:
        raise ExportError(
            f"{out} is not an earlier artloop export (no artloop dataset card "
            "README.md); not replacing it"
        )
    for path in sorted(out.rglob("*")):
        name = path.relative_to(out).as_posix()
        if path.is_symlink() or not _EXPORT_FILES.fullmatch(name):
            raise ExportError(
                f"{out} holds {name}, which no artloop export writes; not replacing it"
            )


# --- the export -------------------------------------------------------------------------------
def _target(store: TrajectoryStore, out_dir: Path, overwrite: bool) -> Path:
    out, home = Path(out_dir).expanduser().resolve(), store.home.expanduser().resolve()
    if out.is_relative_to(home):
        raise ExportError(f"{out} is inside the artloop home {home}; export somewhere else")
    if home.is_relative_to(out):
        raise ExportError(f"{out} contains the artloop home {home}; export somewhere else")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if blocker := next((p for p in out.parents if p.exists() and not p.is_dir()), None):
        raise ExportError(f"cannot export to {out}: {blocker} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty; pass --overwrite to replace it")
        _replaceable(out)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an existing OUT is replaced, never merged."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_dataset(
    store: TrajectoryStore,
    out_dir: str | Path,
    fmt: Format,
    filters: ExportFilters | None = None,
    *,
    overwrite: bool = False,
    scorer: RunScorer | None = None,
    scorers: dict[str, Any] | None = None,
    pairs: PairSource | None = None,
    pairing: dict[str, Any] | None = None,
) -> ExportResult:
    """Export the finished runs that match `filters` to `out_dir` in format `fmt`. `scorer`
    scores runs for the score filters; `scorers` (name -> identity) is what the card records of
    the scorers used; `pairs` (dpo only) replaces the judge's pairs of each run, `pairing` saying
    how on the card (e.g. {"pairs": "best-worst", "score": ..., "candidates": 8})."""
    if fmt not in WRITERS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    filters = filters or ExportFilters()
    filters.check()
    out = _target(store, Path(out_dir), overwrite)
    if pairs is not None and fmt != "dpo":
        raise ExportError(f"preference pairs are a dpo export's, not {fmt}'s")
    runs, considered = select_runs(store, filters, scorer)
    if not runs:
        raise ExportError(f"no runs match: {filters.describe()} ({considered} run(s) in store)")
    tmp = out.with_name(f".{out.name}.export-{uuid.uuid4().hex[:8]}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # beside OUT (one filesystem, so the final rename is atomic), umask applies
    except OSError as e:
        raise ExportError(f"cannot write to {out.parent}: {e.strerror or e}") from e
    try:
        if pairs is not None:
            rows = _write_dpo(store, runs, tmp, pairs)
        else:
            rows = WRITERS[fmt](store, runs, tmp)
        if rows == 0:
            matching = f"the {len(runs)} run(s) matching: {filters.describe()}"
            raise ExportError(f"no {fmt} rows from {matching}")
        result = ExportResult(
            path=out,
            format=fmt,
            rows=rows,
            runs_considered=considered,
            runs_kept=len(runs),
            filters=filters.as_dict(),
        )
        _write_card(tmp, result, runs, scorers, pairing)
        _publish(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # e.g. the disk filled up: nothing was published
            raise ExportError(f"cannot write the export to {out}: {e.strerror or e}") from e
        raise
    return result
