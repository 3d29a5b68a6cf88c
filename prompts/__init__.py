"""Prompt templates and checklists, package data loaded by name.

Templates are Jinja with StrictUndefined: a variable the caller forgot fails loudly instead of
rendering as an empty string.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jinja2 import Environment, FunctionLoader, StrictUndefined

PROMPTS_VERSION = "2"  # bump when a template changes meaning; stored with every trajectory


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


def render(name: str, **variables: Any) -> str:
    """Render prompts/<name>.jinja with the given variables."""
    return _env.get_template(f"{name}.jinja").render(**variables).strip()


@cache
def load_data(name: str) -> Any:
    """Load prompts/<name>.json (the artifact taxonomy, the aesthetics checklist)."""
    return json.loads(_source(f"{name}.json"))


def artifact_taxonomy() -> list[dict[str, str]]:
    """SynArtifact's 13 artifact classes: id, group, description."""
    return load_data("artifact_taxonomy")


def aesthetics_checklist() -> list[dict[str, str]]:
    """The aspects ArtAug's edits address: id and the question to ask of the image."""
    return load_data("aesthetics_checklist")
