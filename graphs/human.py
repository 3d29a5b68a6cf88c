"""The human in the loop: where the refine graph pauses, what a person may answer there, and how
an answer changes the step.

A session lists its pause points in `pause_at` (any of PAUSES, or "all"). At each, the graph
calls LangGraph's `interrupt()` with a self-describing payload (`pause_payload`: the images'
paths, the allowed actions and what each does, the JSON schema of a valid answer) and waits;
`Command(resume=answer)` goes on. Answers are `HumanAction`s, checked here before they touch
the state: an invalid one is asked again, with the error in the payload.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from artloop.agents.schemas import EditPlan, HumanBox, ParamChanges
from artloop.config import MAX_PROMPT_CHARS
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PAUSES = ("prompt", "plan", "verdict")  # after enhance, after thesis (before edit), at validate
Point = Literal["prompt", "plan", "verdict"]
# What a person may answer at each pause, and what each answer does.
ACTIONS: dict[str, dict[str, str]] = {
    "prompt": {
        "agent": "generate with the enhancer's prompt and the current parameters",
        "edit": "generate with your prompt, negative_prompt and/or params (seed, width, height, "
        "num_inference_steps, guidance_scale); what you leave out stays",
    },
    "plan": {
        "agent": "apply the thesis agent's edit plan as proposed",
        "edit": "apply your version of the plan: prompt (the revised prompt), negative_prompt, "
        "regions (box edits: [x1, y1, x2, y2] in 0-1000 and a local prompt; replace the "
        "plan's), changes (its parameter changes); what you leave out stays",
    },
    "verdict": {
        "agent": "keep the validator's verdict (accept, revise or reject)",
        "accept": "accept this edited image and finish the session",
        "reject": "reject this edit: the iteration keeps the image before it, and the loop goes on",
    },
}
# The fields an answer may set at each pause (besides `action` and `note`).
FIELDS = {
    "prompt": ("prompt", "negative_prompt", "params"),
    "plan": ("prompt", "negative_prompt", "regions", "changes"),
    "verdict": (),
}


class HumanActionError(ValueError):
    """An answer at a pause is invalid; the message names the field."""


class Region(BaseModel):
    """A regional edit drawn by a person: a box (x1, y1, x2, y2 in 0-1000) and its local prompt."""

    model_config = ConfigDict(extra="forbid")
    box: HumanBox
    prompt: str = Field(min_length=1, max_length=300)
    strength: float = Field(0.6, ge=0.1, le=1.0)


class Plan(EditPlan):
    """The plan the edit node applies: the agent's EditPlan, or a person's version of it (whose
    prompts and regions are not held to the agent's short constrained-decoding limits)."""

    revised_prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    regional_edits: list[Region] = Field(default_factory=list, max_length=8)  # type: ignore[assignment]
    rationale: str = Field("", max_length=MAX_PROMPT_CHARS)


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
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    regions: list[Region] | None = None  # at "plan": replaces the plan's regional edits
    params: GenChanges | None = None  # at "prompt"
    changes: ParamChanges | None = None  # at "plan": the plan's parameter changes
    note: str | None = Field(None, max_length=MAX_PROMPT_CHARS)


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
        raise HumanActionError(
            f"{action.action!r} is not an action at the {point} pause: "
            f"choose from {', '.join(ACTIONS[point])}"
        )
    allowed = {*FIELDS[point], "action", "note"}
    if extra := sorted(action.model_fields_set - allowed):
        raise HumanActionError(f"{', '.join(extra)} cannot be set at the {point} pause")
    return action


@cache
def answer_schema(point: str) -> dict:
    """The JSON schema of a valid answer at `point` (HumanAction, narrowed to that pause)."""
    schema = HumanAction.model_json_schema()
    keep = {*FIELDS[point], "action", "note"}
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k in keep}
    schema["properties"]["action"] = {
        **schema["properties"]["action"],
        "enum": list(ACTIONS[point]),
    }
    schema["title"] = f"Answer at the {point} pause"
    return schema


def pause_payload(
    point: str,
    state: dict,
    proposal: dict,
    images: Any,
    ui_url: str | None,
    error: str | None = None,
) -> dict:
    """What `interrupt()` sends at `point`: everything a client needs to show the pause and to
    answer it. `images` is the ImageStore; `ui_url`, where `artloop serve ui` serves them."""
    step = state["step"]
    payload: dict[str, Any] = {
        "pause": point,
        "run_id": state["run_id"],
        "iteration": step["iteration"],
        "proposal": proposal,
    }
    for key in ("image", "edited_image"):
        digest = step.get(key)
        path = str(images.path(digest)) if digest else None
        url = f"{ui_url.rstrip('/')}/gradio_api/file={path}" if ui_url and path else None
        payload |= {key: digest, f"{key}_path": path, f"{key}_url": url}
    return payload | {
        "actions": ACTIONS[point],
        "answer_schema": answer_schema(point),
        "error": error,
    }


def pauses_at(state: dict, point: str) -> bool:
    wanted = state.get("pause_at") or []
    return "all" in wanted or point in wanted


def check_pause_at(points: str | list[str], *, plans: bool = True) -> list[str]:
    """Validate a session's pause points (one point may be given as a string); `plans`: whether
    the session's loop makes a plan to pause at (loop.critics with thesis_cot; "all" pauses
    wherever there is a point)."""
    points = [points] if isinstance(points, str) else points
    if not isinstance(points, list | tuple) or not all(isinstance(p, str) for p in points):
        raise HumanActionError(f"pause_at must be a pause point or a list of them, got {points!r}")
    if bad := [p for p in points if p not in (*PAUSES, "all")]:
        raise HumanActionError(
            f"unknown pause point(s) {bad}: choose from {', '.join(PAUSES)}, all"
        )
    if "plan" in points and not plans:
        raise HumanActionError("pause_at plan: this loop makes no plan (no thesis_cot in critics)")
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
