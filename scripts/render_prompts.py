"""Print the text a model sees for each agent, for a sample state, as Markdown (the README's
"What the agents are told" section is this output).

    .venv/bin/python scripts/render_prompts.py [--schema-in-prompt] > prompts.md

By default the prompt of a backend that constrains decoding (inprocess, openai): each field in
order with its description; --schema-in-prompt shows what the other backends get instead (the
JSON schema). Images are shown as [image]; the system message, the same for every agent, once.
"""

from __future__ import annotations

import argparse

from artloop.agents.base import answer_guide, messages_for, stat_lines, system_text
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
from artloop.agents.validator import compared_stats
from artloop.models.scripted import DEFAULTS
from artloop.models.structured import schema_instructions
from PIL import Image

PROMPT = "a red fox in the snow"
# A plausible generation's statistics (tools/image_facts.py measure), and after a darkening edit.
STATS = {
    "brightness": 0.74,
    "contrast": 0.21,
    "saturation": 0.38,
    "colourfulness": 41.3,
    "sharpness": 812.0,
    "entropy": 7.42,
    "clipped_dark": 0.003,
    "clipped_bright": 0.081,
}
AFTER = {**STATS, "brightness": 0.61, "clipped_bright": 0.012, "sharpness": 905.0}


def cases() -> dict[str, tuple[int, type, dict]]:
    """agent -> (how many images it is sent, its schema, its template's variables)."""
    return {
        "enhance": (0, EnhancedPrompt, {"prompt": PROMPT, "previous_prompt": None, "feedback": [],
                                        "history": []}),
        "data_cot": (1, ImageFacts, {"prompt": DEFAULTS["EnhancedPrompt"]["prompt"],
                                     "stats": stat_lines(STATS), "scores": {}}),
        "concept_cot": (1, Critique, {"prompt": PROMPT, "facts": DEFAULTS["ImageFacts"],
                                      "stats": stat_lines(STATS)}),
        "thesis_cot": (1, EditPlan, {
            "prompt": PROMPT,
            "current_prompt": DEFAULTS["EnhancedPrompt"]["prompt"],
            "params": {"seed": 0, "guidance_scale": 5.0, "num_inference_steps": 30},
            "critique": DEFAULTS["Critique"],
            "facts": None,
            "unavailable": [],
        }),
        "validate": (2, Verdict, {"prompt": PROMPT, "plan": DEFAULTS["EditPlan"],
                                  "stats": compared_stats(STATS, AFTER), "accept_score": "7"}),
        "critic": (1, CriticAnswer, {  # loop.critics = "merged": the three above in one call
            "prompt": PROMPT,
            "current_prompt": DEFAULTS["EnhancedPrompt"]["prompt"],
            "params": {"seed": 0, "guidance_scale": 5.0, "num_inference_steps": 30},
            "stats": stat_lines(STATS),
            "scores": {},
            "unavailable": [],
        }),
        "rate": (1, Rating, {"prompt": PROMPT}),
        "artifacts": (1, ArtifactAnswer, {"prompt": PROMPT}),
    }  # fmt: skip


def render_all(schema_in_prompt: bool = False) -> str:
    picture = Image.new("RGB", (64, 64))
    out = ["### The system message (every agent)", "", "```text", system_text(), "```"]
    for agent, (n, schema, variables) in cases().items():
        answer = schema_instructions(schema) if schema_in_prompt else answer_guide(schema)
        messages = messages_for(agent, answer, [picture] * n, **variables)
        parts = ["[image]" if p["type"] == "image_url" else p["text"] for p in messages[1].content]
        out += ["", f"### {agent}", "", "```text", "\n".join(parts), "```"]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schema-in-prompt", action="store_true")
    print(render_all(parser.parse_args().schema_in_prompt), end="")


if __name__ == "__main__":
    main()
