"""Scale-out: batch collection with diffusion on a local Ray instance (loopback), two diffusion
actors: images equal the local tool's, errors come back as DiffusionError, sessions finish."""

from __future__ import annotations

import asyncio
import os

import pytest
from artloop.graphs.batch import BatchItem, run_batch
from artloop.tools.diffusion import DiffusionError, GenParams
from conftest import make_ctx, verdict
from fakes import ScriptedChat


@pytest.fixture(scope="module")
def ray_local():
    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(("ARTLOOP_", "HF_"))}
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": env}, log_to_driver=False)  # fmt: skip
    yield ray
    ray.shutdown()


def test_sessions_on_ray_diffusion_workers(ray_local, store, sd_tool):
    from artloop.tools.ray_diffusion import RayDiffusion

    remote = RayDiffusion("tiny-sd", store.images, workers=2, batch_window_ms=100)
    params = GenParams(width=64, height=64, num_inference_steps=2, seed=5)
    # The same image as the local tool makes (content hash), whichever actor draws it.
    assert remote.text_to_image("a red fox", "", params) == sd_tool.text_to_image(
        "a red fox", "", params
    )
    assert remote.identity["ray_workers"] == 2 and remote.family == "sd"
    with pytest.raises(DiffusionError, match="outside 64-2048"):
        remote.text_to_image("a red fox", "", GenParams(width=10, height=64))

    chat = ScriptedChat(scripts={"Verdict": [verdict("accept", 9.0)]})
    ctx = make_ctx(store, sd_tool, chat, max_iters=1)
    ctx.diffusion = remote
    items = [BatchItem(prompt=f"a lighthouse, take {i}") for i in range(4)]
    result = asyncio.run(run_batch(ctx, items, name="ray", concurrency=4))
    assert (result.done, result.failed) == (4, 0), result.errors
    for run_id in result.run_ids:
        step = store.get_run(run_id)["steps"][0]
        assert step["image"] in store.images and step["edited_image"] in store.images
    assert len(remote.batch_sizes) >= 2  # both actors drew
