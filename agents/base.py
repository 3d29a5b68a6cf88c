"""What every agent shares: the message layout and the structured call.

The layout is the same for every agent, so that the calls of one iteration share a long prefix
(a server's prefix cache, or the in-process model, prefills it once):

1. one system message, the same text for every agent: what artloop is, the box convention, the
   statistics' scales, the scoring rubric, the aesthetics checklist and the artifact taxonomy;
2. the user message: the image first (the validator: BEFORE, then AFTER), then the role's
   instructions (prompts/<agent>.jinja), then how to answer.

How to answer: where the backend constrains decoding to the schema, a field guide written from
the schema's field descriptions (the grammar enforces the shape; the model still needs to know
what each field means); elsewhere the JSON schema itself, descriptions included.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any, TypeVar

from artloop.agents.schemas import BOX_HELP
from artloop.models.families import GRID, BoxFrame
from artloop.models.images import fit_image, image_part
from artloop.models.structured import (
    CallPolicy,
    Structured,
    box_schema,
    enforces_schema,
    invoke_structured,
    json_schema,
    schema_instructions,
)
from artloop.prompts import aesthetics_checklist, artifact_taxonomy, examples, render
from artloop.tools.image_facts import read_stat, stat_table
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from PIL import Image
from pydantic import BaseModel

T = TypeVar("T", bound=BaseModel)

BOXES = (
    f"{BOX_HELP}: x from the left edge, y from the top edge, 1000 = the full width or height. "
    "[0, 0, 1000, 1000] is the whole picture; [0, 500, 500, 1000] its bottom-left quarter."
)


def boxes_text(frame: BoxFrame = GRID) -> str:
    """The box convention in the system message: artloop's grid, or (a pixel family) pixels of
    the picture as the model sees it, whose size the user message gives (`size_line`)."""
    if not frame.pixels:
        return BOXES
    return (
        "[x1, y1, x2, y2] in absolute pixels of the picture as you see it (its size is given "
        "with the task): x from the left edge, y from the top edge."
    )


def size_line(frame: BoxFrame) -> str:
    """For a pixel family: the picture's size as the model sees it (boxes are within it)."""
    w, h = frame.bounds()
    return f"The picture is {w} x {h} pixels: [0, 0, {w}, {h}] is the whole picture."


def system_text(policy: CallPolicy = CallPolicy(), frame: BoxFrame = GRID) -> str:
    """The system message every agent call starts with (the same for all of them, given the
    model's family)."""
    return _system(policy.templates.get("system"), boxes_text(frame))


@cache
def _system(path: str | None, boxes: str) -> str:
    return render(
        "system",
        path,
        boxes=boxes,
        stats=stat_table(),
        checklist=aesthetics_checklist(),
        taxonomy=artifact_taxonomy(),
    )


def stat_lines(stats: dict[str, float]) -> list[str]:
    """Measured statistics as prompt lines: "brightness 0.421 (normal)"."""
    return [f"{name} {read_stat(name, value)}" for name, value in stats.items()]


def messages_for(
    agent: str,
    answer: str,
    images: Sequence[Image.Image],
    policy: CallPolicy = CallPolicy(),
    frame: BoxFrame = GRID,
    **variables: Any,
) -> list[BaseMessage]:
    """The agent's messages: the common system message, then the images, then its
    instructions and `answer` (how to answer). Boxes in `variables` (pydantic models) are
    written in `frame`'s convention."""
    variables = {
        k: v.model_dump(mode="json", context={"box_frame": frame})
        if isinstance(v, BaseModel)
        else v
        for k, v in variables.items()
    }
    if frame.pixels:
        answer = size_line(frame) + ("\n" + answer if answer else "")
    example = examples().get(agent)
    if frame.pixels:  # the worked examples' boxes are on the grid
        example = _boxes_in(example, frame)
    instructions = render(agent, policy.templates.get(agent), example=example, **variables)
    text = instructions + ("\n\n" + answer if answer else "")
    content: list = [image_part(im, policy.image_max_side, policy.image_format) for im in images]
    content.append({"type": "text", "text": text})
    return [SystemMessage(content=system_text(policy, frame)), HumanMessage(content=content)]


def ask(
    model: BaseChatModel,
    *,
    agent: str,
    schema: type[T],
    image: Image.Image | None = None,
    more_images: Sequence[Image.Image] = (),
    policy: CallPolicy = CallPolicy(),
    token_budget: int = 1,
    **variables: Any,
) -> Structured[T]:
    """Render prompts/<agent>.jinja in the common layout, attach `image` (then `more_images`),
    and get a validated `schema` answer (`token_budget`: in that many times the model's
    answer-token limit, for an answer that stands for several agents')."""
    images = ([image] if image is not None else []) + list(more_images)
    # Downscaled here, as sent: a pixel family's boxes are in the model's resize of this size.
    images = [fit_image(im, policy.image_max_side) for im in images]
    frame = policy.box_frame(*images[0].size) if images else GRID
    answer = answer_guide(schema, frame) if enforces_schema(model) else schema_instructions(schema)
    messages = messages_for(agent, answer, images, policy, frame, **variables)
    return invoke_structured(
        model,
        messages,
        schema,
        agent=agent,
        policy=policy,
        box_frame=frame,
        token_budget=token_budget,
    )


def _boxes_in(node: Any, frame: BoxFrame) -> Any:
    """A copy of `node` (JSON) with every "box" written in `frame`'s convention."""
    if isinstance(node, list):
        return [_boxes_in(v, frame) for v in node]
    if not isinstance(node, dict):
        return node
    return {
        k: frame.from_grid(v) if k == "box" and isinstance(v, list) else _boxes_in(v, frame)
        for k, v in node.items()
    }


# --- the field guide: the schema's descriptions as a list the model can follow ---------------
@cache
def answer_guide(schema: type[BaseModel], frame: BoxFrame = GRID) -> str:
    """How to answer, for a backend whose grammar already enforces `schema`: each field in
    order, its type and bounds in words (boxes in `frame`'s convention), and its description."""
    root = box_schema(json_schema(schema), frame)
    lines = ["Answer with one JSON object, its fields in this order:"]
    _fields(root, root.get("$defs", {}), lines, "")
    return "\n".join(lines)


def _fields(node: dict, defs: dict, lines: list[str], indent: str) -> None:
    props = node.get("properties", {})
    refs = {p.get("$ref") for p in props.values()}
    if len(props) > 2 and len(refs) == 1 and None not in refs:  # one entry per key, one shape
        keys = ", ".join(f'"{k}"' for k in props)
        lines.append(f"{indent}- one entry for each of {keys}, each an object:")
        _fields(_deref(next(iter(props.values())), defs), defs, lines, indent + "  ")
        return
    for name, sub in props.items():
        kind, nested = _kind(sub, defs)
        about = sub.get("description") or _deref(sub, defs).get("description", "")
        lines.append(f'{indent}- "{name}": {kind}' + (f". {about}" if about else ""))
        if nested is not None:
            _fields(nested, defs, lines, indent + "  ")


def _deref(node: dict, defs: dict) -> dict:
    if "$ref" in node:
        return defs[node["$ref"].rsplit("/", 1)[-1]]
    return node


def _kind(node: dict, defs: dict) -> tuple[str, dict | None]:
    """A field's type in words, and the object whose fields follow (if it is one)."""
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        kind, nested = _kind(
            {**options[0], **{k: v for k, v in node.items() if k != "anyOf"}}, defs
        )
        return f"{kind}, or null", nested
    node = {**_deref(node, defs), **{k: v for k, v in node.items() if k != "$ref"}}
    if "const" in node:  # a one-value Literal (VQA's QAPair.answer: always "yes")
        return f'exactly "{node["const"]}"', None
    if "enum" in node:
        values = node["enum"]
        if len(values) > 4:
            return "an id", None
        return "one of " + ", ".join(f'"{v}"' for v in values), None
    match node.get("type"):
        case "string":
            least = " (not empty)" if node.get("minLength", 0) > 0 else ""
            return f"text{least}, at most {node['maxLength']} characters", None
        case "integer":
            return f"a whole number from {node['minimum']} to {node['maximum']}", None
        case "number":
            step = f" in steps of {node['multipleOf']:g}" if "multipleOf" in node else ""
            return f"a number from {node['minimum']:g} to {node['maximum']:g}{step}", None
        case "boolean":
            return "true or false", None
        case "array" if "prefixItems" in node:  # a box in pixels (models.structured.box_schema)
            w, h = (node["prefixItems"][i]["maximum"] for i in (0, 1))
            return f"a list of 4 whole numbers, x from 0 to {w}, y from 0 to {h}", None
        case "array":
            item, nested = _kind(node["items"], defs)
            lo, hi = node.get("minItems", 0), node["maxItems"]
            count = f"exactly {hi}" if lo == hi else f"{lo} to {hi}" if lo else f"up to {hi}"
            if nested is not None:
                return f"a list of {count} objects", nested
            return f"a list of {count} items, each {item}", None
        case "object":
            return "an object", node
    return "a value", None
