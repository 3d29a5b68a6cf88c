"""The human in the loop: where the refine graph pauses, what a person may answer there, and how
an answer changes the step.

A session lists its pause points in `pause_at` (any of PAUSES, or "all"). At each, the graph
calls LangGraph's `interrupt()` with a `Pause` payload and waits; `Command(resume=answer)` goes
on. Answers are `HumanAction`s, checked here before they touch the state, so a bad answer is a
clear error and the session stays paused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from artloop.agents.schemas import EditPlan, ParamChanges
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PAUSES = ("prompt", "plan", "verdict")  # after enhance, after thesis (before edit), at validate
Point = Literal["prompt", "plan", "verdict"]
ACTIONS: dict[str, tuple[str, ...]] = {
    "prompt": ("agent", "edit"),  # generate with the agent's prompt, or with the person's
    "plan": ("agent", "edit"),  # apply the agent's plan, or the person's version of it
    "verdict": ("agent", "accept", "reject"),  # keep the verdict, or overrule it
}


class HumanActionError(ValueError):
    """An answer at a pause is invalid; the message names the field."""


class Region(BaseModel):
    """A regional edit drawn by a person: a box (x1, y1, x2, y2 in 0-1000) and its local prompt."""

    model_config = ConfigDict(extra="forbid")
    box: Annotated[list[int], Field(min_length=4, max_length=4)]
    prompt: str = Field(min_length=1, max_length=300)
    strength: float = Field(0.6, ge=0.1, le=1.0)

    @field_validator("box")
    @classmethod
    def _in_range(cls, box: list[int]) -> list[int]:
        x1, y1, x2, y2 = box
        if not all(0 <= v <= 1000 for v in box):
            raise ValueError(f"box {box} is outside 0-1000 (coordinates normalised to 1000)")
        if not (x1 < x2 and y1 < y2):
            raise ValueError(f"box {box} is empty or inverted: need x1 < x2 and y1 < y2")
        return box


class Plan(EditPlan):
    """The plan the edit node applies: the agent's EditPlan, or a person's version of it (whose
    prompts and regions are not held to the agent's short constrained-decoding limits)."""

    revised_prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    regional_edits: list[Region] = Field(default_factory=list, max_length=8)  # type: ignore[assignment]
    rationale: str = Field("", max_length=2000)


class GenChanges(BaseModel):
    """Generation parameters a person may set at the prompt pause; None keeps the current."""

    model_config = ConfigDict(extra="forbid")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    width: int | None = Field(None, ge=64, le=2048)
    height: int | None = Field(None, ge=64, le=2048)
    num_inference_steps: int | None = Field(None, ge=1, le=100)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0)


class HumanAction(BaseModel):
    """A person's answer at a pause. `agent` lets the agent's proposal stand."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["agent", "edit", "accept", "reject"] = "agent"
    prompt: str | None = Field(None, min_length=1, max_length=2000)
    negative_prompt: str | None = Field(None, max_length=2000)
    regions: list[Region] | None = None  # at "plan": replaces the plan's regional edits
    params: GenChanges | None = None  # at "prompt"
    changes: ParamChanges | None = None  # at "plan": the plan's parameter changes
    note: str | None = Field(None, max_length=2000)


def check_action(point: str, answer: Any) -> HumanAction:
    """`answer` (a dict, or None for "agent") as a HumanAction valid at `point`."""
    if point not in ACTIONS:
        raise HumanActionError(f"unknown pause {point!r}: expected one of {PAUSES}")
    try:
        action = HumanAction.model_validate(answer or {})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "answer"
        raise HumanActionError(
            f"invalid answer at the {point} pause: {where}: {first['msg']}"
        ) from None
    if action.action not in ACTIONS[point]:
        raise HumanActionError(f"{action.action!r} is not an action at the {point} pause: "
                               f"choose from {', '.join(ACTIONS[point])}")  # fmt: skip
    allowed = {"prompt": {"prompt", "negative_prompt", "params"},
               "plan": {"prompt", "negative_prompt", "regions", "changes"},
               "verdict": set()}[point] | {"action", "note"}  # fmt: skip
    if extra := sorted(action.model_fields_set - allowed):
        raise HumanActionError(f"{', '.join(extra)} cannot be set at the {point} pause")
    return action


def pauses_at(state: dict, point: str) -> bool:
    wanted = state.get("pause_at") or []
    return "all" in wanted or point in wanted


def check_pause_at(points: list[str]) -> list[str]:
    """Validate a session's pause points."""
    if bad := [p for p in points if p not in (*PAUSES, "all")]:
        raise HumanActionError(
            f"unknown pause point(s) {bad}: choose from {', '.join(PAUSES)}, all"
        )
    return list(points)


def apply_to_prompt(step: dict, params: dict, action: HumanAction) -> tuple[dict, dict]:
    """The step and generation params after a person's answer at the prompt pause."""
    if action.action == "agent":
        return step, params
    step = {**step, "prompt": action.prompt or step["prompt"]}
    if action.negative_prompt is not None:
        step["negative_prompt"] = action.negative_prompt
    if action.params is not None:
        params = {**params, **action.params.model_dump(exclude_none=True)}
    return step, params


def apply_to_plan(plan: dict, action: HumanAction) -> dict:
    """The edit plan (a Plan's dict) after a person's answer at the plan pause."""
    plan = dict(plan)
    if action.action == "agent":
        return Plan.model_validate(plan).model_dump()
    if action.prompt is not None:
        plan["revised_prompt"] = action.prompt
    if action.negative_prompt is not None:
        plan["negative_prompt"] = action.negative_prompt
    if action.regions is not None:
        plan["regional_edits"] = [r.model_dump() for r in action.regions]
    if action.changes is not None:
        plan["params"] = {**plan["params"], **action.changes.model_dump(exclude_none=True)}
    return Plan.model_validate(plan).model_dump()


def record(step: dict, point: str, action: HumanAction) -> dict:
    """The step with who decided at `point` (agent or human) and the person's answer."""
    who = "agent" if action.action == "agent" else "human"
    decided = {**step.get("decided_by", {}), point: who}
    human = {**step.get("human", {}), point: action.model_dump(exclude_none=True)}
    return {**step, "decided_by": decided, "human": human}
