"""How the refine loop scores and judges images outside the agents' chain: the fact and watch
scorers' scores, best-of-N's ranking of the candidates, an image judged alone (a loop with no
edit), and the VLM judge's canaries. Called by the nodes of graphs/refine.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from artloop import agents
from artloop.agents.schemas import Verdict
from artloop.graphs.context import RefineContext
from artloop.models.structured import Structured
from artloop.rewards import BrokenJudgeError, judge_alone_by_reward, reward_entry, verdict_alone
from PIL import Image


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


def rank(
    ctx: RefineContext, pictures: list[Image.Image], prompt: str
) -> tuple[list[dict], int, list[Structured]]:
    """Each picture's score by `loop.best_of_judge` (with the rater's reasons), the index of
    the best (the first of equals), and the rater's calls where the VLM judged."""
    judge, rated = ctx.loop.best_of_judge, []
    if judge == "vlm":
        rated = [agents.rate(ctx.chat, p, prompt, policy=ctx.policy) for p in pictures]
        judged = [{"score": r.output.score, "reasons": r.output.reasons} for r in rated]
        sign = 1.0
    else:
        entry = reward_entry(judge)
        values, _ = entry.fn(pictures, [prompt] * len(pictures), [{}] * len(pictures))
        judged = [{"score": round(float(v), 4)} for v in values]
        sign = 1.0 if entry.higher_is_better else -1.0
    best = max(range(len(judged)), key=lambda k: sign * judged[k]["score"])
    return judged, best, rated


def judge_alone(state: dict, ctx: RefineContext, image: Image.Image) -> Structured[Verdict]:
    """The verdict on an iteration's image with no edit to compare it with; better than before
    means better than the best score so far."""
    loop, reference = ctx.loop, state.get("best_score")
    if loop.judge != "vlm":
        return judge_alone_by_reward(
            image, state["prompt"], loop.judge, loop.accept_score, reference
        )

    def ask(picture: Image.Image, best: float | None) -> Structured[Verdict]:
        rated = agents.rate(ctx.chat, picture, state["prompt"], policy=ctx.policy)
        out = verdict_alone(rated.output.score, rated.output.reasons, loop.accept_score, best)
        return replace(rated, output=out)

    result = ask(image, reference)
    canaries(  # a canary is "better than before" if it beats the real image
        state,
        ctx,
        state["step"]["image"],
        result.output,
        lambda canary: ask(canary, result.output.score).output,
        image,
    )
    return result


def canaries(
    state: dict,
    ctx: RefineContext,
    judged: str,
    answer: Verdict,
    ask: Callable[[Image.Image], Verdict],
    before: Image.Image,
) -> None:
    """The VLM judge's canary pairs (`before` edited into a control image: noise, grey), when
    due; a judge that cannot tell them from real edits fails the run, and the runs it already
    judged lose their verdicts too."""
    try:
        ctx.judge_watch.check(state["run_id"], judged, answer, "validator", ask=ask, before=before)
    except BrokenJudgeError as e:
        for run_id in set(e.runs) - {state["run_id"]}:
            ctx.store.revoke(run_id, f"BrokenJudgeError: {e}")
        raise
