"""Test doubles: the package's scripted chat model, and a flaky one that injects a server outage
(a fault the real server cannot produce on demand)."""

from __future__ import annotations

import os

from artloop.models.scripted import DEFAULTS, ScriptedChat
from langchain_core.outputs import ChatResult
from pydantic import PrivateAttr

__all__ = ["DEFAULTS", "FaultProxy", "FlakyChat", "PoisonedChat", "ScriptedChat", "SlowChat"]


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


class SlowChat(ScriptedChat):
    """Takes `delay_s` over each answer: a slow server, so that two processes' sessions on one
    run overlap for certain (for the CLI, which builds its chat model from config)."""

    delay_s: float = 1.0

    def _generate(self, messages, stop=None, run_manager=None, **kw) -> ChatResult:
        import time

        time.sleep(self.delay_s)
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


class FaultProxy:
    """An HTTP proxy in front of a real server that injects what the server cannot do on
    demand: `fail_next` requests answered with `status` (a 5xx from a gateway), and `delay_s`
    before each request is forwarded (a server too slow for the client's timeout)."""

    def __init__(self, upstream: str) -> None:
        import threading
        import urllib.error
        import urllib.request
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.upstream = upstream.rstrip("/")  # e.g. http://127.0.0.1:8000 (no /v1)
        self.fail_next, self.status, self.delay_s, self.seen = 0, 503, 0.0, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen.append(self.path)
                if proxy.fail_next > 0:
                    proxy.fail_next -= 1
                    return self._reply(proxy.status, b'{"error": "injected by FaultProxy"}')
                import time

                time.sleep(proxy.delay_s)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() in ("content-type", "authorization")
                }
                req = urllib.request.Request(
                    proxy.upstream + self.path,
                    data=body or None,
                    headers=headers,
                    method=self.command,
                )
                try:
                    with urllib.request.urlopen(req, timeout=600) as r:
                        self._reply(r.status, r.read())
                except urllib.error.HTTPError as e:
                    self._reply(e.code, e.read())
                except OSError:  # the client gave up (timeout) while we waited
                    pass

            def _reply(self, status: int, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client went away
                    pass

            do_GET = do_POST = _forward

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
