"""VLM judges as rewards: "vlm" (the rater's 0-10 score / 10) and "synartifact" (SynArtifact's
artifact reward), and the canary check that refuses a broken judge. They use the chat model of
the environment's config (ARTLOOP_CHAT__...) unless built with one.

A judge is broken when it cannot tell control images whose answer is known (canaries: pure
noise, a flat grey frame, a heavily blurred copy of a real image) from the real ones. One
answer for many real images is not evidence: a batch that all honestly show "No artifacts" is
what SynArtifact DDPO is for. Canaries cost VLM calls (two a check), so they are asked on a
schedule and the outcome is cached: the rewards once per judge per process, the loop's
validator once its answers agree across different images (agreement is a reason to look).
`scorers.canaries` (ARTLOOP_SCORERS__CANARIES) sets one schedule for all of them, "off" too."""

from __future__ import annotations

# Deliberately lazy: torch and transformers are imported inside the functions that use them, so that
# importing this module (the CLI's --help, the config, a test) does not load them.
import functools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from artloop.agents import rate, spot_artifacts
from artloop.agents.schemas import NO_ARTIFACTS, Verdict
from artloop.config import load_config
from artloop.models.chat import shared_chat_model
from artloop.models.structured import CallPolicy
from artloop.models.tiny import resolve_model
from artloop.prompts import artifact_taxonomy
from artloop.rewards.registry import RewardFn, reward, scorers_config
from PIL import Image, ImageFilter


class BrokenJudgeError(RuntimeError):
    """The judge could not tell a canary (a control image whose answer is known) from the real
    images: its answers must not become rewards or verdicts. `runs` are the runs whose verdicts
    it gave (the loop's validator: they are revoked)."""

    def __init__(self, message: str, runs: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.runs = runs


# --- the canaries -------------------------------------------------------------------------------
CANARIES = {
    "noise": "pure noise",
    "grey": "a flat grey frame",
    "blur": "a heavily blurred copy of a real image",
}
LOW_SCORE = 2.0  # a canary scored at most this (of 10) is scored right, whatever the real ones got
MIN_DISTINCT = 3  # different images that, given one answer, make "agreement" ask the canaries


def canary_image(kind: str, like: Image.Image) -> Image.Image:
    """A control image at `like`'s size, the same bytes every time: "noise" (uniform RGB noise,
    seed 0), "grey" (a flat mid-grey frame) or "blur" (`like` under a Gaussian blur whose radius
    is 1/16 of its longer side: shapes survive, detail does not)."""
    w, h = like.size
    if kind == "noise":
        rng = np.random.default_rng(0)
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if kind == "grey":
        return Image.new("RGB", (w, h), (128, 128, 128))
    if kind == "blur":
        return like.convert("RGB").filter(ImageFilter.GaussianBlur(radius=max(w, h) / 16))
    raise ValueError(f"unknown canary {kind!r}: one of {', '.join(CANARIES)}")


def _named(kind: str) -> str:
    return f"the {kind} canary ({CANARIES[kind]})"


# A rule: (canary kind, the judge's answer for it, its answers for the real images) -> None when
# the canary was told apart, else what gives the judge away (one clause).
Rule = Callable[[str, Any, Sequence[Any]], str | None]


def scored_below(kind: str, score: float, real: Sequence[float]) -> str | None:
    """The rater's rule: a canary scores below the real images' mean (or at most LOW_SCORE)."""
    mean = float(np.mean(real))
    if score < mean or score <= LOW_SCORE:
        return None
    return f"rated {_named(kind)} {score:g}/10, as high as the real images (mean {mean:.1f})"


def names_an_artifact(kind: str, answer: Sequence[str], real: Sequence[Any]) -> str | None:
    """The artifact spotter's rule: noise and a heavy blur never show no artifact class (its
    `answer` is the list of class ids it named; empty = "No artifacts")."""
    if answer:
        return None
    return f"reported no artifacts for {_named(kind)}"


def worse_than_the_edits(kind: str, v: Verdict, real: Sequence[Verdict]) -> str | None:
    """The validator's rule for a canary pair (the image before, then a canary as the edit):
    not accepted, not better than before, and scored below the real edits (or at most
    LOW_SCORE)."""
    pair = f"the {kind} canary pair (the image before, then {CANARIES[kind]} as the edit)"
    if v.verdict == "accept" or v.better_than_before:
        better = ", better than before" if v.better_than_before else ""
        return f"gave {pair} the verdict {v.verdict!r}{better}"
    mean = float(np.mean([r.score for r in real]))
    if v.score < mean or v.score <= LOW_SCORE:
        return None
    return f"scored {pair} {v.score:g}/10, as high as the real edits (mean {mean:.1f})"


@dataclass
class JudgeCheck:
    """One canary check of one judge: what was asked, what came back, what it cost."""

    judge: str
    answers: dict[str, Any]  # canary kind -> the judge's answer (a score, a text, a verdict)
    broken: str | None  # the one-line reason, None when every canary was told apart
    calls: int  # the VLM calls it cost (one per canary)
    at_call: int  # the judge's call it was asked at (a reward's batch, a validator's verdict)
    parse_failures: list[int] = field(default_factory=list)

    @property
    def message(self) -> str:
        return (
            f"{self.judge} judge {self.broken}: it cannot tell control images from real ones, "
            "a broken judge, not used as a reward or a verdict"
        )

    def raise_if_broken(self, runs: Sequence[str] = ()) -> None:
        if self.broken is not None:
            raise BrokenJudgeError(self.message, tuple(dict.fromkeys(runs)))

    def info(self, fresh: bool) -> dict:
        """What a reward's info dict says about it (`fresh`: asked on this call, else cached)."""
        answers = {
            k: v.model_dump() if isinstance(v, Verdict) else v for k, v in self.answers.items()
        }
        return {
            "checked": "now" if fresh else f"cached (from call {self.at_call})",
            "canaries": answers,
            "passed": self.broken is None,
            "calls": self.calls if fresh else 0,
        }


def check_judge(
    name: str,
    ask: Callable[[Image.Image, str], tuple[Any, int]],
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    answers: Sequence[Any],
    rule: Rule,
    canaries: Sequence[str],
    at_call: int = 1,
) -> JudgeCheck:
    """Ask judge `name` about each canary, in order (`ask(image, prompt) -> (answer, parse
    failures)`), built at the first real image's size ("blur" from it), with its prompt; judge
    each answer by `rule` against the real `answers`. Never raises for a broken judge: the
    outcome says so (`raise_if_broken`), so that it can be cached."""
    got, failures, broken = {}, [], None
    for kind in canaries:
        answer, failed = ask(canary_image(kind, images[0]), prompts[0])
        got[kind] = answer
        failures.append(failed)
        broken = broken or rule(kind, answer, answers)
    return JudgeCheck(name, got, broken, len(canaries), at_call, failures)


Schedule = Literal["once", "agreement", "off"] | int


def configured_schedule(given: Schedule | None, default: Schedule) -> Schedule:
    """`given`, else the config's `scorers.canaries`, else `default` (the judge's own)."""
    if given is not None:
        return given
    chosen = scorers_config().canaries
    return default if chosen is None else chosen


class Canaries:
    """When a judge's canaries are asked, and their outcome cached, per judge model.
    "once": the first time the judge answers, then never again in this process (the rewards'
    default); "agreement": the first time it gives one answer for MIN_DISTINCT or more different
    images (agreement is a reason to look, not evidence: the loop validator's default); N (int):
    the first time and every N calls after; "off": never. A judge found broken stays broken."""

    def __init__(self, schedule: Schedule = "once") -> None:
        if not (
            schedule in ("once", "agreement", "off") or (type(schedule) is int and schedule >= 1)
        ):
            raise ValueError(f"canary schedule {schedule!r}: 'once', 'agreement', 'off' or N >= 1")
        self.schedule = schedule
        self._seen: dict[int, list] = {}  # id(model) -> [model, calls so far, last JudgeCheck]
        self._lock = threading.Lock()

    def run(
        self, model: Any, agreed: bool, check: Callable[[int], JudgeCheck]
    ) -> tuple[JudgeCheck | None, bool]:
        """Count one more call of `model` (a reward's batch, a validator's verdict); ask
        `check(at_call)` if due (`agreed`: its answers were one answer for different images).
        Returns the latest outcome and whether it is fresh. The lock is held while the canaries
        are asked: concurrent callers wait for the outcome instead of asking twice."""
        with self._lock:
            entry = self._seen.setdefault(id(model), [model, 0, None])  # the model kept: its id
            entry[1] += 1
            n, last = entry[1], entry[2]
            s = self.schedule
            if s == "off" or (last is not None and last.broken is not None):
                due = False
            elif last is None:
                due = s != "agreement" or agreed
            else:
                due = type(s) is int and n - last.at_call >= s
            if due:
                entry[2] = last = check(n)
            return last, due


def _agree(images: Sequence[Any], answers: Sequence[str]) -> bool:
    return len(set(images)) >= MIN_DISTINCT and len(set(answers)) == 1


class JudgeWatch:
    """The canaries of a judge asked about one edit at a time: the loop's validator, across the
    sessions of a batch (they share it). `check` is given each verdict and a way to ask the
    validator about another edit; its canary pairs are the session's image before, then pure
    noise or a flat grey frame as the edit, whose right verdict is known (not accepted, not
    better than before, scored below the real edits). By default ("agreement") they are asked
    when its last `window` answers are one answer for different images, and the outcome is
    cached: a validator that honestly says "revise" to every session costs two calls, once.
    `schedule` None: `scorers.canaries` if set."""

    PAIRS = ("noise", "grey")

    def __init__(self, window: int = 8, schedule: Schedule | None = None) -> None:
        self.recent: deque[tuple[str, str, str, Verdict]] = deque(maxlen=window)
        self.canaries = Canaries(configured_schedule(schedule, "agreement"))
        self._lock = threading.Lock()
        self.last: JudgeCheck | None = None  # the latest canary check

    def check(
        self,
        run_id: str,
        image: str,
        answer: Verdict,
        name: str,
        ask: Callable[[Image.Image], Verdict],
        before: Image.Image,
    ) -> JudgeCheck | None:
        """Record `answer` (run `run_id`'s verdict on edited image `image`), ask the canaries if
        due (`ask(after)`: the validator's verdict on `before` edited into `after`), and raise
        BrokenJudgeError naming the canary, with the runs of the window, if it could not tell
        them from the real edits."""
        with self._lock:  # sessions run in threads
            self.recent.append((run_id, image, answer.model_dump_json(), answer))
            recent = list(self.recent)
        runs, images, keys, verdicts = zip(*recent, strict=True)
        agreed = len(recent) == self.recent.maxlen and _agree(images, keys)
        outcome, _ = self.canaries.run(
            self,  # one judge per watch
            agreed,
            lambda n: check_judge(
                name,
                lambda im, _p: (ask(im), 0),
                [before],
                [""],
                verdicts,
                worse_than_the_edits,
                self.PAIRS,
                at_call=n,
            ),
        )
        if outcome is not None:
            self.last = outcome
            outcome.raise_if_broken(runs)
        return outcome


def _config_chat() -> Any:
    # The agents' in-process model when it is the same one (models/chat.py shares it).
    return shared_chat_model(load_config().chat)


def _watch(watches: dict, given: Schedule | None) -> tuple[Canaries, Schedule]:
    """A reward's canaries on the schedule in force (`given`, else `scorers.canaries`, else
    "once"), read at each call: outcomes are cached per schedule."""
    schedule = configured_schedule(given, "once")
    if schedule not in watches:
        watches.setdefault(schedule, Canaries(schedule))
    return watches[schedule], schedule


def _canary_info(outcome: JudgeCheck | None, fresh: bool, schedule: Schedule) -> dict:
    if outcome is None:
        return {"checked": "off" if schedule == "off" else "not yet", "schedule": schedule}
    return {**outcome.info(fresh), "schedule": schedule}


def vlm_reward(chat: Any = None, policy: Any = None, canaries: Schedule | None = None) -> RewardFn:
    """The rater's 0-10 score of each image against its prompt, scaled to [0, 1]. Its canaries
    (asked after the batch's images, on `canaries`' schedule; None: `scorers.canaries`, else
    "once"): pure noise and a flat grey frame, rated against the batch's first prompt, must
    score below the real images' mean (or at most LOW_SCORE); else BrokenJudgeError.
    info["canaries"] says what was checked."""
    # a schedule given is checked here, at construction; the config's when first read
    watches: dict[Schedule, Canaries] = {} if canaries is None else {canaries: Canaries(canaries)}

    def fn(images, prompts, metadata):
        watch, schedule = _watch(watches, canaries)
        if not images:  # nothing asked, nothing to compare a canary with
            return np.array([]), {"reasons": [], "parse_failures": [], "canaries": {}}
        model = chat if chat is not None else _config_chat()
        p = policy or CallPolicy()
        calls = [rate(model, im, pr, policy=p) for im, pr in zip(images, prompts, strict=True)]
        ratings = [c.output for c in calls]
        scores = [r.score for r in ratings]

        def ask(im, pr):
            c = rate(model, im, pr, policy=p)
            return c.output.score, c.failures

        outcome, fresh = watch.run(
            model,
            _agree(_keys(images), [r.model_dump_json() for r in ratings]),
            lambda n: check_judge(
                "vlm", ask, images, prompts, scores, scored_below, ("noise", "grey"), n
            ),
        )
        if outcome is not None:
            outcome.raise_if_broken()
        return np.array([s / 10 for s in scores]), {
            "reasons": [r.reasons for r in ratings],
            "parse_failures": [c.failures for c in calls],
            "canaries": _canary_info(outcome, fresh, schedule),
        }

    return fn


def _keys(images: Sequence[Image.Image]) -> list[int]:
    return [hash(np.asarray(im.convert("RGB")).tobytes()) for im in images]


def clip_text_embedder(model: str) -> Callable[[list[str]], np.ndarray]:
    """Unit-norm pooled CLIP text embeddings from a diffusion model's (first) text encoder:
    `model` is a pipeline directory, a hub id or a tiny-* name."""
    # Deliberately lazy: torch and transformers load only when an embedder is built.
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model(model)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(
        path, subfolder="text_encoder", use_safetensors=True
    ).eval()

    def embed(texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            ids = tokenizer(
                texts,
                padding="max_length",
                truncation=True,
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            )
            pooled = encoder(ids.input_ids).pooler_output.float()  # (N, D)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    return embed


@functools.cache
def _config_embedder() -> Callable[[list[str]], np.ndarray]:
    return clip_text_embedder(load_config().diffusion.model)


def synartifact_reward(
    chat: Any = None,
    embed: Any = None,
    alpha: float = 0.1,
    beta: float = 0.0,
    policy: Any = None,
    canaries: Schedule | None = None,
) -> RewardFn:
    """SynArtifact (arXiv 2402.18068): ask the VLM which artifacts the image shows, then
    r = sim("No artifacts", answer) - alpha * sum_k sim(class_k, answer) + beta,
    with sim the cosine similarity of text embeddings (CLIP's text encoder by default).
    The VLM names the classes from the taxonomy (a list of ids, grammar-bound); its answer is
    the class names joined by ", " (ids with spaces, as the references are), or "No artifacts".
    Its canaries (asked after the batch's images, on `canaries`' schedule): pure noise and a
    heavily blurred copy of the first image, with the first prompt, must name some artifact
    class; else BrokenJudgeError. info["canaries"] says what was checked. `canaries` None:
    `scorers.canaries`, else "once"."""
    # a schedule given is checked here, at construction; the config's when first read
    watches: dict[Schedule, Canaries] = {} if canaries is None else {canaries: Canaries(canaries)}
    refs: list[np.ndarray] = []  # "No artifacts" + the classes, embedded on the first call

    def fn(images, prompts, metadata):
        watch, schedule = _watch(watches, canaries)
        model = chat if chat is not None else _config_chat()
        calls = [
            spot_artifacts(model, im, p, policy=policy or CallPolicy())
            for im, p in zip(images, prompts, strict=True)
        ]
        found = [c.output.artifacts for c in calls]
        answers = [c.output.as_text for c in calls]  # the text SynArtifact embeds

        def ask(im, pr):
            c = spot_artifacts(model, im, pr, policy=policy or CallPolicy())
            return c.output.artifacts, c.failures

        outcome, fresh = watch.run(
            model,
            _agree(_keys(images), answers),
            lambda n: check_judge(
                "synartifact",
                ask,
                images,
                prompts,
                found,
                names_an_artifact,
                ("noise", "blur"),
                n,
            ),
        )
        if outcome is not None:
            outcome.raise_if_broken()
        embedder = embed or _config_embedder()  # the same one on every call
        if not refs:
            classes = [a["id"].replace("_", " ") for a in artifact_taxonomy()]
            refs.append(embedder([NO_ARTIFACTS, *classes]))
        sims = embedder(answers) @ refs[0].T  # (N, 1 + K): cosine similarities
        scores = sims[:, 0] - alpha * sims[:, 1:].sum(axis=1) + beta
        return scores, {
            "answers": answers,
            "artifacts": found,
            "parse_failures": [c.failures for c in calls],
            "canaries": _canary_info(outcome, fresh, schedule),
        }

    return fn


reward("vlm", range=(0.0, 1.0))(vlm_reward())
# sim("No artifacts") - alpha * sum of 13 sims + beta: its bounds depend on alpha, beta and the
# embedder, and say nothing about what a good image scores, so none is declared.
reward("synartifact")(synartifact_reward())
