"""What every agent shares: the message layout and the structured call."""

from __future__ import annotations

from typing import TypeVar

from artloop.models.images import image_part
from artloop.models.structured import (
    CallPolicy,
    Structured,
    invoke_structured,
    schema_instructions,
)
from artloop.prompts import render
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from PIL import Image
from pydantic import BaseModel

T = TypeVar("T", bound=BaseModel)


def ask(
    model: BaseChatModel,
    *,
    agent: str,
    role: str,
    schema: type[T],
    image: Image.Image | None = None,
    policy: CallPolicy = CallPolicy(),
    **variables,
) -> Structured[T]:
    """Render prompts/<agent>.jinja, attach the image, and get a validated `schema` answer."""
    user_text = render(agent, **variables) + "\n\n" + schema_instructions(schema)
    content: list = [{"type": "text", "text": user_text}]
    if image is not None:
        content.insert(0, image_part(image, policy.image_max_side, policy.image_format))
    messages = [SystemMessage(content=render("system", role=role)), HumanMessage(content=content)]
    return invoke_structured(model, messages, schema, agent=agent, policy=policy)
