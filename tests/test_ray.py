"""Scale-out: batch collection with diffusion on a local Ray instance (loopback), two diffusion
actors: images equal the local tool's, errors come back as DiffusionError, sessions finish."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from artloop.graphs.batch import BatchItem, run_batch
from artloop.tools.diffusion import DiffusionError, GenParams
from conftest import make_ctx, verdict
from fakes import ScriptedChat

pytestmark = pytest.mark.ray  # a local Ray instance (and so slow)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(("ARTLOOP_", "HF_"))}
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=False,
    )
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
    remote.close()


def test_closing_removes_the_workers_scratch(ray_local, store):
    import ray
    from artloop.tools.ray_diffusion import RayDiffusion

    params = GenParams(width=64, height=64, num_inference_steps=1, seed=1)
    with RayDiffusion("tiny-sd", store.images, workers=1) as remote:
        remote.text_to_image("a red fox", "", params)
        scratch = Path(ray.get(remote._workers[0].scratch_dir.remote()))
        assert list(scratch.rglob("*.png"))  # the worker's copy of what it drew
    assert not scratch.exists()
    with pytest.raises(DiffusionError, match="closed"):
        remote.text_to_image("a red fox", "", params)
    remote.close()  # again: nothing left to do


DRIVER = """
import os, sys
from pathlib import Path
import ray
from artloop.tools.diffusion import GenParams
from artloop.tools.images import ImageStore
from artloop.tools.ray_diffusion import RayDiffusion

scratch_root, store = sys.argv[1:]
env = {k: v for k, v in os.environ.items() if k.startswith(("ARTLOOP_", "HF_"))}
ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
         runtime_env={"env_vars": {**env, "TMPDIR": scratch_root}}, log_to_driver=False)
remote = RayDiffusion("tiny-sd", ImageStore(store), workers=1)
remote.text_to_image("a red fox", "", GenParams(width=64, height=64, num_inference_steps=1))
print(len(list(Path(scratch_root).glob("artloop-worker-*/**/*.png"))))
"""  # then it exits without close(), as `artloop batch --ray-address` does


def test_a_driver_that_exits_leaves_no_scratch(tmp_path):
    """A separate driver process (its own local Ray): the actor's scratch, made under the TMPDIR
    its runtime_env sets, is gone once the driver has exited."""
    scratch_root = tmp_path / "worker-tmp"
    scratch_root.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, str(scratch_root), str(tmp_path / "img")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "1"  # the worker held its image while the driver ran
    assert list(scratch_root.glob("artloop-worker-*")) == []  # (torch may leave its own dirs)
