"""Test doubles: the package's scripted chat model, and a flaky one that injects a server outage
(a fault the real server cannot produce on demand)."""

from __future__ import annotations

import os

from artloop.models.scripted import DEFAULTS, ScriptedChat
from langchain_core.outputs import ChatResult
from pydantic import PrivateAttr

__all__ = ["DEFAULTS", "FlakyChat", "PoisonedChat", "ScriptedChat"]


class FlakyChat(ScriptedChat):
    """From its `fail_on`-th call, raises ConnectionError `failures` times in a row while
    `marker` exists, then removes the marker: a server that is down for a while mid-run (for
    the CLI, which builds its chat model from config)."""

    marker: str
    fail_on: int = 5
    failures: int = 2
    _failed: int = PrivateAttr(default=0)

    def _generate(self, messages, stop=None, run_manager=None, **kw) -> ChatResult:
        if len(self.calls) + self._failed + 1 >= self.fail_on and os.path.exists(self.marker):
            self._failed += 1
            if self._failed >= self.failures:
                os.remove(self.marker)
            raise ConnectionError("connection refused by the chat server")
        return super()._generate(messages, stop, run_manager, **kw)


class PoisonedChat(ScriptedChat):
    """Raises ConnectionError for requests that mention `poison` while `marker` exists: one
    session's server trouble among concurrent ones (a fault the real server cannot target)."""

    poison: str
    marker: str

    def _generate(self, messages, stop=None, run_manager=None, **kw) -> ChatResult:
        text = " ".join(str(m.content) for m in messages)
        if self.poison in text and os.path.exists(self.marker):
            raise ConnectionError("connection refused by the chat server")
        return super()._generate(messages, stop, run_manager, **kw)
