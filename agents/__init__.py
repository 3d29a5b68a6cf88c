"""The five loop agents, the merged critic (three of them in one call), and two single-image
judges used as rewards (rate, spot_artifacts). Each: a prompt template in prompts/, a pydantic schema, one function.

Pure: inputs in, a validated `Structured[Schema]` out; no I/O besides the model call.
"""

from artloop.agents.concept_cot import concept_cot
from artloop.agents.critic import critic
from artloop.agents.data_cot import data_cot
from artloop.agents.enhancer import enhance
from artloop.agents.rater import rate, spot_artifacts
from artloop.agents.thesis_cot import thesis_cot
from artloop.agents.validator import validate

__all__ = [
    "concept_cot",
    "critic",
    "data_cot",
    "enhance",
    "rate",
    "spot_artifacts",
    "thesis_cot",
    "validate",
]
