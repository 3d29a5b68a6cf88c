"""The ROUNDS file of `artloop rounds` (ArtAug's iterated enhancement) as pydantic models: what
each field means is its description, which is also the CLI's help. Light on purpose (pydantic
and the experiment schema only): `artloop --help` imports it. experiments/rounds.py runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from artloop.experiments.schema import NAME, Prompts, _distinct_seeds
from pydantic import BaseModel, ConfigDict, Field, field_validator


class Collect(BaseModel):
    """[collect]: the sessions each round collects with the loop (on the base model and every
    earlier round's LoRA)."""

    model_config = ConfigDict(extra="forbid")
    prompts: Prompts = Field(
        description='[collect.prompts]: the collection prompts (e.g. set = "shapes-train"); '
        "none may be an evaluation prompt"
    )
    seeds: list[int] = Field(
        default=[0], min_length=1, max_length=1000, description="Collection diffusion seeds"
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        return _distinct_seeds(value)


class Filter(BaseModel):
    """[filter]: which collected sessions become training data (`artloop export`'s filters)."""

    model_config = ConfigDict(extra="forbid")
    accepted_only: bool = Field(True, description="Only the sessions the validator accepted")
    min_gain: float | None = Field(
        None, allow_inf_nan=False, description="Only sessions whose best score minus first >= this"
    )
    top_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="Only this fraction of them by gain (at least one)"
    )


class RoundTrain(BaseModel):
    """[train]: the LoRA each round trains on its export (`artloop train sft`)."""

    model_config = ConfigDict(extra="forbid")
    differential: bool | Literal["auto"] = Field(
        "auto",
        description="ArtAug's differential training (`artloop train sft --differential`: a LoRA "
        "on the originals fused, the round's LoRA on the enhanced images on top); auto: when "
        "the installed trainer has it",
    )
    seed: int = Field(0, ge=0, lt=2**63, description="The training seed")
    scale: float = Field(
        1.0, gt=0.0, le=10.0, description="Each round's LoRA's diffusion.lora scale"
    )
    sft: dict[str, Any] = Field(
        default_factory=dict,
        description="[train.sft]: `artloop train sft` fields (train_steps, batch_size, "
        "learning_rate: one rate, rank, ...; data, output_dir, model, seed and differential "
        "are the rounds'; resolution defaults to the base's width)",
    )


class Evaluate(BaseModel):
    """[eval]: held-out prompts and seeds on which each round's model (base + its LoRAs so far,
    no loop) is compared with the one before it."""

    model_config = ConfigDict(extra="forbid")
    prompts: Prompts = Field(description='[eval.prompts]: e.g. set = "shapes" (held out)')
    seeds: list[int] = Field(min_length=1, max_length=1000, description="Evaluation seeds")
    loop: bool = Field(
        False,
        description="Also run the loop on the evaluation prompts each round (what it reaches "
        "on the same model, beside the LoRAs; costs a loop session per cell)",
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        return _distinct_seeds(value)


class RoundsFile(BaseModel):
    """ArtAug's rounds: each round collects loop sessions on the base model with every earlier
    round's LoRA, filters and exports them, trains a LoRA, and evaluates base + the LoRAs so far
    against the round before, with no loop, by scorers the loop does not see."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        description="Its name: the directory (HOME/rounds/NAME unless --out) and part of every "
        "run id, so a rerun resumes it"
    )
    description: str = Field("", description="Free text")
    rounds: int = Field(2, ge=1, le=20, description="How many rounds")
    base_config: Path | None = Field(
        None,
        description="An artloop TOML config (relative to this file) the loop and the models "
        "start from; its home is ignored",
    )
    base: dict[str, Any] = Field(
        default_factory=dict,
        description="[base]: config keys over base_config ([base.chat], [base.diffusion], "
        "[base.loop]): the collecting loop's settings; diffusion.lora gains each round's LoRA",
    )
    scorers: list[str] = Field(
        min_length=1,
        description="Evaluation scorers (reward names); none may be the loop's judge",
    )
    allow_judge_as_scorer: bool = Field(
        False, description="Let the loop's judge score the rounds too (marked)"
    )
    concurrency: int = Field(4, ge=1, le=1024, description="Sessions at once")
    bootstrap: int = Field(
        2000, ge=100, le=100_000, description="Bootstrap resamples for the 95% intervals"
    )
    collect: Collect = Field(description="[collect]: prompts and seeds of each round's sessions")
    filter: Filter = Field(default_factory=Filter, description="[filter]: export filters")
    train: RoundTrain = Field(default_factory=RoundTrain, description="[train]: the LoRA")
    eval: Evaluate = Field(description="[eval]: held-out prompts and seeds")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value) or len(value) > 56:
            raise ValueError("letters, digits, _ . - only (at most 56), starting with one")
        return value


def rounds_guide() -> str:
    """Every field of the ROUNDS file with its description (the CLI's help)."""
    lines = []
    parts: list[tuple[type[BaseModel], str]] = [
        (RoundsFile, ""),
        (Collect, "collect."),
        (Filter, "filter."),
        (RoundTrain, "train."),
        (Evaluate, "eval."),
    ]
    for model, prefix in parts:
        for name, f in model.model_fields.items():
            if model is RoundsFile and name in ("collect", "filter", "train", "eval"):
                continue
            lines.append(f"{prefix}{name}: {f.description}")
    return "\n".join(lines)
