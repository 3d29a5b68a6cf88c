"""The tiny models' cache: each builder's output under a hash of its config, built atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """Where tiny models are cached: $ARTLOOP_CACHE, else ~/.cache/artloop."""
    return Path(os.environ.get("ARTLOOP_CACHE", Path.home() / ".cache" / "artloop")) / "tiny"


# Trained tiny models shipped in the repository (package data), beside this module.
WEIGHTS = Path(__file__).parent / "weights"


def shipped(name: str, marker: str, command: str, setting: str) -> Path:
    """The shipped model `name` (weights/<name>/, recognised by its `marker` file); ValueError
    saying how to make one (`artloop models <command>`, then name it as `setting`) when this
    checkout lacks it."""
    path = WEIGHTS / name
    if not (path / marker).exists():
        raise ValueError(
            f"{name}'s weights are not in this checkout ({path}); train them with "
            f"`artloop models {command} --output-dir DIR` and name DIR as {setting}"
        )
    return path


def config_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def build_cached(name: str, config: dict, build: Callable[[dict, Path], None]) -> Path:
    """Return the cached directory for (name, config), building it atomically on first use."""
    target = cache_root() / f"{name}-{config_key(config)}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        build(config, tmp)
        (tmp / "artloop_tiny.json").write_text(json.dumps({"name": name, "config": config}))
        (tmp / ".complete").touch()
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
