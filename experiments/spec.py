"""An experiment file resolved (`load_experiment`): its prompts found, one validated
ArtloopConfig per column (the baseline, then each variant: the base with the variant's overlay;
then, with [train], each LoRA column: the baseline with `diffusion.lora` set to the LoRA the
training stage will write) with its hash, its scorers checked against the variants' judges.
Every bad input is an ExperimentError of one line naming it. The file's schema is schema.py;
experiments/training.py runs the [train] stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artloop.config import ArtloopConfig, ConfigError, lora_entries
from artloop.experiments.prompt_sets import PromptItem, PromptSetError, load_prompts
from artloop.experiments.schema import BASELINE, ExperimentError, ExperimentFile, Prompts, Train
from artloop.graphs.batch import BatchItem, item_run_id
from artloop.graphs.context import check_judge
from artloop.rewards import reward_entry
from artloop.trainers.common import TrainerConfigError
from artloop.trainers.dpo import DPOConfig
from artloop.trainers.sft import SFTConfig
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
    "": ("home", "serve", "checkpointer", "ui_url", "tags", "tracking"),
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
    # What each column's hash is of: its comparable config (+ its training, a LoRA column's).
    records: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    train: TrainPlan | None = None

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


TRAINER_CONFIGS = {"sft": SFTConfig, "dpo": DPOConfig}
HARNESS_FIELDS = ("data", "output_dir", "model", "seed", "resume")  # the [train] stage sets these


@dataclass
class TrainPlan:
    """[train] resolved: its prompts, each trainer's settings and learning rates, the LoRA
    columns (column -> (trainer, training seed)) and, where a trainer has several rates, the
    trial columns that choose one (trial -> (trainer, rate), each with its config). Its
    outputs live in `directory` (DIR/train)."""

    spec: Train
    directory: Path
    prompts: list[PromptItem]
    validation: list[PromptItem]
    validation_seeds: list[int]
    select_by: str
    options: dict[str, dict[str, Any]]  # trainer -> its config fields, learning_rate aside
    rates: dict[str, list[float]]
    loras: dict[str, tuple[str, int]]
    trials: dict[str, tuple[str, float]]
    trial_configs: dict[str, ArtloopConfig]
    # What the LoRAs are trained on: the base model (None), or a model directory standing for
    # it (ArtAug's rounds: the base with the earlier rounds' LoRAs fused in, experiments/rounds.py).
    base_model: str | None = None
    # Export filters beyond accepted_only (store/export.ExportFilters' fields: min_gain, ...).
    filters: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def collect_from(self) -> str:
        return self.spec.collect_from

    def lora_dir(self, column: str) -> Path:
        return self.directory / "loras" / column

    def trial_dir(self, trial: str) -> Path:
        return self.directory / "trials" / trial.removeprefix("train:")


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
    """What a variant's runs depend on: its public config without the VOLATILE settings (and
    without diffusion.lora when unset; a LoRA in the experiment's directory by its place
    there, so that the directory may move)."""
    data = cfg.public_dict()
    for section, keys in VOLATILE.items():
        target = data if not section else data.get(section, {})
        for key in keys:
            target.pop(key, None)
    diffusion = data.get("diffusion", {})
    if diffusion.get("lora", 0) is None:
        diffusion.pop("lora")
    elif cfg.diffusion.lora is not None:  # one LoRA ({path, scale}) or several (a list)
        dumped = diffusion["lora"] if isinstance(diffusion["lora"], list) else [diffusion["lora"]]
        for entry, lora in zip(dumped, lora_entries(cfg.diffusion.lora), strict=True):
            if lora.path.is_relative_to(cfg.home):
                entry["path"] = lora.path.relative_to(cfg.home).as_posix()
    return data


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg: ArtloopConfig) -> str:
    return record_hash(comparable(cfg))


def read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExperimentError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ExperimentError(f"{what} {path}: {e}") from None


def parse_file(path: Path, schema: type[Any] = ExperimentFile, what: str = "experiment") -> Any:
    """The file at `path` as `schema` (a pydantic model; rounds.py's too): a mistake is one
    line naming the key."""
    data = read_toml(path, f"{what} file")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(map(str, err["loc"])) or "(top)"
        msg = f"not {'an' if what[0] in 'aeiou' else 'a'} {what} field"
        msg = msg if err["type"] == "extra_forbidden" else err["msg"]
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ExperimentError(f"{what} file {path}: {key}: {msg}{more}") from None


def experiment_dir(name: str, home: Path, out: Path | None = None) -> Path:
    """Where an experiment lives: `out`, else HOME/experiments/NAME."""
    return (out if out is not None else home / "experiments" / name).expanduser()


def load_experiment(path: str | Path, home: Path, out: Path | None = None) -> Experiment:
    """Read and check an experiment file: its prompts found, each variant's config valid (and
    its judges known), the scorers known and none a variant's judge unless allowed. Its
    directory (`experiment_dir`) is the runs' home; nothing is created here."""
    path = Path(path).expanduser()
    return resolve_experiment(parse_file(path), path, home, out)


def resolve_experiment(
    spec: ExperimentFile, path: Path, home: Path, out: Path | None = None
) -> Experiment:
    """`load_experiment` of a parsed file (`path`: where it is; its relative paths are from
    its folder): what experiments/rounds.py builds for each round."""
    here = path.parent
    home = experiment_dir(spec.name, home, out)
    prompts = _prompts(spec.prompts, here, "prompts")

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
    records = {name: comparable(cfg) for name, cfg in configs.items()}
    plan = None
    if spec.train is not None:
        plan = _train_plan(spec, spec.train, here, base, home, prompts, configs)
        collected_with = record_hash(records[plan.collect_from])
        for column, (trainer, seed) in plan.loras.items():
            configs[column] = _lora_config(base, home, plan.lora_dir(column), spec.train, column)
            records[column] = comparable(configs[column]) | {
                "train": _train_record(plan, trainer, seed) | {"collected_with": collected_with}
            }
    hashes = {name: record_hash(record) for name, record in records.items()}
    return Experiment(path, home, spec, prompts, configs, hashes, judged, records, plan)


# --- [train] -------------------------------------------------------------------------------------
def _prompts(given: Prompts, here: Path, where: str) -> list[PromptItem]:
    try:
        file = (here / given.file) if given.file else None
        if not (given.set or file):
            raise PromptSetError(f"{where}: give a set or a file")
        return load_prompts(given.set, file, limit=given.limit, categories=given.categories)
    except PromptSetError as e:
        raise ExperimentError(str(e)) from None


def _lora_config(base: dict, home: Path, lora: Path, train: Train, who: str) -> ArtloopConfig:
    """A column of the base model with `lora` and no loop (the baseline's settings). Where the
    base draws with LoRAs already (an ArtAug round's earlier rounds), `lora` is fused after them."""
    new = {"path": str(lora), "scale": train.scale}
    given = base.get("diffusion", {}).get("lora")
    if given:  # the same forms the config takes: a path, {path, scale}, or a list of them
        earlier = given if isinstance(given, list) else [given]
        new = [*({"path": e} if isinstance(e, str | Path) else e for e in earlier), new]
    overlay = {"loop": BASELINE_LOOP, "diffusion": {"lora": new}}
    return _config(_deep_merge(base, overlay), home, f"train column '{who}'")


def _trainer_options(
    name: str, given: dict[str, Any], model: str, width: int, height: int
) -> tuple[dict[str, Any], list[float]]:
    """A trainer's fields, checked by building its config (placeholders for the data and the
    output), and its learning rates (one, or a list to choose from)."""
    cls = TRAINER_CONFIGS[name]
    options = dict(given)
    if taken := [k for k in HARNESS_FIELDS if k in options]:
        raise ExperimentError(f"train.{name}.{taken[0]}: set by the [train] stage, not the file")
    rate = options.pop("learning_rate", None)
    if rate is None:
        rate = next(f.default for f in dataclasses.fields(cls) if f.name == "learning_rate")
    given_rates = rate if isinstance(rate, list) else [rate]
    if not given_rates or not all(isinstance(r, int | float) for r in given_rates):
        raise ExperimentError(f"train.{name}.learning_rate: a number, or a list of numbers")
    rates = [float(r) for r in given_rates]
    if len(set(rates)) != len(rates):
        raise ExperimentError(f"train.{name}.learning_rate: a rate is listed twice")
    if "resolution" not in options:
        if width != height:
            raise ExperimentError(f"train.{name}.resolution: give it (the images are not square)")
        options["resolution"] = width
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := [k for k in options if k not in known]:
        raise ExperimentError(
            f"train.{name}: unknown field '{unknown[0]}' (`artloop train {name} --help`)"
        )
    try:
        for rate in rates:
            cls(data="(the export)", model=model, learning_rate=rate, **options)
    except TrainerConfigError as e:
        raise ExperimentError(f"train.{name}: {e}") from None
    return options, rates


def _train_plan(
    spec: ExperimentFile,
    train: Train,
    here: Path,
    base: dict[str, Any],
    home: Path,
    prompts: list[PromptItem],
    configs: dict[str, ArtloopConfig],
) -> TrainPlan:
    if train.collect_from not in spec.variants:
        raise ExperimentError(
            f"train.collect_from: '{train.collect_from}' is not a variant "
            f"(one of {', '.join(spec.variants)})"
        )
    if BASELINE not in configs:
        raise ExperimentError(
            "train: needs the baseline (baseline = true): LoRAs are paired with it"
        )
    collect = _prompts(train.prompts, here, "train.prompts")
    validation = _prompts(train.validation, here, "train.validation") if train.validation else []
    evaluated = {p.prompt for p in prompts}
    for where, items in (("train.prompts", collect), ("train.validation", validation)):
        if shared := [p.prompt for p in items if p.prompt in evaluated]:
            raise ExperimentError(
                f"{where}: {len(shared)} of them are evaluation prompts too (e.g. "
                f"{shared[0]!r}): a LoRA would be scored on what it was trained or chosen on"
            )
    d, loop = configs[BASELINE].diffusion, configs[train.collect_from].diffusion
    if loop.model != d.model:
        raise ExperimentError(
            f"train.collect_from: variant '{train.collect_from}' draws with {loop.model!r}, the "
            f"baseline with {d.model!r}: its LoRAs would be trained on one and drawn with the other"
        )
    options, rates = {}, {}
    for name in TRAINER_CONFIGS:
        given = getattr(train, name)
        if given is not None:
            options[name], rates[name] = _trainer_options(name, given, d.model, d.width, d.height)
    if not options:
        raise ExperimentError("train: name a trainer ([train.sft] or [train.dpo])")
    if any(len(r) > 1 for r in rates.values()) and not validation:
        raise ExperimentError(
            "train.validation: several learning rates are chosen among on validation prompts: "
            'give them (e.g. set = "shapes-val")'
        )
    select_by = train.select_by or spec.scorers[0]
    try:
        reward_entry(select_by)
    except ValueError as e:
        raise ExperimentError(f"train.select_by: {e}") from None
    loras = {f"{t}-seed{s}": (t, s) for t in options for s in train.training_seeds}
    if taken := [n for n in loras if n in configs]:
        raise ExperimentError(f"variant '{taken[0]}': the name of a LoRA column of [train]")
    plan = TrainPlan(
        spec=train,
        directory=home / "train",
        prompts=collect,
        validation=validation,
        validation_seeds=train.validation_seeds or spec.seeds,
        select_by=select_by,
        options=options,
        rates=rates,
        loras=loras,
        trials={
            f"train:{t}-lr{r:g}": (t, r) for t in options if len(rates[t]) > 1 for r in rates[t]
        },
        trial_configs={},
    )
    for trial in plan.trials:
        plan.trial_configs[trial] = _lora_config(base, home, plan.trial_dir(trial), train, trial)
    return plan


def _train_record(plan: TrainPlan, trainer: str, seed: int) -> dict[str, Any]:
    """What a LoRA column's LoRA depends on (its part of the column's hash): a training seed
    added leaves the other columns' hashes as they were."""
    choosing = ("validation", "validation_seeds", "select_by")
    skip = {"training_seeds", "scale", *choosing, *TRAINER_CONFIGS}
    record = plan.spec.model_dump(mode="json", exclude=skip) | {
        "trainer": trainer,
        "options": plan.options[trainer],
        "learning_rates": plan.rates[trainer],
        "seed": seed,
    }
    if len(plan.rates[trainer]) > 1:  # the rate is chosen: on what, by what, with which seed
        record |= {
            "validation": plan.spec.model_dump(mode="json")["validation"],
            "validation_seeds": plan.validation_seeds,
            "select_by": plan.select_by,
            "chosen_with_seed": plan.spec.training_seeds[0],
        }
    return record
