"""artloop: improve text-to-image models with AI feedback.

A LangGraph loop of vision-language agents (enhance -> generate -> data_cot -> concept_cot ->
thesis_cot -> edit -> validate) drives a diffusion model; accepted trajectories are stored and
exported for LoRA training.
"""

__version__ = "0.1.0"
