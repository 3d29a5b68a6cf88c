"""The experiment file (TOML) as pydantic models: what each field means is its description,
which is also the CLI's help (`field_guide`). Light on purpose (pydantic and the standard
library only): `artloop --help` imports it. spec.py resolves a file into runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

BASELINE = "baseline"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ExperimentError(ValueError):
    """The experiment file or directory is invalid; the message (one line) names what."""


class Prompts(BaseModel):
    """[prompts]: which prompts, from a named set or a local file."""

    model_config = ConfigDict(extra="forbid")
    set: str | None = Field(
        None,
        description="A named set: shapes (the shapes world's held-out captions; shapes-train, "
        "shapes-val: its training and validation captions), drawbench, "
        "partiprompts, genai-bench, tifa-v1.0 or hpsv2 (from a local copy in `file`, a "
        "package's cache, or its Hugging Face dataset)",
    )
    file: Path | None = Field(
        None,
        description="A local file (relative to the experiment file): .txt (a prompt per line), "
        ".csv/.tsv (a prompt column, optional category), .jsonl ({prompt, category}) or .json; "
        "with `set`, that set's own file (e.g. tifa_v1.0_text_inputs.json)",
    )
    limit: int | None = Field(
        None, ge=1, le=100_000, description="Only the first N prompts (after `categories`)"
    )
    categories: list[str] = Field(
        default_factory=list, description="Only prompts in any of these categories"
    )


TRAINERS = ("sft", "dpo")


def _distinct_seeds(value: list[int]) -> list[int]:
    if len(set(value)) != len(value):
        raise ValueError("a seed is listed twice")
    if any(not 0 <= s < 2**63 for s in value):
        raise ValueError("each seed is in 0 .. 2**63 - 1")
    return value


class Train(BaseModel):
    """[train]: the effect study's stages, run before the columns: collect loop sessions on
    other prompts, export them, train LoRAs on them; each LoRA is a column (`sft-seed0`, ...):
    the base model with it and no loop, beside the baseline and the loop it learnt from."""

    model_config = ConfigDict(extra="forbid")
    collect_from: str = Field(
        description="The variant whose sessions collect the training data (and whose gain over "
        "the baseline each LoRA's change is a share of)"
    )
    prompts: Prompts = Field(
        description='[train.prompts]: the collection prompts (e.g. set = "shapes-train"); '
        "none may be an evaluation prompt"
    )
    seeds: list[int] = Field(
        default=[0], min_length=1, max_length=1000, description="Collection diffusion seeds"
    )
    accepted_only: bool = Field(
        True, description="Export the accepted sessions only (else every finished one)"
    )
    sft: dict[str, Any] | None = Field(
        None,
        description="[train.sft]: train sft LoRAs on the sft export, with these `artloop train "
        "sft` fields (train_steps, batch_size, rank, ...; data, output_dir, model and seed are "
        "the harness's; resolution defaults to the base's width); learning_rate may be a list, "
        "each tried on the validation prompts",
    )
    dpo: dict[str, Any] | None = Field(
        None, description="[train.dpo]: the same for Diffusion-DPO on the dpo export (beta, ...)"
    )
    training_seeds: list[int] = Field(
        default=[0],
        min_length=1,
        max_length=100,
        description="One LoRA per seed and trainer: the columns sft-seed0, dpo-seed0, ...",
    )
    validation: Prompts | None = Field(
        None,
        description="[train.validation]: the prompts a learning rate is chosen on (e.g. set = "
        '"shapes-val"), by the first training seed\'s LoRAs; needed for several rates',
    )
    validation_seeds: list[int] | None = Field(
        None, description="Seeds for the validation prompts (default: the experiment's seeds)"
    )
    select_by: str | None = Field(
        None, description="The scorer that chooses the learning rate (default: the first scorer)"
    )
    scale: float = Field(1.0, ge=0.0, le=10.0, description="The LoRA columns' diffusion.lora.scale")

    @field_validator("seeds", "training_seeds", "validation_seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else _distinct_seeds(value)


class ExperimentFile(BaseModel):
    """An experiment: every (variant, prompt, seed) runs the loop, plus the baseline (no loop);
    the final images are scored by evaluation scorers and compared pair by pair."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        description="The experiment's name: its directory (HOME/experiments/NAME unless "
        "--out) and part of every run id, so a rerun resumes it"
    )
    description: str = Field("", description="Free text, shown in the report")
    prompts: Prompts = Field(description="[prompts]: set or file, limit, categories")
    seeds: list[int] = Field(
        min_length=1,
        max_length=1000,
        description="Diffusion seeds: every prompt runs once per seed, in every variant",
    )
    base_config: Path | None = Field(
        None,
        description="An artloop TOML config (relative to the experiment file) every variant "
        "starts from; its home is ignored (runs live in the experiment's directory)",
    )
    base: dict[str, Any] = Field(
        default_factory=dict,
        description="[base]: config keys over base_config, as in an artloop TOML "
        '([base.diffusion] model = "tiny-shapes-sd"); environment variables fill in the rest',
    )
    variants: dict[str, dict[str, Any]] = Field(
        min_length=1,
        description="[variants.NAME]: each an overlay of config keys on the base, e.g. "
        'loop = {critics = ["data_cot", "thesis_cot"]} or loop = {critics = "merged"}; '
        "an empty table runs the base as it is",
    )
    baseline: bool = Field(
        True,
        description="Also the base model's first image: text-to-image of the raw prompt with "
        "the seed, no agents (the `baseline` column, what every variant is paired with)",
    )
    scorers: list[str] = Field(
        min_length=1,
        description="Evaluation scorers (reward names: shapes, clip, hpsv2, composite:..., a "
        "plugin): each scores every final image against the original prompt; none may be a "
        "variant's judge (loop.judge, vlm = the validator; loop.best_of_judge)",
    )
    reference: str | None = Field(
        None,
        description="The variant every other is also compared with, pair by pair (default: the "
        "first variant)",
    )
    allow_judge_as_scorer: bool = Field(
        False,
        description="Let a variant's judge also score it (the report marks each such score): "
        "a loop graded by what it optimised looks better than it is",
    )
    concurrency: int = Field(4, ge=1, le=1024, description="Sessions at once (per variant)")
    score_iterations: bool = Field(
        True,
        description="Also score the image each iteration kept (the score-by-iteration plot)",
    )
    bootstrap: int = Field(
        2000, ge=100, le=100_000, description="Bootstrap resamples for the 95% intervals"
    )
    grid_rows: int = Field(
        48, ge=1, le=10_000, description="At most this many (prompt, seed) rows in the grid"
    )
    train: Train | None = Field(
        None,
        description="[train]: the effect study (collect, export, train LoRAs, then their "
        "columns); see train.*",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("letters, digits, _ . - only (at most 64), starting with one")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        return _distinct_seeds(value)

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in value:
            if name == BASELINE:
                raise ValueError(f"'{BASELINE}' is the no-loop column's name: pick another")
            if not NAME.match(name):
                raise ValueError(f"'{name}': letters, digits, _ . - only")
        return value


def field_guide() -> str:
    """Every field of the experiment file with its description (the CLI's help)."""
    lines = []
    for model, prefix in ((ExperimentFile, ""), (Prompts, "prompts."), (Train, "train.")):
        for name, f in model.model_fields.items():
            if name == "prompts" and model is ExperimentFile:
                continue
            lines.append(f"{prefix}{name}: {f.description}")
    return "\n".join(lines)
