"""`check_chat_model` against a real HTTP server on loopback: a server that refuses the key
(401/403) is reported as a wrong key before anything runs, not let through as reachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from artloop.config import ChatConfig, ConfigError
from artloop.models.chat import check_chat_model
from pydantic import SecretStr

KEY = "the-right-key"


class Models(BaseHTTPRequestHandler):
    """GET /v1/models as vLLM started with --api-key answers it; `refusal` is its status for
    any other key (401, or 403 as some gateways answer)."""

    refusal = 401

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        ok = self.headers.get("Authorization") == f"Bearer {KEY}"
        body = json.dumps({"data": [{"id": "m"}]} if ok else {"error": "Unauthorized"}).encode()
        self.send_response(200 if ok else self.refusal)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(params=[401, 403])
def server(request):
    handler = type("Refusing", (Models,), {"refusal": request.param})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", request.param
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_a_refused_key_is_named(server):
    url, code = server
    check_chat_model(ChatConfig(backend="openai", base_url=url, api_key=SecretStr(KEY)))
    wrong = ChatConfig(backend="openai", base_url=url, api_key=SecretStr("a-wrong-key"))
    with pytest.raises(
        ConfigError, match=rf"chat server at {url} refused the API key \({code} "
    ) as e:
        check_chat_model(wrong)
    assert "a-wrong-key" not in str(e.value) and "chat.api_key" in str(e.value)


def test_cli_stops_before_the_run(server, tmp_path):
    url, code = server
    out = subprocess.run(
        [
            str(Path(sys.executable).with_name("artloop")),
            "run",
            "a fox",
            "--chat-backend",
            "openai",
            "--base-url",
            url,
            "--home",
            str(tmp_path / "home"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ARTLOOP_CHAT__API_KEY": "a-wrong-key"},
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and f"refused the API key ({code} " in out.stderr
    assert "a-wrong-key" not in out.stderr + out.stdout
