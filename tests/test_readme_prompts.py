"""The README's "What the agents are told" is what scripts/render_prompts.py renders today: a
changed template or schema that is not re-pasted into the README fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_shows_the_prompts_the_agents_get():
    spec = importlib.util.spec_from_file_location(
        "render_prompts", ROOT / "scripts/render_prompts.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.render_all().replace("### ", "#### ")
    assert rendered in (ROOT / "README.md").read_text(encoding="utf-8"), (
        "README.md's prompts are stale: paste `scripts/render_prompts.py` output (### -> ####)"
    )
