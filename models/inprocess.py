"""In-process chat model: Qwen2-VL under transformers, with JSON-schema-constrained decoding.

The embedded default: no server needed. Bind a schema with `.bind(json_schema=schema)`; decoding
is then constrained by an xgrammar grammar compiled from that schema, so the output parses.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from artloop.models.images import from_data_url
from artloop.tools.accounting import charge
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr


def to_qwen_messages(messages: list[BaseMessage]) -> tuple[list[dict], list]:
    """LangChain messages -> (Qwen chat-template messages, images in order of appearance)."""
    roles = {"system": "system", "human": "user", "ai": "assistant"}
    out, images = [], []
    for m in messages:
        role = roles.get(m.type)
        if role is None:
            raise ValueError(f"unsupported message type for Qwen2-VL: {m.type}")
        if isinstance(m.content, str):
            out.append({"role": role, "content": m.content})
            continue
        parts = []
        for part in m.content:
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif part.get("type") == "image_url":
                url = (
                    part["image_url"]["url"]
                    if isinstance(part["image_url"], dict)
                    else part["image_url"]
                )
                images.append(from_data_url(url))
                parts.append({"type": "image"})
            elif part.get("type") == "image" and "base64" in part:
                mime = part.get("mime_type", "image/png")
                images.append(from_data_url(f"data:{mime};base64,{part['base64']}"))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"unsupported content part: {part.get('type')!r}")
        out.append({"role": role, "content": parts})
    return out, images


class ChatQwen2VLLocal(BaseChatModel):
    """Qwen2-VL run in this process. `model` is a tiny name, a local directory or a hub id."""

    model: str = "tiny-qwen2vl"
    max_new_tokens: int = 512
    temperature: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    # (model, processor, grammar compiler, ids of tokens with control bytes)
    _loaded: tuple | None = PrivateAttr(default=None)
    _grammars: dict = PrivateAttr(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return "artloop-qwen2vl-local"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "temperature": self.temperature}

    def setup(self) -> tuple:
        """Load weights, processor and grammar compiler on first use (not at construction)."""
        if self._loaded is None:
            import torch
            import xgrammar as xgr
            from artloop.models.tiny import resolve_model
            from artloop.models.tiny_vlm import load_processor
            from transformers import Qwen2VLForConditionalGeneration

            path = resolve_model(self.model)
            model = (
                Qwen2VLForConditionalGeneration.from_pretrained(
                    path, dtype=getattr(torch, self.dtype)
                )
                .to(self.device)
                .eval()
            )
            processor = load_processor(path)
            # The grammar must cover the model's whole output row, padding included.
            info = xgr.TokenizerInfo.from_huggingface(
                processor.tokenizer, vocab_size=model.config.text_config.vocab_size
            )
            tok = processor.tokenizer
            control = [i for i in range(len(tok)) if any(ord(c) < 0x20 for c in tok.decode([i]))]
            self._loaded = (model, processor, xgr.GrammarCompiler(info), torch.tensor(control))
        return self._loaded

    def _grammar(self, schema: dict):
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            compiler = self.setup()[2]
            self._grammars[key] = compiler.compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        json_schema: dict | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        import torch
        import xgrammar.contrib.hf

        model, processor, _, control_ids = self.setup()
        chat, images = to_qwen_messages(messages)
        text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=images or None, return_tensors="pt").to(self.device)
        gen: dict[str, Any] = {"max_new_tokens": kwargs.get("max_new_tokens", self.max_new_tokens)}
        temperature = kwargs.get("temperature", self.temperature)
        gen.update(
            {"do_sample": True, "temperature": temperature}
            if temperature > 0
            else {"do_sample": False}
        )
        if json_schema is not None:
            # A new processor per generate(): it carries the grammar's matcher state.
            gen["logits_processor"] = [
                xgrammar.contrib.hf.LogitsProcessor(self._grammar(json_schema)),
                # xgrammar 0.2.8 lets raw control characters into maxLength-bounded strings,
                # which breaks JSON parsing; JSON output never needs them, so mask them.
                _BanTokens(control_ids),
            ]
        start = time.perf_counter()
        with self._lock, torch.inference_mode():  # one generate at a time on this model
            charge("vlm_wait", time.perf_counter() - start)  # concurrent sessions queue here
            out = model.generate(**inputs, **gen)
        new = out[0, inputs["input_ids"].shape[1] :]
        content = processor.tokenizer.decode(new, skip_special_tokens=True)
        finished = bool(new.numel()) and int(new[-1]) in _eos_ids(model)
        meta = {"prompt_tokens": int(inputs["input_ids"].shape[1]), "completion_tokens": int(new.numel()),
                "finish_reason": "stop" if finished else "length"}  # fmt: skip
        msg = AIMessage(content=content, response_metadata={"model_name": self.model, **meta})
        return ChatResult(generations=[ChatGeneration(message=msg)])


class _BanTokens:
    """A logits processor that forbids a fixed set of token ids."""

    def __init__(self, ids) -> None:
        self.ids = ids

    def __call__(self, input_ids, scores):  # scores: (B, vocab)
        scores[:, self.ids[self.ids < scores.shape[-1]]] = float("-inf")
        return scores


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])
