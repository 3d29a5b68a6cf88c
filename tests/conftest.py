"""Shared fixtures: tiny models (built once per machine, cached), fresh homes, scripted chats."""

from __future__ import annotations

import os

import pytest

# Nothing may be fetched from a model hub, here or in CI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_chat():
    """The in-process tiny Qwen2-VL (greedy), loaded once for the session."""
    from artloop.models.inprocess import ChatQwen2VLLocal

    model = ChatQwen2VLLocal(model="tiny-qwen2vl")
    model.setup()
    return model


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def store(home):
    from artloop.tools.store import TrajectoryStore

    return TrajectoryStore(home)


@pytest.fixture(scope="session")
def _sd_pipeline_cache(tmp_path_factory):
    """One loaded tiny-SD tool per session; tests get it re-pointed at their own store."""
    from artloop.tools.diffusion import DiffusionTool
    from artloop.tools.images import ImageStore

    tool = DiffusionTool(model="tiny-sd", store=ImageStore(tmp_path_factory.mktemp("img")))
    tool.setup()
    return tool


@pytest.fixture
def sd_tool(_sd_pipeline_cache, store):
    _sd_pipeline_cache.store = store.images
    return _sd_pipeline_cache
