"""An experiment file resolved (`load_experiment`): its prompts found, one validated
ArtloopConfig per column (the baseline, then each variant: the base with the variant's overlay)
with its hash, its scorers checked against the variants' judges. Every bad input is an
ExperimentError of one line naming it. The file's schema is schema.py.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artloop.config import ArtloopConfig, ConfigError
from artloop.experiments.prompt_sets import PromptItem, PromptSetError, load_prompts
from artloop.experiments.schema import BASELINE, ExperimentError, ExperimentFile
from artloop.graphs.batch import BatchItem, item_run_id
from artloop.graphs.context import check_judge
from artloop.rewards import reward_entry
from pydantic import ValidationError

# The baseline: the base model's first image, text-to-image of the raw prompt with the seed and
# no agent (no enhancer, critic or edit; one iteration). Its "judge" only closes the one
# iteration: a measured statistic, so that no VLM is called; nothing is compared or chosen.
BASELINE_LOOP = {
    "enhancer": False,
    "critics": [],
    "edit_modes": [],
    "max_iters": 1,
    "best_of": 1,
    "judge": "brightness",
    "carry_edits": False,
    "memory": "last",
    "fact_scorers": [],
    "watch_scorers": [],
}
# Settings that change how fast a run goes, not what it makes: left out of a variant's hash,
# so that a resumed experiment may change them. (home: the experiment's directory.)
VOLATILE = {
    "": ("home", "serve", "checkpointer", "ui_url", "tags"),
    "chat": ("batch_window_ms", "max_concurrent_calls", "timeout_s", "max_retries"),
    "diffusion": ("batch_window_ms", "max_batch"),
    "scorers": ("batch_size",),
}


# --- resolution --------------------------------------------------------------------------------
@dataclass
class Experiment:
    """An experiment file resolved: its prompts, and each column's config and its hash
    (baseline first, when on)."""

    path: Path
    directory: Path  # the experiment's: its state, and the artloop home of its runs
    spec: ExperimentFile
    prompts: list[PromptItem]
    configs: dict[str, ArtloopConfig]
    hashes: dict[str, str]
    judged: dict[str, list[str]]  # scorer -> the variants it judges (allow_judge_as_scorer)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def variants(self) -> list[str]:
        return list(self.configs)

    @property
    def reference(self) -> str:
        return self.spec.reference or next(iter(self.spec.variants))

    def run_id(self, variant: str, prompt: PromptItem, seed: int) -> str:
        return run_id(self.name, variant, prompt, seed)

    def item(self, variant: str, prompt: PromptItem, seed: int) -> BatchItem:
        return batch_item(variant, prompt, seed)


def batch_item(variant: str, prompt: PromptItem, seed: int) -> BatchItem:
    return BatchItem(
        prompt=prompt.prompt, seed=seed, tags=[f"variant:{variant}", f"prompt:{prompt.id}"]
    )


def run_id(experiment: str, variant: str, prompt: PromptItem, seed: int) -> str:
    """A cell's run id, from (experiment, variant, prompt, seed) alone: a rerun finds it
    whatever else changed in the file (a prompt added, a seed added, the order)."""
    return item_run_id(f"experiment:{experiment}", 0, batch_item(variant, prompt, seed))


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _config(data: dict[str, Any], home: Path, who: str) -> ArtloopConfig:
    """`data` validated as an artloop config (home: the experiment's directory); a bad key or
    value is one line naming `who` and the key."""
    try:
        return ArtloopConfig(**{**data, "home": home})
    except ValidationError as e:
        bad = []
        for err in e.errors():
            key = ".".join(map(str, err["loc"])) or "(top)"
            bad.append(
                f"unknown key {key}" if err["type"] == "extra_forbidden" else f"{key}: {err['msg']}"
            )
        raise ExperimentError(f"{who}: {'; '.join(bad)}") from None


def comparable(cfg: ArtloopConfig) -> dict[str, Any]:
    """What a variant's runs depend on: its public config without the VOLATILE settings."""
    data = cfg.public_dict()
    for section, keys in VOLATILE.items():
        target = data if not section else data.get(section, {})
        for key in keys:
            target.pop(key, None)
    return data


def config_hash(cfg: ArtloopConfig) -> str:
    return hashlib.sha256(json.dumps(comparable(cfg), sort_keys=True).encode()).hexdigest()[:16]


def read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExperimentError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ExperimentError(f"{what} {path}: {e}") from None


def parse_file(path: Path) -> ExperimentFile:
    data = read_toml(path, "experiment file")
    try:
        return ExperimentFile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(map(str, err["loc"])) or "(top)"
        msg = "not an experiment field" if err["type"] == "extra_forbidden" else err["msg"]
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ExperimentError(f"experiment file {path}: {key}: {msg}{more}") from None


def experiment_dir(name: str, home: Path, out: Path | None = None) -> Path:
    """Where an experiment lives: `out`, else HOME/experiments/NAME."""
    return (out if out is not None else home / "experiments" / name).expanduser()


def load_experiment(path: str | Path, home: Path, out: Path | None = None) -> Experiment:
    """Read and check an experiment file: its prompts found, each variant's config valid (and
    its judges known), the scorers known and none a variant's judge unless allowed. Its
    directory (`experiment_dir`) is the runs' home; nothing is created here."""
    path = Path(path).expanduser()
    spec = parse_file(path)
    here = path.parent
    home = experiment_dir(spec.name, home, out)
    try:
        file = (here / spec.prompts.file) if spec.prompts.file else None
        if not (spec.prompts.set or file):
            raise PromptSetError("prompts: give a set or a file")
        prompts = load_prompts(
            spec.prompts.set, file, limit=spec.prompts.limit, categories=spec.prompts.categories
        )
    except PromptSetError as e:
        raise ExperimentError(str(e)) from None

    base: dict[str, Any] = {}
    if spec.base_config is not None:
        base = read_toml(here / spec.base_config, "base_config")
    base = _deep_merge(base, spec.base)
    base.pop("home", None)  # the experiment's directory is the runs' home
    _config(base, home, "base")
    columns = {BASELINE: {"loop": BASELINE_LOOP}} if spec.baseline else {}
    columns |= spec.variants
    configs: dict[str, ArtloopConfig] = {}
    for name, overlay in columns.items():
        if "home" in overlay:
            raise ExperimentError(f"variant '{name}': home is the experiment's directory")
        cfg = _config(_deep_merge(base, overlay), home, f"variant '{name}'")
        try:
            check_judge(cfg.loop)
        except ConfigError as e:
            raise ExperimentError(f"variant '{name}': {e}") from None
        configs[name] = cfg

    for scorer in spec.scorers:
        try:
            reward_entry(scorer)
        except ValueError as e:
            raise ExperimentError(f"scorers: {e}") from None
    judged: dict[str, list[str]] = {}
    for name, cfg in configs.items():
        if name == BASELINE:  # its placeholder judge chooses nothing
            continue
        loop = cfg.loop
        judges = {loop.judge: "loop.judge"}  # vlm: the validator, which the vlm reward asks too
        if loop.best_of > 1:
            judges.setdefault(loop.best_of_judge, "loop.best_of_judge")
        for scorer in spec.scorers:
            if scorer in judges:
                if not spec.allow_judge_as_scorer:
                    raise ExperimentError(
                        f"scorer '{scorer}' is variant '{name}''s judge ({judges[scorer]}): a "
                        "loop graded by what it optimised; score with another, or set "
                        "allow_judge_as_scorer = true (the report marks it)"
                    )
                judged.setdefault(scorer, []).append(name)

    if spec.reference is not None and spec.reference not in configs:
        raise ExperimentError(
            f"reference: '{spec.reference}' is not a variant (one of {', '.join(configs)})"
        )
    hashes = {name: config_hash(cfg) for name, cfg in configs.items()}
    return Experiment(path, home, spec, prompts, configs, hashes, judged)
