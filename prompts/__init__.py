"""Prompt templates and checklists, package data loaded by name.

Templates are Jinja with StrictUndefined: a variable the caller forgot fails loudly instead of
rendering as an empty string.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, FunctionLoader, StrictUndefined, Template, TemplateError

PROMPTS_VERSION = "3"  # bump when a template changes meaning; stored with every trajectory


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


_env = Environment(
    loader=FunctionLoader(_source),
    undefined=StrictUndefined,
    autoescape=False,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
)
_env.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False, separators=(", ", ": "))


def render(name: str, path: str | Path | None = None, **variables: Any) -> str:
    """Render prompts/<name>.jinja with the given variables, or the template file at `path` in
    its place (a per-agent override, `agents.templates` in the config)."""
    template = _env.get_template(f"{name}.jinja") if path is None else _override(str(path))
    try:
        return template.render(**variables).strip()
    except TemplateError as e:  # e.g. a variable the override uses that the agent never passes
        where = f"template {path}" if path is not None else f"prompts/{name}.jinja"
        raise ValueError(f"{where}: {e}") from None


@cache
def _override(path: str) -> Template:
    """A template file, compiled once per process (under the same rules as the packaged ones)."""
    try:
        return _env.from_string(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"template {path}: {e.strerror or e}") from None
    except TemplateError as e:
        raise ValueError(f"template {path}: {e}") from None


def template_names() -> list[str]:
    """The packaged templates' names (what `agents.templates` may override)."""
    return sorted(
        p.name.removesuffix(".jinja")
        for p in resources.files(__package__).iterdir()
        if p.name.endswith(".jinja")
    )


@cache
def examples() -> dict[str, dict]:
    """One worked example per agent that has one: agent -> {"for": what it is about, "answer"}.
    The merged critic's is the three critics' answers about the same cat picture, in one."""
    found = dict(load_data("examples"))
    parts = {"facts": "data_cot", "critique": "concept_cot", "plan": "thesis_cot"}
    found["critic"] = {
        "for": found["data_cot"]["for"],
        "answer": {part: found[agent]["answer"] for part, agent in parts.items()},
    }
    return found


@cache
def load_data(name: str) -> Any:
    """Load prompts/<name>.json (the artifact taxonomy, the aesthetics checklist)."""
    return json.loads(_source(f"{name}.json"))


def artifact_taxonomy() -> list[dict[str, str]]:
    """SynArtifact's 13 artifact classes: id, group, description."""
    return load_data("artifact_taxonomy")


def aesthetics_checklist() -> list[dict[str, Any]]:
    """The aspects ArtAug's edits address: id, the question to ask of the image, and the
    rubric's anchors (what a 3, 5, 7 and 9 look like)."""
    return load_data("aesthetics_checklist")
