"""The five agents. Each: a prompt template in prompts/, a pydantic schema, one function.

Pure: inputs in, a validated `Structured[Schema]` out; no I/O besides the model call.
"""

from artloop.agents.concept_cot import concept_cot
from artloop.agents.data_cot import data_cot
from artloop.agents.enhancer import enhance
from artloop.agents.thesis_cot import thesis_cot
from artloop.agents.validator import validate

__all__ = ["concept_cot", "data_cot", "enhance", "thesis_cot", "validate"]
