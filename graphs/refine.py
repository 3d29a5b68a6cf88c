"""The refine loop (DESIGN.md):

    prompt -> enhance -> generate -> data_cot -> concept_cot -> thesis_cot -> edit -> validate
                ^                                                                  |
                +------------------- revise (not accepted, budget left) <---------+
                                                         accept / give up -> record

Each iteration re-enhances the prompt (with the validator's feedback and the last plan's revised
prompt), generates with the same seed, critiques, edits and validates. The best image so far is
kept. State holds image hashes, never pixels; each finished iteration is written to the store.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import replace
from typing import Any, Literal, TypedDict

from artloop import agents
from artloop.agents.schemas import Critique, EditPlan, ImageFacts, Verdict
from artloop.graphs.context import RefineContext, default_context
from artloop.models.structured import Structured
from artloop.tools.diffusion import GenParams
from artloop.tools.image_facts import measure
from artloop.tools.images import adjust_tone
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime


# --- state ------------------------------------------------------------------------------------
class RefineState(TypedDict, total=False):
    run_id: str
    prompt: str  # the user's prompt, never changed
    iteration: int  # 0-based
    current_prompt: str | None  # the last plan's revised prompt, for the next enhance
    feedback: list[str]  # the last verdict's reasons, for the next enhance
    params: dict[str, Any]  # GenParams as a dict: size, steps, guidance, seed
    step: dict[str, Any]  # the record of the iteration under way (see tools/store.py)
    scores: list[float]  # validator score of each finished iteration
    best_image: str | None
    best_score: float | None
    status: str | None  # None while revising; then accepted | max_iters | plateau


# --- nodes ------------------------------------------------------------------------------------
def node(fn=None, *, persist: bool = False):
    """Give a node its context (the default one when none is passed) and time it into the step;
    `persist` writes the finished step to the store (an upsert: safe to repeat on resume)."""
    if fn is None:
        return functools.partial(node, persist=persist)

    def wrapper(state: RefineState, runtime: Runtime[RefineContext]) -> dict:
        ctx = runtime.context or default_context()
        start = time.perf_counter()
        update = fn(state, ctx)
        step = update.setdefault("step", dict(state.get("step", {})))
        step["timings"] = {**step.get("timings", {}), fn.__name__: time.perf_counter() - start}
        if persist:
            ctx.store.put_step(state["run_id"], step["iteration"], step)
        return update

    # Not functools.wraps: LangGraph reads the signature to decide to pass `runtime`.
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _agent(step: dict, name: str, result: Structured) -> dict:
    """The step with one agent's output and its parse-failure count added."""
    failures = {**step.get("parse_failures", {}), name: {result.backend: result.failures}}
    agents_out = {**step.get("agents", {}), name: result.output.model_dump()}
    seconds = {**step.get("agent_seconds", {}), name: result.seconds}
    return {"step": {**step, "agents": agents_out, "parse_failures": failures,
                     "agent_seconds": seconds}}  # fmt: skip


@node
def enhance(state: RefineState, ctx: RefineContext) -> dict:
    first = state.get("iteration", 0) == 0
    result = agents.enhance(
        ctx.chat, state["prompt"], previous_prompt=None if first else state.get("current_prompt"),
        feedback=None if first else state.get("feedback"), policy=ctx.policy,
    )  # fmt: skip
    fresh = {"iteration": state.get("iteration", 0), "prompt": result.output.prompt,
             "negative_prompt": result.output.negative_prompt, "decided_by": "agent"}  # fmt: skip
    return _agent(fresh, "enhance", result)


@node
def generate(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    params = GenParams(**state["params"])
    image = ctx.diffusion.text_to_image(step["prompt"], step["negative_prompt"], params)
    stats = measure(ctx.store.images.get(image))
    return {"step": {**step, "params": state["params"], "image": image, "stats": {"image": stats}}}


@node
def data_cot(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    image = ctx.store.images.get(step["image"])
    result = agents.data_cot(ctx.chat, image, step["prompt"], step["stats"]["image"],
                             policy=ctx.policy)  # fmt: skip
    return _agent(step, "data_cot", result)


@node
def concept_cot(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    image = ctx.store.images.get(step["image"])
    facts = ImageFacts.model_validate(step["agents"]["data_cot"])
    result = agents.concept_cot(ctx.chat, image, state["prompt"], facts, step["stats"]["image"],
                                policy=ctx.policy)  # fmt: skip
    return _agent(step, "concept_cot", result)


@node
def thesis_cot(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    image = ctx.store.images.get(step["image"])
    critique = Critique.model_validate(step["agents"]["concept_cot"])
    result = agents.thesis_cot(ctx.chat, image, state["prompt"], step["prompt"], state["params"],
                               critique, policy=ctx.policy)  # fmt: skip
    return _agent(step, "thesis_cot", result)


def enough_steps(params: GenParams, strength: float) -> GenParams:
    """Partial denoising runs int(steps * strength) steps: keep at least one."""
    return replace(params, num_inference_steps=max(params.num_inference_steps,
                                                   math.ceil(1 / strength)))  # fmt: skip


@node
def edit(state: RefineState, ctx: RefineContext) -> dict:
    """Apply the plan: a global img2img pass (when asked for, or when there is nothing regional),
    one inpainting pass per regional box edit, then the global tone factors."""
    step = state["step"]
    plan = EditPlan.model_validate(step["agents"]["thesis_cot"])
    params = GenParams(**state["params"])
    strength = plan.params.strength
    if strength is None:
        strength = 0.0 if plan.regional_edits else ctx.diffusion_config.edit_strength
    image, ops = step["image"], []
    if strength > 0:
        p = enough_steps(params, strength)
        image = ctx.diffusion.image_to_image(image, plan.revised_prompt, plan.negative_prompt,
                                             p, strength)  # fmt: skip
        ops.append({"op": "img2img", "strength": strength, "steps": p.num_inference_steps,
                    "image": image})  # fmt: skip
    for region in plan.regional_edits:
        p = enough_steps(params, region.strength)
        image = ctx.diffusion.inpaint(image, tuple(region.box), region.prompt,
                                      plan.negative_prompt, p, region.strength)  # fmt: skip
        ops.append({"op": "inpaint", "box": region.box, "prompt": region.prompt,
                    "strength": region.strength, "steps": p.num_inference_steps,
                    "image": image})  # fmt: skip
    tone = plan.params.model_dump(include={"exposure", "contrast", "saturation"},
                                  exclude_none=True)  # fmt: skip
    if any(v != 1.0 for v in tone.values()):
        image = ctx.store.images.put(adjust_tone(ctx.store.images.get(image), **tone))
        ops.append({"op": "tone", **tone, "image": image})
    stats = {**step["stats"], "edited": measure(ctx.store.images.get(image))}
    return {"step": {**step, "edited_image": image, "edits": ops, "stats": stats}}


@node(persist=True)
def validate(state: RefineState, ctx: RefineContext) -> dict:
    step, loop = state["step"], ctx.loop
    before, after = (ctx.store.images.get(step[k]) for k in ("image", "edited_image"))
    plan = EditPlan.model_validate(step["agents"]["thesis_cot"])
    if loop.judge == "vlm":
        result = agents.validate(ctx.chat, before, after, state["prompt"], plan,
                                 step["stats"]["image"], step["stats"]["edited"],
                                 policy=ctx.policy)  # fmt: skip
    else:  # a measured preference judges instead of the VLM
        result = agents.judge_by_reward(before, after, state["prompt"], loop.judge,
                                        loop.accept_score)  # fmt: skip
    verdict: Verdict = result.output
    # A rejected edit made things worse: the iteration's result is the image before it.
    result_image = step["image"] if verdict.verdict == "reject" else step["edited_image"]
    step = _agent(step, "validate", result)["step"] | {
        "score": verdict.score, "verdict": verdict.verdict, "result_image": result_image,
    }  # fmt: skip
    i, scores = step["iteration"], [*state.get("scores", []), verdict.score]
    best_score = state.get("best_score")
    improved = best_score is None or verdict.score > best_score

    status = None
    patience = loop.plateau_patience
    if verdict.verdict == "accept" and verdict.score >= loop.accept_score:
        status = "accepted"
    elif i + 1 >= loop.max_iters:
        status = "max_iters"
    elif (
        len(scores) > patience
        and max(scores[-patience:]) < max(scores[:-patience]) + loop.plateau_min_delta
    ):
        status = "plateau"
    changes = plan.params.model_dump(
        include={"guidance_scale", "num_inference_steps"}, exclude_none=True
    )
    return {
        "step": step, "scores": scores, "status": status, "iteration": i + 1,
        "current_prompt": plan.revised_prompt, "feedback": verdict.reasons,
        "params": {**state["params"], **changes},
        "best_image": result_image if improved else state.get("best_image"),
        "best_score": verdict.score if improved else best_score,
    }  # fmt: skip


@node
def record(state: RefineState, ctx: RefineContext) -> dict:
    ctx.store.finish_run(
        state["run_id"],
        state["status"] or "max_iters",
        final_image=state.get("best_image"),
        best_score=state.get("best_score"),
    )
    return {}


# --- routers ----------------------------------------------------------------------------------
def after_validate(state: RefineState) -> Literal["revise", "accept", "give_up"]:
    if state.get("status") is None:
        return "revise"
    return "accept" if state["status"] == "accepted" else "give_up"


# --- builder ----------------------------------------------------------------------------------
builder = StateGraph(RefineState, context_schema=RefineContext)
for fn in (enhance, generate, data_cot, concept_cot, thesis_cot, edit, validate, record):
    builder.add_node(fn.__name__, fn)
builder.add_edge(START, "enhance")
builder.add_edge("enhance", "generate")
builder.add_edge("generate", "data_cot")
builder.add_edge("data_cot", "concept_cot")
builder.add_edge("concept_cot", "thesis_cot")
builder.add_edge("thesis_cot", "edit")
builder.add_edge("edit", "validate")
builder.add_conditional_edges(
    "validate", after_validate, {"revise": "enhance", "accept": "record", "give_up": "record"}
)
builder.add_edge("record", END)

# Without a checkpointer, for `langgraph dev`; artloop's runner compiles with SQLite.
graph = builder.compile()
