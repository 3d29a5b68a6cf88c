"""The refine loop (docs/architecture.md), with a person able to take over at three pauses (*):

    begin -> enhance -> *prompt -> generate -> data_cot -> concept_cot -> thesis_cot -> *plan
                ^                                                                         |
                |        decide (*verdict) <- validate <- edit <--------------------------+
                +--- revise (not accepted, budget left) --+-- accept / give up -> record

Each iteration re-enhances the prompt (with the validator's feedback and the last plan's revised
prompt), generates with the same seed (or, with `loop.carry_edits`, takes the best image so far
and edits it further), critiques, edits and validates. The best image so far is
kept. A session may start from a person's own image instead (`init_image`, a hash in the image
store): it is the first iteration's image, and every later iteration edits the best so far.
State holds image hashes, never pixels; each finished iteration is written to the store.
A session lists its pauses in `pause_at` (graphs/human.py); a pause is LangGraph's `interrupt()`,
and every node is safe to re-run from its top when a session resumes.

That is the default loop. A variant (`loop.enhancer`, `critics`, `edit_modes`, `best_of`) is
built with only the nodes it runs (`build_graph`): `compose` in place of the enhancer, `pick`
after generate for best-of-N, one `critic` call in place of the three critics, no review_plan
without a plan and no edit without edit modes (the image is then judged alone).

Each node streams custom events (`stream_mode="custom"`): node_started, node_finished and
diffusion_step (step i of n). A run a LangGraph server drives (`graph` below, as langgraph.json
names it) keeps the store's status true by itself (graphs/served.py): paused at a point,
running, cancelled, or failed with its cause; artloop's runner compiles `build_graph(loop)` for
its session and sets the status itself.
"""

from __future__ import annotations

import contextvars
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from itertools import pairwise
from typing import Any, Literal, TypedDict

from artloop import agents
from artloop.agents.schemas import Critique, ImageFacts, Verdict
from artloop.config import CRITICS, ConfigError, LoopConfig, validate_prompt
from artloop.graphs import human
from artloop.graphs.context import RefineContext, RunSettings
from artloop.graphs.human import Plan
from artloop.graphs.judging import canaries, judge_alone, rank, scores_of, watched
from artloop.graphs.served import ServerRuns, drive, node_context
from artloop.models.structured import Structured
from artloop.prompts import PROMPTS_VERSION
from artloop.rewards import judge_by_reward
from artloop.runtime.accounting import breakdown, ledger, session_totals
from artloop.store.trajectories import check_run_id, new_run_id
from artloop.tools.diffusion import GenParams, on_step
from artloop.tools.image_facts import measure
from artloop.tools.images import ImageStoreError, adjust_tone
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
    init_image: str | None  # a session from a person's image: its hash, iteration 0's image
    iteration: int  # 0-based
    current_prompt: str | None  # the last plan's revised prompt, for the next enhance
    current_negative_prompt: str | None  # the last plan's negative prompt, for compose
    feedback: list[str]  # the last verdict's reasons, for the next enhance
    attempts: list[dict]  # every finished iteration's prompt, score, verdict, reasons
    params: dict[str, Any]  # GenParams as a dict: size, steps, guidance, seed
    step: dict[str, Any]  # the record of the iteration under way (see store/trajectories.py)
    scores: list[float]  # validator score of each finished iteration
    best_image: str | None
    best_score: float | None
    status: str | None  # None while revising; then accepted | max_iters | plateau | budget
    pause_at: list[str]  # where a person reviews: prompt, plan, verdict, or all
    settings: dict[str, Any]  # a server's session: its clients' context (RunSettings), merged
    regions: list[dict]  # edit_modes regional: the regions so far (the edit node's, see there)


# --- nodes ------------------------------------------------------------------------------------
def node(fn=None, *, persist: bool = False):
    """Give a node its context and time it into the step, with progress events around it;
    `persist` writes the finished step to the store (an upsert: safe to repeat on resume)."""
    if fn is None:
        return functools.partial(node, persist=persist)
    name = fn.__name__

    def wrapper(state: RefineState, runtime: Runtime[RefineContext]) -> dict:
        ctx, settings = node_context(runtime, state, name)
        managed = settings is None
        if not managed:
            check_served(ctx.loop)
            if name != "begin":  # begin names the session: see below
                drive(runtime, ctx, state.get("run_id"))
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
        # Every VLM request the node made (repairs too), in order: runtime/accounting.vlm_call.
        step["calls"] = [*step.get("calls", []), *({"node": name, **c} for c in spent["calls"])]
        if persist:
            ctx.store.put_step(state["run_id"], step["iteration"], step)
        if settings is not None and settings != state.get("settings"):
            update["settings"] = settings  # for the session's later runs
        if not managed and name == "begin":
            drive(runtime, ctx, update["run_id"])
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


def _agent(step: dict, name: str, result: Structured, parts: dict | None = None) -> dict:
    """The step with one agent's output, its parse-failure count and its calls' tokens
    (prompt, cached, completion; the answers' mean token log-probability) added. `parts`: an
    answer that stands for several agents (the merged critic's), under their names."""
    failures = {**step.get("parse_failures", {}), name: {result.backend: result.failures}}
    answers = parts if parts is not None else {name: result.output.model_dump()}
    seconds = {**step.get("agent_seconds", {}), name: result.seconds}
    usage = {**step.get("agent_usage", {}), name: result.usage()}
    return {
        "step": {
            **step,
            "agents": {**step.get("agents", {}), **answers},
            "parse_failures": failures,
            "agent_seconds": seconds,
            "agent_usage": usage,
        }
    }


INPUTS = ("prompt", "pause_at", "run_id", "init_image")  # what starts a session


def check_init_image(ctx: RefineContext, digest: Any) -> str | None:
    """A session's starting image, if it has one: a stored image's hash, in a loop that edits
    (edits are all a session from an image does to it). ConfigError naming what is wrong."""
    if digest is None:
        return None
    if not ctx.loop.edit_modes:
        raise ConfigError("init_image: a session from an image edits it; loop.edit_modes is []")
    try:
        if isinstance(digest, str) and digest in ctx.store.images:
            return digest
    except ImageStoreError:  # not a hash
        pass
    raise ConfigError(
        f"init_image: no image {str(digest)[:80]!r} in the image store (import it first: "
        "tools/images.import_image)"
    )


@node
def begin(state: RefineState, ctx: RefineContext) -> dict:
    """Complete a bare input ({"prompt": ...}, as `langgraph dev` clients send) with the
    configured defaults, and register the run in the store (a no-op when the runner did).
    The input is checked first (a starting image too): a refused one leaves nothing in the
    store. A new input on a server thread whose session has begun starts another session
    (another run id)."""
    fresh = "iteration" not in state  # the runner's input, or the thread's first one
    if fresh and (extra := sorted(set(state) - set(INPUTS))):
        raise ConfigError(
            f"{', '.join(extra)}: not an input (a session takes "
            f"{', '.join(INPUTS)}; its settings come in the run's context)"
        )
    prompt = validate_prompt(state.get("prompt", ""))
    pause_at = human.check_pause_at(state.get("pause_at") or [], plans=ctx.loop.plans)
    init_image = check_init_image(ctx, state.get("init_image"))
    run_id = check_run_id(state["run_id"]) if fresh and state.get("run_id") else new_run_id()
    config: dict[str, Any] = {"loop": ctx.loop.model_dump()}
    if (thread := (get_config().get("configurable") or {}).get("thread_id")) != run_id:
        config["thread_id"] = thread  # a server's thread: how to find the session there
    if init_image:
        config["init_image"] = init_image
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
        "current_negative_prompt": None,
        "feedback": [],
        "attempts": [],
        "params": asdict(params),
        "step": {},
        "scores": [],
        "best_image": None,
        "best_score": None,
        "status": None,
    }
    started = {"run_id": run_id, "prompt": prompt, "pause_at": pause_at, "init_image": init_image}
    return {**state, **defaults, **started}


@node
def enhance(state: RefineState, ctx: RefineContext) -> dict:
    first = state.get("iteration", 0) == 0
    result = agents.enhance(
        ctx.chat,
        state["prompt"],
        previous_prompt=None if first else state.get("current_prompt"),
        feedback=None if first else state.get("feedback"),
        history=state.get("attempts") if ctx.loop.memory == "history" else None,
        policy=ctx.policy,
    )
    fresh = {
        "iteration": state.get("iteration", 0),
        "prompt": result.output.prompt,
        "negative_prompt": result.output.negative_prompt,
    }
    return _agent(fresh, "enhance", result)


@node
def compose(state: RefineState, ctx: RefineContext) -> dict:
    """The step's prompts where no enhancer runs (`loop.enhancer = false`): the user's prompt
    first, then the last plan's revised and negative prompts (or the same prompt again)."""
    later = state.get("iteration", 0) > 0 and state.get("current_prompt")
    fresh = {
        "iteration": state.get("iteration", 0),
        "prompt": state["current_prompt"] if later else state["prompt"],
        "negative_prompt": (state.get("current_negative_prompt") or "") if later else "",
    }
    return {"step": fresh}


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


def draw_seeds(loop: LoopConfig, seed: int, iteration: int) -> list[int]:
    """The seeds of an iteration's text-to-image draws: `loop.best_of` consecutive ones from
    `seed`. Where nothing can change the prompt (`loop.rerolls`), each iteration draws the next
    ones instead of the same images again."""
    first = seed + (iteration * loop.best_of if loop.rerolls else 0)
    return [first + k for k in range(loop.best_of)]


@node
def generate(state: RefineState, ctx: RefineContext) -> dict:
    """Text-to-image with the step's prompts; with `loop.best_of` > 1, every candidate (the
    pick node keeps one). A session from an image starts from it, and carries its edits over
    whatever `loop.carry_edits` says: a new draw would throw the person's image away."""
    step, i = state["step"], state.get("iteration", 0)
    if i == 0 and state.get("init_image"):  # measured as a drawn image is, marked as given
        given = {**step, "from_image": True, "params": state["params"]}
        return {"step": measured(ctx, state, given, state["init_image"])}
    carries = ctx.loop.carry_edits or state.get("init_image")
    if carries and i > 0 and state.get("best_image"):
        # The edits so far, kept: this iteration edits them further.
        carried = {**step, "carried": True, "params": state["params"]}
        return {"step": measured(ctx, state, carried, state["best_image"])}
    params = GenParams(**state["params"])
    seeds = draw_seeds(ctx.loop, params.seed, i)
    drawn = [
        ctx.diffusion.text_to_image(
            step["prompt"], step["negative_prompt"], replace(params, seed=seed)
        )
        for seed in seeds
    ]
    step = {**step, "params": {**state["params"], "seed": seeds[0]}}
    if len(drawn) > 1:
        candidates = [{"seed": s, "image": d} for s, d in zip(seeds, drawn, strict=True)]
        return {"step": {**step, "candidates": candidates}}
    return {"step": measured(ctx, state, step, drawn[0])}


@node
def pick(state: RefineState, ctx: RefineContext) -> dict:
    """Keep the best of the iteration's candidates by `loop.best_of_judge` (the rater's score
    against the user's prompt, or a reward's; the first of equals); each candidate's seed,
    image and score stay in the step."""
    step = state["step"]
    if "candidates" not in step:  # a carried image (loop.carry_edits): nothing to choose from
        return {"step": step}
    pictures = [ctx.store.images.get(c["image"]) for c in step["candidates"]]
    judged, best, rated = rank(ctx, pictures, state["prompt"])
    candidates = [c | j for c, j in zip(step["candidates"], judged, strict=True)]
    step = {
        **step,
        "candidates": candidates,
        "picked": best,
        "params": {**step["params"], "seed": candidates[best]["seed"]},
    }
    if rated:  # the rater's calls, counted like an agent's
        backend = rated[0].backend
        failures = {backend: sum(r.failures for r in rated)}
        step["parse_failures"] = {**step.get("parse_failures", {}), "pick": failures}
        seconds = sum(r.seconds for r in rated)
        step["agent_seconds"] = {**step.get("agent_seconds", {}), "pick": seconds}
    return {"step": measured(ctx, state, step, candidates[best]["image"])}


def measured(ctx: RefineContext, state: RefineState, step: dict, image: str) -> dict:
    """The step with its image, the image's statistics and the fact and watch scorers' scores."""
    picture = ctx.store.images.get(image)
    step = {**step, "image": image, "stats": {"image": measure(picture)}}
    if ctx.loop.fact_scorers:  # measured facts too, scored against the user's prompt
        step["scores"] = {"image": scores_of(ctx.loop.fact_scorers, picture, state["prompt"])}
    if ctx.loop.watch_scorers:
        step["watch"] = {"image": watched(ctx, picture, state["prompt"])}
    return step


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


def _answer(step: dict, agent: str, schema: type[Any]) -> Any:
    """An earlier agent's answer in this step, or None where the loop does not run it."""
    found = step.get("agents", {}).get(agent)
    return None if found is None else schema.model_validate(found)


@node
def concept_cot(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    image = ctx.store.images.get(step["image"])
    facts = _answer(step, "data_cot", ImageFacts)
    result = agents.concept_cot(
        ctx.chat, image, state["prompt"], facts, step["stats"]["image"], policy=ctx.policy
    )
    return _agent(step, "concept_cot", result)


@node
def thesis_cot(state: RefineState, ctx: RefineContext) -> dict:
    step = state["step"]
    image = ctx.store.images.get(step["image"])
    result = agents.thesis_cot(
        ctx.chat,
        image,
        state["prompt"],
        step["prompt"],
        state["params"],
        _answer(step, "concept_cot", Critique),
        policy=ctx.policy,
        facts=_answer(step, "data_cot", ImageFacts),
        edit_modes=ctx.loop.edit_modes,
    )
    return _agent(step, "thesis_cot", result)


@node
def critic(state: RefineState, ctx: RefineContext) -> dict:
    """The merged critic (`loop.critics = "merged"`): facts, critique and plan in one call,
    recorded under the three critics' names (what the report, exports and trainers read), with
    `answered_by` saying that the critic's one call answered for them."""
    step = state["step"]
    result = agents.critic(
        ctx.chat,
        ctx.store.images.get(step["image"]),
        state["prompt"],
        step["prompt"],
        state["params"],
        step["stats"]["image"],
        policy=ctx.policy,
        scores=step.get("scores", {}).get("image"),
        edit_modes=ctx.loop.edit_modes,
    )
    answer = result.output
    parts = dict(zip(CRITICS, (answer.facts, answer.critique, answer.plan), strict=True))
    update = _agent(step, "critic", result, {k: v.model_dump() for k, v in parts.items()})
    update["step"]["answered_by"] = dict.fromkeys(CRITICS, "critic")
    return update


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


def standing_regions(state: RefineState) -> list[dict]:
    """The earlier iterations' regions still standing (edit_modes regional): those of an
    iteration whose edit was not rejected, less those an accepted later region replaced."""
    if not state.get("iteration"):
        return []  # the session's first edit (also: a new session on a server's thread)
    undone = {a["iteration"] for a in state.get("attempts", []) if a["verdict"] == "reject"}
    return [
        {**r, "replaced_in": None}
        for r in state.get("regions", [])
        if r["iteration"] not in undone and r["replaced_in"] in undone | {None}
    ]


def iou(a: list[int], b: list[int]) -> float:
    """Two boxes' intersection over union."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union else 0.0


def merge_regions(standing: list[dict], plan: Plan, iteration: int) -> list[dict]:
    """The standing regions and the plan's: a new region replaces an earlier one its box
    overlaps by more than 0.5 IoU (kept, marked `replaced_in`, should this edit be rejected)."""
    merged = [dict(r) for r in standing]
    for new in plan.regional_edits:
        box = list(new.box)
        for old in merged:
            earlier = old["replaced_in"] is None and old["iteration"] < iteration
            if earlier and iou(old["box"], box) > 0.5:
                old["replaced_in"] = iteration
        merged.append(
            {
                "box": box,
                "prompt": new.prompt,
                "strength": new.strength,
                "iteration": iteration,
                "replaced_in": None,
            }
        )
    return merged


@node
def edit(state: RefineState, ctx: RefineContext) -> dict:
    """Apply the plan, as far as `loop.edit_modes` allows: a global img2img pass (when asked
    for, or when there is nothing regional), then the box edits, then the global tone factors.
    The box edits: inpaint, one inpainting pass per box; regional, ONE regional-prompting pass
    (tools/regional.py) from the current image, at the regions' largest strength, the plan's
    revised prompt everywhere and each local prompt in its box. Regional regions accumulate:
    state `regions` keeps each iteration's, and an edit applies the earlier ones still
    standing (not undone by a rejected verdict) with the plan's, a new region replacing an
    earlier one that its box overlaps by more than 0.5 IoU."""
    step, modes = state["step"], ctx.loop.edit_modes
    plan = Plan.model_validate(step["plan"])
    params = GenParams(**step["params"])  # the image's own (best-of: the seed picked)
    if ctx.loop.carry_edits or state.get("init_image"):  # a new draw for an edit of what may
        # be the same image again (a session from an image carries its edits, see generate)
        params = replace(params, seed=params.seed + step["iteration"])
    regions = plan.regional_edits if "inpaint" in modes else []
    merged = (
        merge_regions(standing_regions(state), plan, step["iteration"])
        if "regional" in modes
        else []
    )
    applied = [r for r in merged if r["replaced_in"] is None]
    strength = plan.params.strength
    if strength is None:
        strength = 0.0 if regions or applied else ctx.diffusion_config.edit_strength
    if "img2img" not in modes:
        strength = 0.0
    image, ops = step["image"], []
    if strength > 0:
        p = enough_steps(params, strength)
        image = ctx.diffusion.image_to_image(
            image, plan.revised_prompt, plan.negative_prompt, p, strength
        )
        ops.append(
            {"op": "img2img", "strength": strength, "steps": p.num_inference_steps, "image": image}
        )
    if applied:
        top = max(r["strength"] for r in applied)
        # Enough steps that the weakest region is redrawn at least one step.
        p = enough_steps(params, min(r["strength"] for r in applied))
        boxes = [(r["box"], r["prompt"], r["strength"]) for r in applied]
        image = ctx.diffusion.regional(
            image, plan.revised_prompt, plan.negative_prompt, boxes, p, top
        )
        shown = [{k: r[k] for k in ("box", "prompt", "strength", "iteration")} for r in applied]
        ops.append(
            {
                "op": "regional",
                "regions": shown,
                "strength": top,
                "steps": p.num_inference_steps,
                "image": image,
            }
        )
    for region in regions:
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
    if "tone" in modes and any(v != 1.0 for v in tone.values()):
        image = ctx.store.images.put(adjust_tone(ctx.store.images.get(image), **tone))
        ops.append({"op": "tone", **tone, "image": image})
    picture = ctx.store.images.get(image)
    step = {**step, "edited_image": image, "edits": ops}
    step["stats"] = {**step["stats"], "edited": measure(picture)}
    if ctx.loop.watch_scorers:
        step["watch"] = {**step.get("watch", {}), "edited": watched(ctx, picture, state["prompt"])}
    if "regional" not in modes:
        return {"step": step}
    return {"step": step, "regions": merged}


@node
def validate(state: RefineState, ctx: RefineContext) -> dict:
    """The iteration judged: its edit (BEFORE, then AFTER) by the validator or a reward judge
    (`loop.judge`). In a loop with no edit, its image alone: the rater's score or the reward's,
    as a verdict (`verdict_alone`: accept from accept_score, else revise)."""
    step, loop = state["step"], ctx.loop
    before = ctx.store.images.get(step["image"])
    if "edited_image" not in step:
        return _agent(step, "validate", judge_alone(state, ctx, before))
    after = ctx.store.images.get(step["edited_image"])
    if loop.judge != "vlm":  # a measured preference judges instead of the VLM
        result = judge_by_reward(before, after, state["prompt"], loop.judge, loop.accept_score)
        return _agent(step, "validate", result)

    def ask(edited: Image.Image) -> Structured[Verdict]:
        return agents.validate(
            ctx.chat,
            before,
            edited,
            state["prompt"],
            Plan.model_validate(step["plan"]),
            step["stats"]["image"],
            step["stats"]["edited"] if edited is after else measure(edited),
            policy=ctx.policy,
            accept_score=loop.accept_score,
        )

    result = ask(after)
    canaries(state, ctx, step["edited_image"], result.output, lambda c: ask(c).output, before)
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
    kept = step["image"] if verdict == "reject" else step.get("edited_image", step["image"])
    step = human.record(step, "verdict", action) | {
        "score": score,
        "verdict": verdict,
        "result_image": kept,
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
    if loop.max_vlm_tokens is not None or loop.max_seconds is not None:
        step["budget"] = budget(ctx, state["run_id"], step)
        if status is None and step["budget"]["spent"]:
            status = "budget"
    # Without a plan (no thesis_cot) the next iteration starts from this one's prompts.
    plan = Plan.model_validate(step["plan"]) if "plan" in step else None
    changes = (
        plan.params.model_dump(include={"guidance_scale", "num_inference_steps"}, exclude_none=True)
        if plan
        else {}
    )
    attempt = {
        "iteration": i,
        "prompt": step["prompt"],
        "score": score,
        "verdict": verdict,
        "reasons": agent_verdict.reasons,
    }
    return {
        "step": step,
        "scores": scores,
        "status": status,
        "iteration": i + 1,
        "current_prompt": plan.revised_prompt if plan else step["prompt"],
        "current_negative_prompt": plan.negative_prompt if plan else step["negative_prompt"],
        "feedback": agent_verdict.reasons,
        "attempts": [*state.get("attempts", []), attempt],
        "params": {**state["params"], **changes},
        "best_image": kept if improved else state.get("best_image"),
        "best_score": score if improved else best_score,
    }


def budget(ctx: RefineContext, run_id: str, step: dict) -> dict:
    """The session's use of its budgets after this iteration (its stored earlier steps and this
    one): VLM tokens (prompt + completion) and seconds (its nodes' time), each budget, and the
    ones spent (`loop.max_vlm_tokens`, `loop.max_seconds`: reached or crossed)."""
    loop, i = ctx.loop, step["iteration"]
    earlier = [s for s in ctx.store.get_run(run_id)["steps"] if s["iteration"] < i]
    used = session_totals([*earlier, step])
    spent = []
    if loop.max_vlm_tokens is not None and used["vlm_tokens"] >= loop.max_vlm_tokens:
        spent.append("max_vlm_tokens")
    if loop.max_seconds is not None and used["wall_seconds"] >= loop.max_seconds:
        spent.append("max_seconds")
    return {
        "vlm_tokens": used["vlm_tokens"],
        "max_vlm_tokens": loop.max_vlm_tokens,
        "seconds": round(used["wall_seconds"], 3),
        "max_seconds": loop.max_seconds,
        "spent": spent,
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
# Every node, in the order they run; a variant leaves some out (`nodes_for`).
ORDER = (
    begin,
    enhance,
    compose,
    review_prompt,
    generate,
    pick,
    data_cot,
    concept_cot,
    thesis_cot,
    critic,
    review_plan,
    edit,
    validate,
    decide,
    record,
)


def nodes_for(loop: LoopConfig) -> tuple[Callable, ...]:
    """The nodes of `loop`'s variant, in order: a part it leaves out is not a node, so the
    graph's picture and the trajectory's timings show what ran."""
    separate = () if loop.critics == "merged" else loop.critics
    runs = {
        "enhance": loop.enhancer,
        "compose": not loop.enhancer,
        "pick": loop.best_of > 1,
        **{name: name in separate for name in CRITICS},
        "critic": loop.critics == "merged",
        "review_plan": loop.plans,
        "edit": bool(loop.edit_modes),
    }
    return tuple(fn for fn in ORDER if runs.get(fn.__name__, True))


def shape(loop: LoopConfig) -> tuple[str, ...]:
    """The names of the variant's nodes: variants of one shape share one graph."""
    return tuple(fn.__name__ for fn in nodes_for(loop))


def build_graph(loop: LoopConfig | None = None) -> StateGraph:
    """The refine graph of `loop`'s variant (None: the default loop): its nodes chained in
    order up to decide, which goes back to the iteration's first node or on to record."""
    nodes = nodes_for(loop or LoopConfig())
    # The context a server run gets from its client (JSON); artloop's runner passes a
    # RefineContext.
    built = StateGraph(RefineState, context_schema=RunSettings)
    for fn in nodes:
        built.add_node(fn.__name__, fn)
    built.add_edge(START, "begin")
    for a, b in pairwise(nodes[:-1]):  # begin -> ... -> decide, in order
        built.add_edge(a.__name__, b.__name__)
    first = nodes[1].__name__  # enhance, or compose
    built.add_conditional_edges(
        "decide", after_decide, {"revise": first, "accept": "record", "give_up": "record"}
    )
    built.add_edge("record", END)
    return built


NODES = nodes_for(LoopConfig())  # the default loop's
SERVED = shape(LoopConfig())  # what a LangGraph server runs (`graph`)
builder = build_graph()


def check_served(loop: LoopConfig) -> None:
    """A server runs `graph`, the default loop's: a session's loop settings may change what
    its nodes do (judge, memory, best_of_judge, ...), not which nodes run."""
    if (wanted := shape(loop)) != SERVED:
        extra = sorted(set(wanted) - set(SERVED)) or ["none"]
        missing = sorted(set(SERVED) - set(wanted)) or ["none"]
        raise ConfigError(
            f"loop: this variant runs other nodes than the server's graph (adds "
            f"{', '.join(extra)}; leaves out {', '.join(missing)}): run it with artloop run, "
            "batch or session, whose runner builds the variant's graph"
        )


# --- the server's graph -------------------------------------------------------------------------
# Without a checkpointer, for `langgraph dev` (it brings its own); artloop's runner compiles
# `build_graph(loop)` with its checkpointer and keeps the store's status itself.
graph = builder.compile().with_config(callbacks=[ServerRuns()])
