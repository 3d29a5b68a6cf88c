"""What a session is doing right now, as the web UI shows it while it runs: the node, the
iteration i of n, the seconds in this node and in all, and a bar of the diffusion steps. Fed the
graph's progress events (graphs/refine.py: node_started, diffusion_step, node_finished) as they
stream; `html` draws it. No Gradio here: the UI calls it, the tests feed it events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape

# What each node is doing, in words.
DOING = {
    "begin": "starting",
    "enhance": "enhancing the prompt",
    "compose": "composing the prompt",
    "review_prompt": "waiting for you (prompt)",
    "generate": "drawing the image",
    "pick": "picking the best draw",
    "data_cot": "Data-CoT: gathering facts",
    "concept_cot": "Concept-CoT: critiquing",
    "thesis_cot": "Thesis-CoT: planning the edit",
    "critic": "the critic: facts, critique and plan",
    "review_plan": "waiting for you (plan)",
    "edit": "editing the image",
    "validate": "validating the edit",
    "decide": "deciding",
    "record": "recording the session",
}


@dataclass
class Progress:
    """The latest state of a running session, from its events."""

    max_iters: int
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)
    node: str | None = None
    iteration: int = 0
    node_started: float = 0.0
    step: int = 0
    steps: int = 0
    finished: list[tuple[str, float]] = field(default_factory=list)  # (node, seconds)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def feed(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "node_started":
            self.node, self.iteration = event.get("node"), int(event.get("iteration") or 0)
            self.node_started, self.step, self.steps = self.clock(), 0, 0
        elif kind == "diffusion_step":
            self.step, self.steps = int(event["step"]), int(event["steps"])
        elif kind == "node_finished":
            self.finished.append((str(event.get("node")), float(event.get("seconds") or 0.0)))
            self.node = None

    def html(self) -> str:
        now = self.clock()
        where = f"iteration {self.iteration + 1} of {self.max_iters}"
        if self.node is None:
            last = f", last: {escape(self.finished[-1][0])}" if self.finished else ""
            doing = f"<b>between nodes</b>{last}"
        else:
            what = DOING.get(self.node, self.node)
            doing = (
                f"<b>{escape(what)}</b> <code>{escape(self.node)}</code> "
                f"{now - self.node_started:.1f} s"
            )
        bar = ""
        if self.steps:
            bar = (
                f'<div class="diffusion">diffusion step {self.step} of {self.steps} '
                f'<progress max="{self.steps}" value="{self.step}"></progress></div>'
            )
        return (
            f'<div class="progress-now">{where} · {doing} · {now - self.started:.1f} s in all'
            f"{bar}</div>"
        )
