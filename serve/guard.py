"""The web UI's front door, checked before Gradio sees anything.

`check_serve` refuses, before anything starts, what would bind wrongly: a blank token, a port
out of range, an address that cannot be listened on (a name that does not resolve, an address
not on this machine, a port in use) and a non-loopback address without a token. `Guard` is
ASGI middleware in front of every route: it caps request bodies (10 MB) and the pixels of every
image in a multipart body (4096 x 4096, from the header: nothing is decoded) with a 413 that
names the limit, and refuses a client's logins (429) after a few failures in a row.
Imports nothing heavy: the CLI checks its flags here before loading Gradio or a model.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from artloop.tools.images import MAX_PIXELS, ImageStoreError, ImageTooLarge, check_pixels
from starlette.datastructures import UploadFile
from starlette.requests import Request

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "ARTLOOP_UI_TOKEN"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
_DRAIN_BYTES = 4 * MAX_UPLOAD_BYTES  # read (and drop) this much of an oversized body, then answer

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class UIError(ValueError):
    """The UI cannot start as asked (e.g. a public address without a token)."""


def read_token(token_file: Path | None) -> str | None:
    """The login password: from `token_file` (its trailing newline dropped) or $ARTLOOP_UI_TOKEN,
    never from argv (any user of the machine reads that in `ps`)."""
    from_env = os.environ.get(TOKEN_ENV)
    if token_file is None:
        return from_env
    if from_env is not None:
        raise UIError(f"both --token-file and {TOKEN_ENV} are set: use one")
    try:
        return Path(token_file).expanduser().read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise UIError(f"cannot read the token file {token_file}: {why}") from None


def check_serve(host: str, port: int, token: str | None) -> str | None:
    """Refuse a bind that would go wrong, before anything starts (see the module); the token."""
    if token is not None and not token.strip():
        raise UIError(
            f"the UI token is blank: a password of spaces protects nothing (set "
            f"{TOKEN_ENV} or --token-file to a real one)"
        )
    if not 1 <= port <= 65535:
        raise UIError(f"port {port} is not a TCP port (1-65535)")
    if not host.strip():
        raise UIError("the host is empty: give an address to bind (default 127.0.0.1)")
    if host not in LOOPBACK and not token:
        raise UIError(
            f"binding {host} exposes the UI beyond this machine: set a token "
            f"({TOKEN_ENV} or --token-file)"
        )
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:  # what uvicorn will do, at once
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:  # gaierror included: a host that does not resolve
        raise UIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return token


class LoginLimiter:
    """Failed logins per client: after `max_failures` within `window_s`, that client's logins
    are refused until the oldest of them is `window_s` old. An attempt counts as failed from the
    moment it arrives (a burst in parallel is counted too); a success clears the client."""

    def __init__(
        self,
        max_failures: int = 5,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        self.max_failures, self.window_s, self.clock = max_failures, window_s, clock
        self.max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def wait(self, client: str) -> float:
        """Seconds before `client` may try again; 0 when it may now."""
        failures, now = self._failures.get(client), self.clock()
        while failures and now - failures[0] >= self.window_s:
            failures.popleft()
        if not failures:
            self._failures.pop(client, None)
            return 0.0
        return self.window_s - (now - failures[0]) if len(failures) >= self.max_failures else 0.0

    def attempt(self, client: str) -> None:
        if client not in self._failures and len(self._failures) >= self.max_clients:
            self._failures.pop(next(iter(self._failures)))  # the longest-known client goes
        self._failures.setdefault(client, deque(maxlen=self.max_failures)).append(self.clock())

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


async def _answer(send: Send, status: int, detail: str, headers: tuple = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the buffered body once, then the client's own messages
    (a disconnect, for a streaming route)."""
    given = False

    async def again() -> MutableMapping[str, Any]:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


class Guard:
    """ASGI middleware: body and image limits on every route that takes data, login limits."""

    def __init__(
        self,
        app: Callable,
        max_bytes: int = MAX_UPLOAD_BYTES,
        max_pixels: int = MAX_PIXELS,
        logins: LoginLimiter | None = None,
    ) -> None:
        self.app, self.max_bytes, self.max_pixels = app, max_bytes, max_pixels
        self.logins = logins or LoginLimiter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown",))[0]
        login = scope["path"].rstrip("/").endswith("/login")
        if login and (wait := self.logins.wait(client)):
            retry = str(math.ceil(wait))
            return await _answer(
                send,
                429,
                f"too many failed logins from {client}: try again in {retry} s",
                ((b"retry-after", retry.encode()),),
            )
        body, size = await self._read(receive)
        if body is None:
            if size is not None:  # None: the client went away
                await _answer(send, 413, f"request body over the {self._mb} limit")
            return
        kind = dict(scope.get("headers") or []).get(b"content-type", b"")
        if kind.startswith(b"multipart/form-data") and (
            problem := await self._too_many_pixels(scope, body)
        ):
            return await _answer(send, 413, problem)
        if not login:
            return await self.app(scope, _replay(body, receive), send)
        self.logins.attempt(client)
        status = 0

        async def watch(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, _replay(body, receive), watch)
        if 200 <= status < 300:
            self.logins.succeeded(client)

    @property
    def _mb(self) -> str:
        return f"{self.max_bytes / 2**20:g} MB"

    async def _read(self, receive: Receive) -> tuple[bytes | None, int | None]:
        """(the body, its size); (None, size) when over the limit, (None, None) on disconnect."""
        chunks, size, more = [], 0, True
        while more and size <= _DRAIN_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_bytes:
                chunks.append(chunk)
            more = message.get("more_body", False)
        return (b"".join(chunks) if size <= self.max_bytes else None), size

    async def _too_many_pixels(self, scope: Scope, body: bytes) -> str | None:
        """What is wrong with the first image in the multipart `body` that has too many pixels."""

        async def disconnected() -> MutableMapping[str, Any]:
            return {"type": "http.disconnect"}

        try:
            form = await Request(scope, _replay(body, disconnected)).form()
        except Exception:  # malformed multipart: the route itself answers it (400)
            return None
        try:
            for _, value in form.multi_items():
                if isinstance(value, UploadFile):
                    try:
                        check_pixels(value.file, self.max_pixels)
                    except ImageTooLarge as e:
                        return f"{value.filename}: {e}"
                    except ImageStoreError:  # not an image: only its size is limited
                        pass
        finally:
            await form.close()
        return None
