"""The refine loop (DESIGN.md), with a person able to take over at three pauses (*):

    begin -> enhance -> *prompt -> generate -> data_cot -> concept_cot -> thesis_cot -> *plan
                ^                                                                         |
                |        decide (*verdict) <- validate <- edit <--------------------------+
                +--- revise (not accepted, budget left) --+-- accept / give up -> record

Each iteration re-enhances the prompt (with the validator's feedback and the last plan's revised
prompt), generates with the same seed, critiques, edits and validates. The best image so far is
kept. State holds image hashes, never pixels; each finished iteration is written to the store.
A session lists its pauses in `pause_at` (graphs/human.py); a pause is LangGraph's `interrupt()`,
and every node is safe to re-run from its top when a session resumes.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, replace
from typing import Any, Literal, TypedDict

from artloop import agents
from artloop.agents.schemas import Critique, ImageFacts, Verdict
from artloop.config import validate_prompt
from artloop.graphs import human
from artloop.graphs.context import RefineContext, default_context
from artloop.graphs.human import Plan
from artloop.models.structured import Structured
from artloop.prompts import PROMPTS_VERSION
from artloop.tools.accounting import breakdown, ledger
from artloop.tools.diffusion import GenParams
from artloop.tools.image_facts import measure
from artloop.tools.images import adjust_tone
from artloop.tools.rewards import BrokenJudgeError
from artloop.tools.store import check_run_id, new_run_id
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import interrupt


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
    pause_at: list[str]  # where a person reviews: prompt, plan, verdict, or all


# --- nodes ------------------------------------------------------------------------------------
def node(fn=None, *, persist: bool = False):
    """Give a node its context (the default one when none is passed) and time it into the step;
    `persist` writes the finished step to the store (an upsert: safe to repeat on resume)."""
    if fn is None:
        return functools.partial(node, persist=persist)

    def wrapper(state: RefineState, runtime: Runtime[RefineContext]) -> dict:
        ctx = runtime.context or default_context()
        with ledger() as spent:  # what the node spends in diffusion, VLM calls, waiting
            start = time.perf_counter()
            update = fn(state, ctx)
            seconds = time.perf_counter() - start
        step = update.setdefault("step", dict(state.get("step", {})))
        step["timings"] = {**step.get("timings", {}), fn.__name__: seconds}
        step["accounting"] = {**step.get("accounting", {}),
                              fn.__name__: breakdown(spent, seconds)}  # fmt: skip
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
def begin(state: RefineState, ctx: RefineContext) -> dict:
    """Complete a bare input ({"prompt": ...}, as `langgraph dev` clients send) with the
    configured defaults, and register the run in the store (a no-op when the runner did)."""
    prompt = validate_prompt(state.get("prompt", ""))
    run_id = check_run_id(state["run_id"]) if state.get("run_id") else new_run_id()
    ctx.store.create_run(run_id, prompt, {"loop": ctx.loop.model_dump()}, ctx.models(),
                         PROMPTS_VERSION)  # fmt: skip
    d = ctx.diffusion_config
    params = GenParams(width=d.width, height=d.height, num_inference_steps=d.steps,
                       guidance_scale=d.guidance_scale, seed=d.seed)  # fmt: skip
    defaults = {"iteration": 0, "current_prompt": None, "feedback": [], "params": asdict(params),
                "step": {}, "scores": [], "best_image": None, "best_score": None, "status": None}  # fmt: skip
    pause_at = human.check_pause_at(state.get("pause_at") or [])
    return {**defaults, **state, "run_id": run_id, "prompt": prompt, "pause_at": pause_at}


@node
def enhance(state: RefineState, ctx: RefineContext) -> dict:
    first = state.get("iteration", 0) == 0
    result = agents.enhance(
        ctx.chat, state["prompt"], previous_prompt=None if first else state.get("current_prompt"),
        feedback=None if first else state.get("feedback"), policy=ctx.policy,
    )  # fmt: skip
    fresh = {"iteration": state.get("iteration", 0), "prompt": result.output.prompt,
             "negative_prompt": result.output.negative_prompt}  # fmt: skip
    return _agent(fresh, "enhance", result)


def review(state: RefineState, point: str, proposal: dict) -> human.HumanAction:
    """Pause for a person at `point` when the session asks for it; their checked answer (or the
    agent's turn when there is no pause). Called first in its node: re-running it is free."""
    if not human.pauses_at(state, point):
        return human.HumanAction()
    step = state["step"]
    answer = interrupt({"pause": point, "run_id": state["run_id"], "iteration": step["iteration"],
                        "image": step.get("image"), "edited_image": step.get("edited_image"),
                        "proposal": proposal, "actions": list(human.ACTIONS[point])})  # fmt: skip
    return human.check_action(point, answer)


@node
def review_prompt(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    proposal = {"prompt": step["prompt"], "negative_prompt": step["negative_prompt"],
                "params": state["params"]}  # fmt: skip
    action = review(state, "prompt", proposal)
    step, params = human.apply_to_prompt(step, state["params"], action)
    return {"step": human.record(step, "prompt", action), "params": params}


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


@node
def review_plan(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    action = review(state, "plan", step["agents"]["thesis_cot"])
    plan = human.apply_to_plan(step["agents"]["thesis_cot"], action)
    return {"step": human.record({**step, "plan": plan}, "plan", action)}


def enough_steps(params: GenParams, strength: float) -> GenParams:
    """Partial denoising runs int(steps * strength) steps: keep at least one."""
    return replace(params, num_inference_steps=max(params.num_inference_steps,
                                                   math.ceil(1 / strength)))  # fmt: skip


@node
def edit(state: RefineState, ctx: RefineContext) -> dict:
    """Apply the plan: a global img2img pass (when asked for, or when there is nothing regional),
    one inpainting pass per regional box edit, then the global tone factors."""
    step = state["step"]
    plan = Plan.model_validate(step["plan"])
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


@node
def validate(state: RefineState, ctx: RefineContext) -> dict:
    step, loop = state["step"], ctx.loop
    before, after = (ctx.store.images.get(step[k]) for k in ("image", "edited_image"))
    if loop.judge == "vlm":
        result = agents.validate(ctx.chat, before, after, state["prompt"],
                                 Plan.model_validate(step["plan"]), step["stats"]["image"],
                                 step["stats"]["edited"], policy=ctx.policy)  # fmt: skip
        try:
            ctx.judge_watch.check(state["run_id"], step["edited_image"],
                                  result.output.model_dump_json(), "validator")  # fmt: skip
        except BrokenJudgeError as e:  # the runs it already judged lose their verdicts too
            for run_id in set(e.runs) - {state["run_id"]}:
                ctx.store.revoke(run_id, f"BrokenJudgeError: {e}")
            raise
    else:  # a measured preference judges instead of the VLM
        result = agents.judge_by_reward(before, after, state["prompt"], loop.judge,
                                        loop.accept_score)  # fmt: skip
    return _agent(step, "validate", result)


@node(persist=True)
def decide(state: RefineState, ctx: RefineContext) -> dict:
    """The verdict (the validator's, or a person's overruling it), then the loop's bookkeeping:
    the iteration's result, the best so far, and whether to stop."""
    step, loop = state["step"], ctx.loop
    agent_verdict = Verdict.model_validate(step["agents"]["validate"])
    action = review(state, "verdict", agent_verdict.model_dump())
    verdict = {"agent": agent_verdict.verdict, "accept": "accept", "reject": "reject"}[
        action.action
    ]
    score = agent_verdict.score
    # A rejected edit made things worse: the iteration's result is the image before it.
    result_image = step["image"] if verdict == "reject" else step["edited_image"]
    step = human.record(step, "verdict", action) | {
        "score": score, "verdict": verdict, "result_image": result_image,
    }  # fmt: skip
    i, scores = step["iteration"], [*state.get("scores", []), score]
    best_score = state.get("best_score")
    improved = best_score is None or score > best_score or action.action == "accept"

    status = None
    patience = loop.plateau_patience
    if action.action == "accept" or (verdict == "accept" and score >= loop.accept_score):
        status = "accepted"
    elif i + 1 >= loop.max_iters:
        status = "max_iters"
    elif (
        len(scores) > patience
        and max(scores[-patience:]) < max(scores[:-patience]) + loop.plateau_min_delta
    ):
        status = "plateau"
    plan = Plan.model_validate(step["plan"])
    changes = plan.params.model_dump(
        include={"guidance_scale", "num_inference_steps"}, exclude_none=True
    )
    return {
        "step": step, "scores": scores, "status": status, "iteration": i + 1,
        "current_prompt": plan.revised_prompt, "feedback": agent_verdict.reasons,
        "params": {**state["params"], **changes},
        "best_image": result_image if improved else state.get("best_image"),
        "best_score": score if improved else best_score,
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
def after_decide(state: RefineState) -> Literal["revise", "accept", "give_up"]:
    if state.get("status") is None:
        return "revise"
    return "accept" if state["status"] == "accepted" else "give_up"


# --- builder ----------------------------------------------------------------------------------
builder = StateGraph(RefineState, context_schema=RefineContext)
NODES = (begin, enhance, review_prompt, generate, data_cot, concept_cot, thesis_cot, review_plan, edit,
         validate, decide, record)  # fmt: skip
for fn in NODES:
    builder.add_node(fn.__name__, fn)
builder.add_edge(START, "begin")
for a, b in zip(NODES[:-2], NODES[1:-1], strict=True):  # enhance -> ... -> decide, in order
    builder.add_edge(a.__name__, b.__name__)
builder.add_conditional_edges(
    "decide", after_decide, {"revise": "enhance", "accept": "record", "give_up": "record"}
)
builder.add_edge("record", END)

# Without a checkpointer, for `langgraph dev`; artloop's runner compiles with SQLite.
graph = builder.compile()
