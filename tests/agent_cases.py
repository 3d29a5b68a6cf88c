"""The agent calls both the in-process and the vLLM tests make, varied inputs: 20 per agent
against the vLLM server (the statistics), a few per agent in-process (tests/test_agents.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from artloop import agents
from artloop.agents.schemas import (
    ArtifactAnswer,
    CriticAnswer,
    Critique,
    EditPlan,
    EnhancedPrompt,
    ImageFacts,
    Rating,
    Verdict,
)
from artloop.models.structured import CallPolicy, Structured
from artloop.tools.image_facts import measure
from fakes import DEFAULTS
from PIL import Image

# Every agent's answer schema, in the loop's order, then the merged critic's (the three critics'
# in one), then the rewards' two.
ANSWER_SCHEMAS = (
    EnhancedPrompt,
    ImageFacts,
    Critique,
    EditPlan,
    Verdict,
    CriticAnswer,
    Rating,
    ArtifactAnswer,
)
POLICY = CallPolicy()  # a family's (models/families.py) for the other families' tests
CALLS = 20  # per agent, against the vLLM server
FEW_CALLS = 3  # per agent, in-process
PROMPTS = [
    "a red fox in the snow",
    "a lighthouse at dusk",
    "portrait of an old sailor",
    "a bowl of ramen, studio light",
    "a city street in the rain",
]


def image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8))


CASES = {
    "enhance": (
        EnhancedPrompt,
        lambda m, i, policy=POLICY: agents.enhance(
            m,
            PROMPTS[i % 5],
            previous_prompt="a fox" if i % 2 else None,
            feedback=["too dark"] if i % 2 else None,
            policy=policy,
        ),
    ),
    "data_cot": (
        ImageFacts,
        lambda m, i, policy=POLICY: agents.data_cot(
            m, image(i), PROMPTS[i % 5], measure(image(i)), policy=policy
        ),
    ),
    "concept_cot": (
        Critique,
        lambda m, i, policy=POLICY: agents.concept_cot(
            m,
            image(i),
            PROMPTS[i % 5],
            ImageFacts(**DEFAULTS["ImageFacts"]),
            measure(image(i)),
            policy=policy,
        ),
    ),
    "thesis_cot": (
        EditPlan,
        lambda m, i, policy=POLICY: agents.thesis_cot(
            m,
            image(i),
            PROMPTS[i % 5],
            "a fox",
            {"seed": i, "guidance_scale": 5.0},
            Critique(**DEFAULTS["Critique"]),
            policy=policy,
        ),
    ),
    "validate": (
        Verdict,
        lambda m, i, policy=POLICY: agents.validate(
            m,
            image(i),
            image(i + 1),
            PROMPTS[i % 5],
            EditPlan(**DEFAULTS["EditPlan"]),
            measure(image(i)),
            measure(image(i + 1)),
            policy=policy,
        ),
    ),
}


def sample_calls(call, chat, n: int, **kwargs) -> list[Structured]:
    """`n` calls of one agent at once (cases 0..n-1): an in-process model with a batch window
    gathers them into one batched generate, so n sampled answers cost about one."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: call(chat, i, **kwargs), range(n)))


def check_answers(schema, results: list[Structured], backend: str, calls: int = CALLS) -> None:
    """Every answer typed and valid; sampled answers differ; the grammar leaves ~no failures
    (at most 2 repaired answers in 20 calls, 1 in fewer). A box with no area is not the
    grammar's to forbid (JSON schema cannot say x1 < x2): a random model draws one in a pixel
    convention now and then, and it is refused and repaired like any invalid answer, so it is
    not counted here."""
    assert len(results) == calls
    for result in results:
        assert isinstance(result.output, schema) and result.backend == backend
        schema.model_validate(result.output.model_dump())  # round-trips through validation
    outputs = {r.output.model_dump_json() for r in results}
    assert len(outputs) > calls // 2, "sampled answers should differ"
    failures = sum(1 for r in results for e in r.errors if "has no area" not in e)
    allowed = max(1, calls // 10)
    assert failures <= allowed, f"{failures} invalid answers in {calls} calls despite the grammar"
