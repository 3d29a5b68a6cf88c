"""The vLLM launcher's command line and its refusals (no vLLM needed)."""

from __future__ import annotations

import json

import pytest
from artloop.config import ServeConfig
from artloop.serve.vlm import ServerError, VLMServer, vllm_command
from pydantic import SecretStr


@pytest.fixture
def fake_exe(tmp_path):
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return str(exe)


def test_command_line_from_config(fake_exe):
    cfg = ServeConfig(
        model="Qwen/Qwen2-VL-72B-Instruct",
        port=8123,
        tensor_parallel_size=4,
        max_image_pixels=1_003_520,
        enforce_eager=True,
        vllm=fake_exe,
        extra_args=["--gpu-memory-utilization", "0.9"],
    )
    cmd = vllm_command(cfg, "/models/qwen72b")
    assert cmd[:3] == [fake_exe, "serve", "/models/qwen72b"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert flags["--served-model-name"] == "Qwen/Qwen2-VL-72B-Instruct"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert flags["--tensor-parallel-size"] == "4"
    assert json.loads(flags["--limit-mm-per-prompt"]) == {"image": 2, "video": 0}  # validator
    assert json.loads(flags["--structured-outputs-config"]) == {
        "backend": "guidance",
        "disable_any_whitespace": True,
    }
    assert json.loads(flags["--mm-processor-kwargs"]) == {"max_pixels": 1_003_520}
    assert "--enforce-eager" in cmd and cmd[-2:] == ["--gpu-memory-utilization", "0.9"]
    # The shared prompt prefix cached, the cached tokens reported with each answer.
    assert {"--enable-prefix-caching", "--enable-prompt-tokens-details"} <= set(cmd)


def test_missing_executable_is_named():
    with pytest.raises(ServerError, match="vllm executable not found: '/no/vllm'"):
        vllm_command(ServeConfig(vllm="/no/vllm"), "m")


def test_non_loopback_bind_needs_a_key(fake_exe):
    with pytest.raises(ServerError, match="binding to 0.0.0.0 exposes the server"):
        vllm_command(ServeConfig(host="0.0.0.0", vllm=fake_exe), "m")
    cmd = vllm_command(ServeConfig(host="0.0.0.0", vllm=fake_exe, api_key=SecretStr("k")), "m")
    assert "k" not in cmd  # the key goes through the environment, not the visible command line


def test_a_server_that_dies_at_start_shows_its_log(tmp_path):
    """A stand-in that fails like a broken install: the error carries its last log lines."""
    exe = tmp_path / "vllm"
    exe.write_text(
        "#!/bin/sh\necho 'loading model'\necho 'ImportError: libcudart.so.13' >&2\nexit 3\n"
    )
    exe.chmod(0o755)
    server = VLMServer(ServeConfig(model=str(tmp_path), vllm=str(exe), port=1), tmp_path / "log")
    with pytest.raises(ServerError, match=r"(?s)exited with status 3.*loading model.*libcudart"):
        server.start()


def test_a_server_object_leaves_no_descriptor_open(fake_exe):
    """Its temporary log file is created closed: a launcher that makes many leaks nothing."""
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    servers = [VLMServer(ServeConfig(vllm=fake_exe)) for _ in range(20)]
    assert open_fds() == before
    assert len({s.log_path for s in servers}) == 20 and all(s.log_path.exists() for s in servers)
    for s in servers:
        s.log_path.unlink()
