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
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

from artloop.rewards.registry import Reward, reward_entry, scorers_config
from artloop.store.export import ExportError
from artloop.store.trajectories import TrajectoryStore

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
