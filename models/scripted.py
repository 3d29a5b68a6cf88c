"""A scripted chat model: it answers each agent by the output schema named in its prompt, from
per-schema scripts. For runs whose model content must be fixed: tests of stop rules and faults,
reproducible demos, and studies run in miniature in CI (bench/shapes_effect_ci.toml).
It is the `scripted` chat backend: `chat.backend = "scripted"`, with `chat.custom_kwargs =
{scripts = {EditPlan = [{...}], ...}}` (schema title -> answers in turn); a schema without a
script gets DEFAULTS' answer. tests/fakes.py builds its fault-injecting doubles on it."""

from __future__ import annotations

import json
import re
from typing import Any

from artloop.prompts import aesthetics_checklist
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr

# The aesthetics checklist's aspects (prompts/ is the layer below models/).
ASPECTS = [a["id"] for a in aesthetics_checklist()]

DEFAULTS: dict[str, Any] = {
    "EnhancedPrompt": {"prompt": "a red fox in fresh snow, golden hour", "negative_prompt": "blur"},
    "ImageFacts": {
        "description": "a fox",
        "objects": [{"label": "fox", "box": [100, 200, 600, 900]}],
        "lighting": "soft",
        "palette": "white and orange",
    },
    "Critique": {
        "observations": ["a fox in snow, as asked; the fur is soft"],
        "missing": [],
        "artifacts": [
            {"note": "soft fur", "kind": "blur", "box": [100, 200, 600, 900], "severity": 2}
        ],
        "aesthetics": {
            aspect: {"note": "a bit dark" if aspect == "exposure" else "fine", "rating": 6}
            for aspect in ASPECTS
        },
        "prompt_alignment": 7,
        "summary": "blurry fox",
    },
    "EditPlan": {
        "rationale": "sharpen the fox",
        "revised_prompt": "a sharp red fox in fresh snow",
        "negative_prompt": "blur",
        "regional_edits": [{"box": [100, 200, 600, 900], "prompt": "sharp fur", "strength": 0.5}],
        "params": {"guidance_scale": 6.0, "num_inference_steps": None, "strength": None},
    },
    "Verdict": {
        "reasons": ["still soft"],
        "better_than_before": True,
        "score": 5.0,
        "verdict": "revise",
    },
    "Rating": {"reasons": ["a fox, soft"], "score": 5.0},
    "ArtifactAnswer": {"notes": "soft fur", "artifacts": ["blur"]},
}

# The merged critic's answer is the three critics' answers in one.
DEFAULTS["CriticAnswer"] = {
    "facts": DEFAULTS["ImageFacts"],
    "critique": DEFAULTS["Critique"],
    "plan": DEFAULTS["EditPlan"],
}

_TITLE = re.compile(r'"title":"(\w+)","type":"object"\}\s*$')  # the top-level schema


class ScriptedChat(BaseChatModel):
    """Answers each schema from `scripts[schema]` in turn (the last answer repeats), else from
    DEFAULTS. An answer that is an Exception is raised instead (a fault on demand); a string is
    sent as is (malformed output on demand)."""

    scripts: dict[str, list[Any]] = {}
    _calls: list[str] = PrivateAttr(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    @property
    def calls(self) -> list[str]:
        return self._calls

    def _generate(
        self, messages: list[BaseMessage], stop=None, run_manager=None, **kw
    ) -> ChatResult:
        text = next(m for m in messages if m.type == "human").content
        text = (
            text
            if isinstance(text, str)
            else " ".join(p.get("text", "") for p in text if isinstance(p, dict))
        )
        found = _TITLE.search(text)
        if found is None:
            raise ValueError("ScriptedChat: the prompt names no output schema to answer by")
        schema = found.group(1)
        seen = sum(1 for c in self._calls if c == schema)
        self._calls.append(schema)
        script = self.scripts.get(schema) or ([DEFAULTS[schema]] if schema in DEFAULTS else None)
        if not script:
            raise ValueError(f"ScriptedChat: no script and no default answer for {schema}")
        answer = script[min(seen, len(script) - 1)]
        if isinstance(answer, Exception):
            raise answer
        content = answer if isinstance(answer, str) else json.dumps(answer)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=content))])
