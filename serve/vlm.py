"""Launch and health-check a vLLM server for Qwen2-VL (OpenAI-compatible API).

vLLM lives in its own environment (its pins clash with the project's), so it is started as a
program: `ServeConfig.vllm` names the executable. The server binds 127.0.0.1 unless told
otherwise; its log goes to a file whose last lines are shown when it fails to start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from artloop.config import ServeConfig
from artloop.models.tiny import resolve_model


class ServerError(RuntimeError):
    """The server did not start (or died); the message holds its last log lines."""


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def tiny_cpu_config(vllm: str, port: int, model: str = "tiny-qwen2vl", **overrides) -> ServeConfig:
    """A tiny VLM (the Qwen2-VL unless `model` names another) on vLLM's CPU build, as the tests
    and benchmarks start it: float32, an 8192-token context, eager (no graph capture on CPU).
    8192: the agents' prompts are 2.5k-3.6k tokens in the tiny byte-level BPE, and a repair
    resends the answer with them (the tiny VLMs hold 16384 positions)."""
    defaults = {"dtype": "float32", "max_model_len": 8192, "enforce_eager": True}
    return ServeConfig(model=model, vllm=vllm, port=port, **{**defaults, **overrides})


def vllm_command(cfg: ServeConfig, model_path: str) -> list[str]:
    """The `vllm serve` command line for this config (the API key travels in the environment,
    not on the command line, where `ps` would show it)."""
    if cfg.host not in LOOPBACK and cfg.api_key is None:
        raise ServerError(
            f"binding to {cfg.host} exposes the server: set serve.api_key "
            f"(ARTLOOP_SERVE__API_KEY) or bind 127.0.0.1"
        )
    exe = shutil.which(cfg.vllm) or cfg.vllm
    if not Path(exe).is_file():
        raise ServerError(f"vllm executable not found: {cfg.vllm!r} (set serve.vllm or PATH)")
    cmd = [
        exe,
        "serve",
        model_path,
        "--served-model-name",
        cfg.served_model_name or cfg.model,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--dtype",
        cfg.dtype,
        "--max-model-len",
        str(cfg.max_model_len),
        "--tensor-parallel-size",
        str(cfg.tensor_parallel_size),
        "--limit-mm-per-prompt",
        json.dumps({"image": cfg.max_images_per_prompt, "video": 0}),
        "--structured-outputs-config",
        json.dumps(
            {
                "backend": cfg.structured_outputs_backend,
                "disable_any_whitespace": cfg.compact_json,
            }
        ),
    ]
    if cfg.max_image_pixels:
        cmd += ["--mm-processor-kwargs", json.dumps({"max_pixels": cfg.max_image_pixels})]
    if cfg.enforce_eager:
        cmd.append("--enforce-eager")
    # The agents' calls share a prefix (the system message, the image): cache it (on by default
    # in vLLM's V1 engine; said here), and say in each answer how much was read from the cache
    # (usage.prompt_tokens_details.cached_tokens, kept in the step's agent_usage).
    cmd += ["--enable-prefix-caching", "--enable-prompt-tokens-details"]
    return cmd + list(cfg.extra_args)


def temp_log() -> Path:
    """A new empty log file's path; the descriptor mkstemp opened is closed (start() opens it)."""
    fd, path = tempfile.mkstemp(prefix="artloop-vllm-", suffix=".log")
    os.close(fd)
    return Path(path)


class VLMServer:
    """A vLLM server process: `start()` returns once /health answers; `stop()` ends it."""

    def __init__(self, cfg: ServeConfig, log_path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.log_path = Path(log_path) if log_path else temp_log()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::") else self.cfg.host
        return f"http://{host}:{self.cfg.port}/v1"

    def wait(self) -> int:
        """Block until the server process ends; its exit status."""
        assert self.process is not None, "not started"
        return self.process.wait()

    def healthy(self, timeout_s: float = 2.0) -> bool:
        url = self.base_url.removesuffix("/v1") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> VLMServer:
        if self.healthy():
            raise ServerError(f"something already answers on {self.base_url}; choose another port")
        cmd = vllm_command(self.cfg, resolve_model(self.cfg.model))
        env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", **self.cfg.env}
        if self.cfg.api_key is not None:
            env["VLLM_API_KEY"] = self.cfg.api_key.get_secret_value()
        log = self.log_path.open("ab")
        # Its own process group: stop() signals vLLM and every worker it started.
        self.process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while not self.healthy():
            if self.process.poll() is not None:
                raise ServerError(
                    f"vLLM exited with status {self.process.returncode} before it "
                    f"was healthy; last log lines:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"vLLM was not healthy after {self.cfg.startup_timeout_s:.0f}s; "
                    f"last log lines:\n{self.tail()}"
                )
            time.sleep(1.0)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGINT (vLLM's clean shutdown), then SIGKILL if it does not end in time."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def kill(self) -> None:
        """Kill at once (for fault tests: a server that dies mid-run)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def tail(self, lines: int = 30) -> str:
        try:
            with self.log_path.open(errors="replace") as f:
                return "".join(deque(f, maxlen=lines)).rstrip()
        except OSError:
            return "(no log)"

    def __enter__(self) -> VLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
