"""A scripted chat model for tests where the model's content must be controlled (stop rules,
fault injection). It answers by the schema named in the prompt, from per-schema scripts."""

from __future__ import annotations

import json
import re
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr

DEFAULTS: dict[str, Any] = {
    "EnhancedPrompt": {"prompt": "a red fox in fresh snow, golden hour", "negative_prompt": "blur"},
    "ImageFacts": {"description": "a fox", "objects": [{"label": "fox", "box": [100, 200, 600, 900]}],
                   "lighting": "soft", "palette": "white and orange"},
    "Critique": {"artifacts": [{"kind": "blur", "severity": 2, "box": [100, 200, 600, 900], "note": "soft fur"}],
                 "aesthetics": [{"aspect": "exposure", "rating": 6, "note": "a bit dark"}],
                 "prompt_alignment": 7, "missing": [], "summary": "blurry fox"},
    "EditPlan": {"revised_prompt": "a sharp red fox in fresh snow", "negative_prompt": "blur",
                 "regional_edits": [{"box": [100, 200, 600, 900], "prompt": "sharp fur", "strength": 0.5}],
                 "params": {"guidance_scale": 6.0, "num_inference_steps": None, "strength": None},
                 "rationale": "sharpen the fox"},
    "Verdict": {"verdict": "revise", "score": 5.0, "better_than_before": True, "reasons": ["still soft"]},
}  # fmt: skip

_TITLE = re.compile(r'"title":"(\w+)","type":"object"\}\s*$')  # the top-level schema


class ScriptedChat(BaseChatModel):
    """Answers each schema from `scripts[schema]` in turn (the last answer repeats), else from
    DEFAULTS. An answer that is an Exception is raised instead (a fault on demand)."""

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
        schema = _TITLE.search(text).group(1)
        seen = sum(1 for c in self._calls if c == schema)
        self._calls.append(schema)
        script = self.scripts[schema] if schema in self.scripts else [DEFAULTS[schema]]
        answer = script[min(seen, len(script) - 1)]
        if isinstance(answer, Exception):
            raise answer
        content = answer if isinstance(answer, str) else json.dumps(answer)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=content))])


class FlakyChat(ScriptedChat):
    """From its `fail_on`-th call, raises ConnectionError `failures` times in a row while
    `marker` exists, then removes the marker: a server that is down for a while mid-run (for
    the CLI, which builds its chat model from config)."""

    marker: str
    fail_on: int = 5
    failures: int = 2
    _failed: int = PrivateAttr(default=0)

    def _generate(self, messages, stop=None, run_manager=None, **kw) -> ChatResult:
        import os

        if len(self.calls) + self._failed + 1 >= self.fail_on and os.path.exists(self.marker):
            self._failed += 1
            if self._failed >= self.failures:
                os.remove(self.marker)
            raise ConnectionError("connection refused by the chat server")
        return super()._generate(messages, stop, run_manager, **kw)
