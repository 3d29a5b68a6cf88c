"""Scores of stored images by registered scorers, for what happens after a run: export filters
(`artloop export --min-score aesthetic=5.5`, `--top-fraction 0.02 --by pickscore`) and
best-vs-worst preference pairs. Scores are cached under the home (`scores.sqlite`), keyed by the
scorer, the identity of its model, the image's hash and the prompt (CLIP-like scorers read the
prompt), so a second export scores nothing again.

store/ cannot import rewards/ (it is the layer below), so the scoring lives here and reaches
store/export.py as plain callables.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

from artloop.rewards.registry import Reward, reward_entry, scorers_config
from artloop.store.export import ExportError, PairSource
from artloop.store.trajectories import TrajectoryStore
from artloop.tools.diffusion import DiffusionError, DiffusionTool, GenParams

CACHE = "scores.sqlite"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS scores (scorer TEXT NOT NULL, model TEXT NOT NULL, "
    "image TEXT NOT NULL, prompt TEXT NOT NULL, score REAL NOT NULL, "
    "PRIMARY KEY (scorer, model, image, prompt))"
)


def scorer_entries(names: Iterable[str], what: str = "scorer") -> dict[str, Reward]:
    """The registry entries of `names`; an unknown or unloadable one is an ExportError naming
    it (checked before anything is scored or written)."""
    entries = {}
    for name in dict.fromkeys(names):
        try:
            entries[name] = reward_entry(name)
        except ValueError as e:  # UnknownRewardError is one too
            raise ExportError(f"{what} {name!r}: {e}") from None
    return entries


class ScoreCache:
    """Scores by (scorer, model identity, image hash, prompt), in `scores.sqlite` under the home;
    the file is made on the first score written."""

    def __init__(self, home: str | Path) -> None:
        self.path = Path(home) / CACHE
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0)
        db.execute(_SCHEMA)
        return db

    def get(self, scorer: str, model: str, keys: list[tuple[str, str]]) -> dict[tuple, float]:
        if not keys or not self.path.is_file():
            return {}
        found: dict[tuple, float] = {}
        with self._lock, closing(self._db()) as db:
            for image, prompt in keys:
                row = db.execute(
                    "SELECT score FROM scores WHERE scorer = ? AND model = ? AND image = ? "
                    "AND prompt = ?",
                    (scorer, model, image, prompt),
                ).fetchone()
                if row is not None:
                    found[(image, prompt)] = row[0]
        return found

    def put(self, scorer: str, model: str, scores: dict[tuple[str, str], float]) -> None:
        if not scores:
            return
        with self._lock, closing(self._db()) as db, db:
            db.executemany(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?)",
                [(scorer, model, i, p, s) for (i, p), s in scores.items()],
            )


def _model_key(identity: dict[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StoreScorer:
    """Scores stored images by named scorers, cached (see ScoreCache). `identities` is what
    every scorer used so far recorded of itself (`Reward.identity()`), for the dataset card."""

    def __init__(self, store: TrajectoryStore, names: Iterable[str] = ()) -> None:
        self.store = store
        self.cache = ScoreCache(store.home)
        self.entries = scorer_entries(names)
        self.identities: dict[str, dict[str, Any]] = {}
        self.scored = 0  # images scored (not found in the cache)

    def entry(self, name: str) -> Reward:
        if name not in self.entries:
            self.entries |= scorer_entries([name])
        return self.entries[name]

    def identity(self, name: str) -> dict[str, Any]:
        if name not in self.identities:
            self.identities[name] = self.entry(name).identity()
        return self.identities[name]

    def score(
        self, name: str, items: list[tuple[str, str]], metadata: list[dict] | None = None
    ) -> list[float]:
        """The scores of (image hash, prompt) pairs by scorer `name`."""
        entry, model = self.entry(name), _model_key(self.identity(name))
        known = self.cache.get(name, model, items)
        todo = list(dict.fromkeys(k for k in items if k not in known))
        meta = dict(zip(items, metadata or [{} for _ in items], strict=True))
        size = max(1, scorers_config().batch_size)
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]
            images = [self.store.images.get(digest) for digest, _ in batch]
            try:
                scores, _ = entry.fn(images, [p for _, p in batch], [meta[k] for k in batch])
            except ValueError as e:
                raise ExportError(f"scorer {name!r}: {e}") from None
            new = {k: float(s) for k, s in zip(batch, scores, strict=True)}
            self.cache.put(name, model, new)
            known |= new
            self.scored += len(batch)
        return [known[k] for k in items]

    def __call__(self, name: str, runs: list[dict]) -> dict[str, float]:
        """A RunScorer (store/export.py): each run's best image scored by `name`."""
        runs = [r for r in runs if r.get("final_image")]
        items = [(r["final_image"], r["prompt"]) for r in runs]
        meta = [{"run_id": r["run_id"]} for r in runs]
        return dict(zip((r["run_id"] for r in runs), self.score(name, items, meta), strict=True))


# --- best-vs-worst preference pairs (AGFSync) ------------------------------------------------------
ToolFor = Callable[[dict], DiffusionTool]  # the diffusion tool that regenerates a run's prompt


def diffusion_tools(store: TrajectoryStore, device: str = "cpu") -> ToolFor:
    """A run's diffusion tool, from the model identity stored with it (model, family, dtype,
    LoRA): one per distinct identity, loaded on first use, writing into `store`'s images."""
    tools: dict[tuple, DiffusionTool] = {}

    def tool_for(run: dict) -> DiffusionTool:
        d = run["models"].get("diffusion") or {}
        if not d.get("model"):
            raise ExportError(f"run {run['run_id']} records no diffusion model to regenerate with")
        # Drawn with LoRAs (diffusion.lora: one {path, sha256, scale}, or a list of them in
        # order): regenerated with them.
        loras = d.get("lora") or []
        loras = [loras] if isinstance(loras, dict) else loras
        key = (
            d["model"],
            d.get("family") or "auto",
            d.get("dtype") or "float32",
            tuple(lora["path"] for lora in loras),
            tuple(lora.get("scale", 1.0) for lora in loras),
        )
        if key not in tools:
            model, family, dtype, paths, scales = key
            tools[key] = DiffusionTool(
                model=model,
                store=store.images,
                family=family,
                device=device,
                dtype=dtype,
                lora=list(paths),
                lora_scale=list(scales),
            )
        return tools[key]

    return tool_for


def candidates(run: dict, n: int, tool_for: ToolFor) -> list[str]:
    """Up to `n` candidate images for the run's prompt: the run's own step images first (each
    generated, edited and result image, once), then new images from the run's prompt with its
    first step's diffusion settings and seeds seed+1, seed+2, ... (stored in the image store)."""
    own = [
        digest
        for step in run["steps"]
        for digest in (step.get("image"), step.get("edited_image"), step.get("result_image"))
        if digest
    ]
    found = list(dict.fromkeys(own))[:n]
    params = next((s["params"] for s in run["steps"] if s.get("params")), None)
    if len(found) < n and params is not None:
        tool, base = tool_for(run), GenParams(**params)
        negative = next((s.get("negative_prompt") or "" for s in run["steps"]), "")
        for k in range(1, n - len(found) + 1):
            p = replace(base, seed=base.seed + k)
            try:
                found.append(tool.text_to_image(run["prompt"], negative, p))
            except DiffusionError as e:
                raise ExportError(f"run {run['run_id']}: {e}") from None
    return found


def best_worst_pairs(scorer: StoreScorer, name: str, n: int, tool_for: ToolFor) -> PairSource:
    """A dpo PairSource: per run, its `n` candidates scored by `name`; the best vs the worst
    (by the scorer's direction) as one pair, label_0 = 1.0 (jpg_0 the best). No pair when the
    candidates all score the same."""
    entry = scorer.entry(name)

    def pairs(run: dict) -> Iterator[tuple[str, str, float, str]]:
        found = candidates(run, n, tool_for)
        if len(found) < 2:
            return
        scores = scorer.score(name, [(d, run["prompt"]) for d in found])
        order = sorted(range(len(found)), key=lambda i: scores[i], reverse=entry.higher_is_better)
        best, worst = order[0], order[-1]
        if scores[best] != scores[worst] and found[best] != found[worst]:
            yield found[best], found[worst], 1.0, "best_worst_score"

    return pairs
