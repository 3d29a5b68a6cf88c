"""The refine loop (docs/architecture.md), with a person able to take over at three pauses (*):

    begin -> enhance -> *prompt -> generate -> data_cot -> concept_cot -> thesis_cot -> *plan
                ^                                                                         |
                |        decide (*verdict) <- validate <- edit <--------------------------+
                +--- revise (not accepted, budget left) --+-- accept / give up -> record

Each iteration re-enhances the prompt (with the validator's feedback and the last plan's revised
prompt), generates with the same seed (or, with `loop.carry_edits`, takes the best image so far
and edits it further), critiques, edits and validates. The best image so far is
kept. State holds image hashes, never pixels; each finished iteration is written to the store.
A session lists its pauses in `pause_at` (graphs/human.py); a pause is LangGraph's `interrupt()`,
and every node is safe to re-run from its top when a session resumes.

Each node streams custom events (`stream_mode="custom"`): node_started, node_finished and
diffusion_step (step i of n). A run a LangGraph server drives (`graph` below, as langgraph.json
names it) keeps the store's status true by itself: paused at a point, running, cancelled, or
failed with its cause; artloop's runner compiles `builder` and sets the status itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, TypedDict
from uuid import UUID

from artloop import agents
from artloop.agents.schemas import Critique, ImageFacts, Verdict
from artloop.config import ConfigError, validate_prompt
from artloop.graphs import human
from artloop.graphs.context import RefineContext, RunSettings, for_server, merge_settings
from artloop.graphs.human import Plan
from artloop.models.structured import Structured
from artloop.prompts import PROMPTS_VERSION
from artloop.rewards import BrokenJudgeError, judge_by_reward, reward_entry
from artloop.runtime.accounting import breakdown, ledger
from artloop.store import leases
from artloop.store.trajectories import TrajectoryStore, check_run_id, new_run_id
from artloop.tools.diffusion import GenParams, on_step
from artloop.tools.image_facts import measure
from artloop.tools.images import adjust_tone
from langchain_core.callbacks import BaseCallbackHandler
from langgraph.config import get_config
from langgraph.errors import GraphInterrupt
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import interrupt
from PIL import Image


# --- state ------------------------------------------------------------------------------------
class RefineState(TypedDict, total=False):
    run_id: str
    prompt: str  # the user's prompt, never changed
    iteration: int  # 0-based
    current_prompt: str | None  # the last plan's revised prompt, for the next enhance
    feedback: list[str]  # the last verdict's reasons, for the next enhance
    params: dict[str, Any]  # GenParams as a dict: size, steps, guidance, seed
    step: dict[str, Any]  # the record of the iteration under way (see store/trajectories.py)
    scores: list[float]  # validator score of each finished iteration
    best_image: str | None
    best_score: float | None
    status: str | None  # None while revising; then accepted | max_iters | plateau
    pause_at: list[str]  # where a person reviews: prompt, plan, verdict, or all
    settings: dict[str, Any]  # a server's session: its clients' context (RunSettings), merged


# --- nodes ------------------------------------------------------------------------------------
@dataclass
class _Driven:
    """A session a run of the server's graph works on (not artloop's runner), and its lease:
    while the run lasts, the store knows a live process works on it (see store/leases.py)."""

    store: TrajectoryStore
    run_id: str
    lease: leases.Lease

    def end(self, status: str | None = None, error: str | None = None) -> None:
        if status is not None:
            self.store.finish_run(self.run_id, status, error=error)
        self.lease.release()


# Server run id (LangGraph's run id, also its callbacks' root run id) -> the session it drives;
# and the server runs that ended (a node still running in its thread when the server cancelled
# the run may finish after that: it must not register the run again).
DRIVEN: dict[str, _Driven] = {}
ENDED: deque[str] = deque(maxlen=1000)


def _context(runtime: Runtime, state: RefineState, name: str) -> tuple[RefineContext, dict | None]:
    """The node's context; and for a run a server started (with no context, or a client's
    RunSettings), the session's settings: the client's context applies to the session from the
    run it came with on (merged over what earlier runs gave; begin starts from none)."""
    given = runtime.context
    if isinstance(given, RefineContext):  # artloop's runner
        return given, None
    stored = None if name == "begin" else state.get("settings")
    settings = merge_settings(stored, given if isinstance(given, RunSettings) else None)
    return for_server(RunSettings(**settings)), settings


def _drive(runtime: Runtime, ctx: RefineContext, run_id: str | None) -> None:
    """The first node of each server run marks its session running (it may have been paused,
    cancelled or failed before) and registers it for ServerRuns."""
    info = runtime.execution_info
    server_run = str(info.run_id) if info is not None and info.run_id is not None else None
    if server_run is None or run_id is None or server_run in DRIVEN or server_run in ENDED:
        return
    lease = leases.Lease(ctx.store, run_id, leases.LEASE_S)
    lease.acquire()  # RunBusyError if another session works on it: this run changes nothing
    DRIVEN[server_run] = _Driven(ctx.store, run_id, lease)
    ctx.store.finish_run(run_id, "running")


def node(fn=None, *, persist: bool = False):
    """Give a node its context and time it into the step, with progress events around it;
    `persist` writes the finished step to the store (an upsert: safe to repeat on resume)."""
    if fn is None:
        return functools.partial(node, persist=persist)
    name = fn.__name__

    def wrapper(state: RefineState, runtime: Runtime[RefineContext]) -> dict:
        ctx, settings = _context(runtime, state, name)
        managed = settings is None
        if not managed and name != "begin":  # begin names the session: see below
            _drive(runtime, ctx, state.get("run_id"))
        emit = runtime.stream_writer
        where = {
            "node": name,
            "run_id": state.get("run_id"),
            "iteration": state.get("iteration", 0),
        }
        emit({"event": "node_started", **where})
        # Diffusion steps may be reported from the batcher's thread: emit in this context.
        in_here = contextvars.copy_context().run
        token = on_step.set(
            lambda i, n: in_here(emit, {"event": "diffusion_step", **where, "step": i, "steps": n})
        )
        try:
            with ledger() as spent:  # what the node spends in diffusion, VLM calls, waiting
                start = time.perf_counter()
                update = fn(state, ctx)
                seconds = time.perf_counter() - start
        finally:
            on_step.reset(token)
        step = update.setdefault("step", dict(state.get("step", {})))
        step["timings"] = {**step.get("timings", {}), name: seconds}
        step["accounting"] = {**step.get("accounting", {}), name: breakdown(spent, seconds)}
        if persist:
            ctx.store.put_step(state["run_id"], step["iteration"], step)
        if settings is not None and settings != state.get("settings"):
            update["settings"] = settings  # for the session's later runs
        if not managed and name == "begin":
            _drive(runtime, ctx, update["run_id"])
        emit(
            {
                "event": "node_finished",
                **where,
                "run_id": update.get("run_id", where["run_id"]),
                "seconds": seconds,
            }
        )
        return update

    # Not functools.wraps: LangGraph reads the signature to decide to pass `runtime`.
    wrapper.__name__, wrapper.__doc__ = name, fn.__doc__
    return wrapper


def _agent(step: dict, name: str, result: Structured) -> dict:
    """The step with one agent's output, its parse-failure count and its calls' tokens
    (prompt, cached, completion; the answers' mean token log-probability) added."""
    failures = {**step.get("parse_failures", {}), name: {result.backend: result.failures}}
    agents_out = {**step.get("agents", {}), name: result.output.model_dump()}
    seconds = {**step.get("agent_seconds", {}), name: result.seconds}
    usage = {**step.get("agent_usage", {}), name: result.usage()}
    return {
        "step": {
            **step,
            "agents": agents_out,
            "parse_failures": failures,
            "agent_seconds": seconds,
            "agent_usage": usage,
        }
    }


INPUTS = ("prompt", "pause_at", "run_id")  # what starts a session


@node
def begin(state: RefineState, ctx: RefineContext) -> dict:
    """Complete a bare input ({"prompt": ...}, as `langgraph dev` clients send) with the
    configured defaults, and register the run in the store (a no-op when the runner did).
    The input is checked first: a refused one leaves nothing in the store. A new input on a
    server thread whose session has begun starts another session (another run id)."""
    fresh = "iteration" not in state  # the runner's input, or the thread's first one
    if fresh and (extra := sorted(set(state) - set(INPUTS))):
        raise ConfigError(
            f"{', '.join(extra)}: not an input (a session takes "
            f"{', '.join(INPUTS)}; its settings come in the run's context)"
        )
    prompt = validate_prompt(state.get("prompt", ""))
    pause_at = human.check_pause_at(state.get("pause_at") or [])
    run_id = check_run_id(state["run_id"]) if fresh and state.get("run_id") else new_run_id()
    config: dict[str, Any] = {"loop": ctx.loop.model_dump()}
    if (thread := (get_config().get("configurable") or {}).get("thread_id")) != run_id:
        config["thread_id"] = thread  # a server's thread: how to find the session there
    ctx.store.create_run(run_id, prompt, config, ctx.models(), PROMPTS_VERSION)
    d = ctx.diffusion_config
    params = GenParams(
        width=d.width,
        height=d.height,
        num_inference_steps=d.steps,
        guidance_scale=d.guidance_scale,
        seed=d.seed,
    )
    defaults = {
        "iteration": 0,
        "current_prompt": None,
        "feedback": [],
        "params": asdict(params),
        "step": {},
        "scores": [],
        "best_image": None,
        "best_score": None,
        "status": None,
    }
    return {**state, **defaults, "run_id": run_id, "prompt": prompt, "pause_at": pause_at}


@node
def enhance(state: RefineState, ctx: RefineContext) -> dict:
    first = state.get("iteration", 0) == 0
    result = agents.enhance(
        ctx.chat,
        state["prompt"],
        previous_prompt=None if first else state.get("current_prompt"),
        feedback=None if first else state.get("feedback"),
        policy=ctx.policy,
    )
    fresh = {
        "iteration": state.get("iteration", 0),
        "prompt": result.output.prompt,
        "negative_prompt": result.output.negative_prompt,
    }
    return _agent(fresh, "enhance", result)


def review(state: RefineState, ctx: RefineContext, point: str, proposal: dict) -> human.HumanAction:
    """Pause for a person at `point` when the session asks for it; their checked answer (or the
    agent's turn when there is no pause). Called first in its node: re-running it is free.

    An invalid answer is asked again (another interrupt, its error in the payload): LangGraph
    replays this node's earlier answers to their interrupts on each resume, so the loop comes
    back to the first one still unanswered."""
    if not human.pauses_at(state, point):
        return human.HumanAction()
    error = None
    while True:
        payload = human.pause_payload(point, state, proposal, ctx.store.images, ctx.ui_url, error)
        try:
            answer = interrupt(payload)
        except GraphInterrupt:  # waiting for a person: say so in the store, and where
            ctx.store.finish_run(state["run_id"], "paused", pause=payload)
            raise
        try:
            action = human.check_action(point, answer)
        except human.HumanActionError as e:
            error = str(e)
            continue
        ctx.store.finish_run(state["run_id"], "running")
        return action


@node
def review_prompt(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    proposal = {
        "prompt": step["prompt"],
        "negative_prompt": step["negative_prompt"],
        "params": state["params"],
    }
    action = review(state, ctx, "prompt", proposal)
    step, params = human.apply_to_prompt(step, state["params"], action)
    return {"step": human.record(step, "prompt", action), "params": params}


@node
def generate(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    if ctx.loop.carry_edits and state.get("iteration", 0) > 0 and state.get("best_image"):
        image = state["best_image"]  # the edits so far, kept: this iteration edits them further
        step = {**step, "carried": True}
    else:
        params = GenParams(**state["params"])
        image = ctx.diffusion.text_to_image(step["prompt"], step["negative_prompt"], params)
    picture = ctx.store.images.get(image)
    stats = measure(picture)
    step = {**step, "params": state["params"], "image": image, "stats": {"image": stats}}
    if ctx.loop.fact_scorers:  # measured facts too, scored against the user's prompt
        step["scores"] = {"image": scores_of(ctx.loop.fact_scorers, picture, state["prompt"])}
    if ctx.loop.watch_scorers:
        step["watch"] = {"image": watched(ctx, picture, state["prompt"])}
    return {"step": step}


def scores_of(names: list[str], image: Image.Image, prompt: str) -> dict[str, dict]:
    """Each named reward's score of `image` for `prompt`, with what the score means (its range,
    None when unbounded, and direction): name -> {score, range, higher_is_better}."""
    found = {}
    for name in names:
        entry = reward_entry(name)
        (value,), _ = entry.fn([image], [prompt], [{}])
        found[name] = {
            "score": round(float(value), 4),
            "range": list(entry.range) if entry.range else None,
            "higher_is_better": entry.higher_is_better,
        }
    return found


def watched(ctx: RefineContext, image: Image.Image, prompt: str) -> dict[str, dict]:
    """`loop.watch_scorers`' scores of `image`, for the record only. A scorer that cannot read
    the prompt (`shapes` of a prompt that names no shape) records why instead of stopping a
    run it takes no part in."""
    found = {}
    for name in ctx.loop.watch_scorers:
        try:
            found |= scores_of([name], image, prompt)
        except ValueError as e:
            found[name] = {"error": str(e)}
    return found


@node
def data_cot(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    image = ctx.store.images.get(step["image"])
    result = agents.data_cot(
        ctx.chat,
        image,
        step["prompt"],
        step["stats"]["image"],
        policy=ctx.policy,
        scores=step.get("scores", {}).get("image"),
    )
    return _agent(step, "data_cot", result)


@node
def concept_cot(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    image = ctx.store.images.get(step["image"])
    facts = ImageFacts.model_validate(step["agents"]["data_cot"])
    result = agents.concept_cot(
        ctx.chat, image, state["prompt"], facts, step["stats"]["image"], policy=ctx.policy
    )
    return _agent(step, "concept_cot", result)


@node
def thesis_cot(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    image = ctx.store.images.get(step["image"])
    critique = Critique.model_validate(step["agents"]["concept_cot"])
    result = agents.thesis_cot(
        ctx.chat,
        image,
        state["prompt"],
        step["prompt"],
        state["params"],
        critique,
        policy=ctx.policy,
    )
    return _agent(step, "thesis_cot", result)


@node
def review_plan(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    action = review(state, ctx, "plan", step["agents"]["thesis_cot"])
    plan = human.apply_to_plan(step["agents"]["thesis_cot"], action)
    return {"step": human.record({**step, "plan": plan}, "plan", action)}


def enough_steps(params: GenParams, strength: float) -> GenParams:
    """Partial denoising runs int(steps * strength) steps: keep at least one."""
    return replace(
        params, num_inference_steps=max(params.num_inference_steps, math.ceil(1 / strength))
    )


@node
def edit(state: RefineState, ctx: RefineContext) -> dict:
    """Apply the plan: a global img2img pass (when asked for, or when there is nothing regional),
    one inpainting pass per regional box edit, then the global tone factors."""
    step = state["step"]
    plan = Plan.model_validate(step["plan"])
    params = GenParams(**state["params"])
    if ctx.loop.carry_edits:  # a new draw for an edit of what may be the same image again
        params = replace(params, seed=params.seed + step["iteration"])
    strength = plan.params.strength
    if strength is None:
        strength = 0.0 if plan.regional_edits else ctx.diffusion_config.edit_strength
    image, ops = step["image"], []
    if strength > 0:
        p = enough_steps(params, strength)
        image = ctx.diffusion.image_to_image(
            image, plan.revised_prompt, plan.negative_prompt, p, strength
        )
        ops.append(
            {"op": "img2img", "strength": strength, "steps": p.num_inference_steps, "image": image}
        )
    for region in plan.regional_edits:
        p = enough_steps(params, region.strength)
        image = ctx.diffusion.inpaint(
            image, tuple(region.box), region.prompt, plan.negative_prompt, p, region.strength
        )
        ops.append(
            {
                "op": "inpaint",
                "box": region.box,
                "prompt": region.prompt,
                "strength": region.strength,
                "steps": p.num_inference_steps,
                "image": image,
            }
        )
    tone = plan.params.model_dump(include={"exposure", "contrast", "saturation"}, exclude_none=True)
    if any(v != 1.0 for v in tone.values()):
        image = ctx.store.images.put(adjust_tone(ctx.store.images.get(image), **tone))
        ops.append({"op": "tone", **tone, "image": image})
    picture = ctx.store.images.get(image)
    step = {**step, "edited_image": image, "edits": ops}
    step["stats"] = {**step["stats"], "edited": measure(picture)}
    if ctx.loop.watch_scorers:
        step["watch"] = {**step.get("watch", {}), "edited": watched(ctx, picture, state["prompt"])}
    return {"step": step}


@node
def validate(state: RefineState, ctx: RefineContext) -> dict:
    step, loop = state["step"], ctx.loop
    before, after = (ctx.store.images.get(step[k]) for k in ("image", "edited_image"))
    if loop.judge == "vlm":
        result = agents.validate(
            ctx.chat,
            before,
            after,
            state["prompt"],
            Plan.model_validate(step["plan"]),
            step["stats"]["image"],
            step["stats"]["edited"],
            policy=ctx.policy,
            accept_score=loop.accept_score,
        )
        try:  # its canary pairs: `before` edited into a control image (noise, grey), when due
            ctx.judge_watch.check(
                state["run_id"],
                step["edited_image"],
                result.output,
                "validator",
                ask=lambda canary: (
                    agents.validate(
                        ctx.chat,
                        before,
                        canary,
                        state["prompt"],
                        Plan.model_validate(step["plan"]),
                        step["stats"]["image"],
                        measure(canary),
                        policy=ctx.policy,
                        accept_score=loop.accept_score,
                    ).output
                ),
                before=before,
            )
        except BrokenJudgeError as e:  # the runs it already judged lose their verdicts too
            for run_id in set(e.runs) - {state["run_id"]}:
                ctx.store.revoke(run_id, f"BrokenJudgeError: {e}")
            raise
    else:  # a measured preference judges instead of the VLM
        result = judge_by_reward(before, after, state["prompt"], loop.judge, loop.accept_score)
    return _agent(step, "validate", result)


@node(persist=True)
def decide(state: RefineState, ctx: RefineContext) -> dict:
    """The verdict (the validator's, or a person's overruling it), then the loop's bookkeeping:
    the iteration's result, the best so far, and whether to stop."""
    step, loop = state["step"], ctx.loop
    agent_verdict = Verdict.model_validate(step["agents"]["validate"])
    action = review(state, ctx, "verdict", agent_verdict.model_dump())
    verdict = {"agent": agent_verdict.verdict, "accept": "accept", "reject": "reject"}[
        action.action
    ]
    score = agent_verdict.score
    # A rejected edit made things worse: the iteration's result is the image before it.
    result_image = step["image"] if verdict == "reject" else step["edited_image"]
    step = human.record(step, "verdict", action) | {
        "score": score,
        "verdict": verdict,
        "result_image": result_image,
    }
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
        "step": step,
        "scores": scores,
        "status": status,
        "iteration": i + 1,
        "current_prompt": plan.revised_prompt,
        "feedback": agent_verdict.reasons,
        "params": {**state["params"], **changes},
        "best_image": result_image if improved else state.get("best_image"),
        "best_score": score if improved else best_score,
    }


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
# The context a server run gets from its client (JSON); artloop's runner passes a RefineContext.
builder = StateGraph(RefineState, context_schema=RunSettings)
NODES = (
    begin,
    enhance,
    review_prompt,
    generate,
    data_cot,
    concept_cot,
    thesis_cot,
    review_plan,
    edit,
    validate,
    decide,
    record,
)
for fn in NODES:
    builder.add_node(fn.__name__, fn)
builder.add_edge(START, "begin")
for a, b in zip(NODES[:-2], NODES[1:-1], strict=True):  # enhance -> ... -> decide, in order
    builder.add_edge(a.__name__, b.__name__)
builder.add_conditional_edges(
    "decide", after_decide, {"revise": "enhance", "accept": "record", "give_up": "record"}
)
builder.add_edge("record", END)


# --- the server's graph -------------------------------------------------------------------------
# How a run stopped from outside ends (the server cancels its task: CancelledError).
STOPPED = (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)


class ServerRuns(BaseCallbackHandler):
    """The end of each server run that the nodes cannot see: a run the server cancels reads
    `cancelled` in the store, one that fails `failed` with its cause. (Pauses, answers and the
    finish are written by the nodes; see `DRIVEN`.)"""

    run_inline = True  # a status write, at once: the run may be torn down next

    def on_chain_end(
        self, outputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        if parent_run_id is None:
            ENDED.append(str(run_id))
            if (session := DRIVEN.pop(str(run_id), None)) is not None:
                session.end()

    def on_chain_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        if parent_run_id is not None:
            return
        ENDED.append(str(run_id))
        if (session := DRIVEN.pop(str(run_id), None)) is None:
            return
        if isinstance(error, STOPPED):
            session.end("cancelled")
        else:
            session.end("failed", " ".join(f"{type(error).__name__}: {error}".split())[:2000])


# Without a checkpointer, for `langgraph dev` (it brings its own); artloop's runner compiles
# `builder` with its checkpointer and keeps the store's status itself.
graph = builder.compile().with_config(callbacks=[ServerRuns()])
