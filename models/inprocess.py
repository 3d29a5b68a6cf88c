"""In-process chat model: Qwen2-VL, Qwen2.5-VL or Qwen3-VL under transformers, with
JSON-schema-constrained decoding (the family's class, by the checkpoint's model_type).

The embedded default: no server needed. Bind a schema with `.bind(json_schema=schema)`; decoding
is then constrained by an xgrammar grammar compiled from that schema, so the output parses.
Concurrent calls (sessions in threads) are batched: their prompts are prefilled row by row, then
one left-padded `generate` decodes them all, each row under its own grammar (models/prefill.py).
"""

from __future__ import annotations

# Deliberately lazy: torch, transformers and xgrammar are imported inside the functions that use
# them, so that importing this module (the CLI's --help, the config, a test) does not load them.
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from artloop.models.families import get_family
from artloop.models.images import from_data_url
from artloop.models.tiny import resolve_model
from artloop.models.tiny.vlm import load_processor, model_family
from artloop.runtime.batching import Batcher, Job
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

    # Calls waiting when the model is free, or arriving within this window of the first, share
    # one generate (at most max_batch rows).
    batch_window_ms: float = 0.0
    max_batch: int = 16
    # Prompt prefixes reused across calls (models/prefill.py): the last rows' KV caches, at most
    # this many and this many tokens in all (0 entries: every prompt prefilled in full).
    prefix_cache_entries: int = 8
    prefix_cache_tokens: int = 32768

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _batch: Batcher | None = PrivateAttr(default=None)
    # (model, processor, grammar compiler, ids of tokens with control bytes)
    _loaded: tuple | None = PrivateAttr(default=None)
    _grammars: dict = PrivateAttr(default_factory=dict)
    _prefixes: Any = PrivateAttr(default=None)  # PrefixCache, made on the batcher's thread

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
            import transformers
            import xgrammar as xgr

            path = resolve_model(self.model)
            # The family's own class (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), by config.json's model_type.
            model_class = getattr(transformers, get_family(model_family(path)).model_class)
            model = (
                model_class.from_pretrained(
                    path, dtype=getattr(torch, self.dtype), use_safetensors=True
                )
                .to(self.device)
                .eval()
            )
            processor = load_processor(path)
            processor.tokenizer.padding_side = "left"  # batched rows end where generation starts
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
            floats = _floats(schema)
            self._grammars[key] = (
                compiler.compile_grammar(short_floats(schema, floats))
                if floats
                # The schema as written, not the sorted key: xgrammar emits properties in the
                # order it reads them, and that order (reasons before verdicts) is the schema's.
                else compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            )
        return self._grammars[key]

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        json_schema: dict | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chat, images = to_qwen_messages(messages)
        max_new = int(kwargs.get("max_new_tokens", self.max_new_tokens))
        temperature = float(kwargs.get("temperature", self.temperature))
        # Concurrent calls (sessions in threads) that agree in these run as one padded generate.
        key = (json_schema is not None, max_new, temperature)
        content, meta = self._batcher().submit(key, _Request(chat, images, json_schema))
        usage = meta["token_usage"]
        msg = AIMessage(
            content=content,
            response_metadata={"model_name": self.model, **meta},
            usage_metadata={
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
                "input_token_details": {
                    "cache_read": usage["prompt_tokens_details"]["cached_tokens"]
                },
            },
        )
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def choice_logprobs(
        self, messages: list[BaseMessage], choices: Sequence[str]
    ) -> dict[str, float]:
        """The log-probability of each choice (its first token) as the first token of the
        assistant's answer to `messages`: one forward pass over the prompt, no decoding. Runs
        on the batcher's worker, like generate (the model is never used from two threads)."""
        chat, images = to_qwen_messages(messages)
        return self._batcher().submit(("logprobs", tuple(choices)), _Request(chat, images, None))

    def set_batching(self, window_ms: float) -> None:
        """Gather concurrent calls this long into one generate (0: only those already waiting)."""
        self.batch_window_ms = window_ms
        if self._batch is not None:
            self._batch.window_s = window_ms / 1000

    def close(self) -> None:
        """Stop the batcher's worker thread (calls already queued still run); a later call
        starts a new one."""
        with self._lock:
            batch, self._batch = self._batch, None
        if batch is not None:
            batch.close()

    def _batcher(self) -> Batcher:
        with self._lock:
            if self._batch is None:
                self._batch = Batcher(
                    self._run_batch, self.batch_window_ms / 1000, self.max_batch, "vlm_wait"
                )
            return self._batch

    def _run_batch(self, jobs: list[Job]) -> list[tuple[str, dict]]:
        """Every job's conversation prefilled alone, then decoded in one left-padded generate,
        each row under its own grammar; (text, token counts, finish reason) per job."""
        import torch
        from artloop.models.prefill import prefill_rows

        if jobs[0].key[0] == "logprobs":
            return self._choice_rows(jobs)
        model, processor, _, control_ids = self.setup()
        requests: list[_Request] = [job.payload for job in jobs]
        _, max_new, temperature = jobs[0].key
        rows = [
            (
                processor.apply_chat_template(r.chat, tokenize=False, add_generation_prompt=True),
                r.images,
            )
            for r in requests
        ]
        # input_ids: (B, T), padded on the left; all but the last column already in the cache.
        inputs, cached = prefill_rows(model, processor, rows, self.device, self._cache())
        gen: dict[str, Any] = {"max_new_tokens": max_new}
        gen.update(
            {"do_sample": True, "temperature": temperature}
            if temperature > 0
            else {"do_sample": False}
        )
        if requests[0].schema is not None:
            # A new processor per generate(): it carries each row's matcher state.
            grammars = [self._grammar(r.schema) for r in requests]
            gen["logits_processor"] = [_GrammarRows(grammars, control_ids)]
        # Last: it records the distribution the grammar left (models/structured.py's logprobs).
        logprobs = _TokenLogProbs()
        gen["logits_processor"] = [*gen.get("logits_processor", []), logprobs]
        with torch.inference_mode():
            out = model.generate(**inputs, **gen)  # (B, T + new)
        new = out[:, inputs["input_ids"].shape[1] :]
        chosen = logprobs.finish(new)  # (B, new)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        eos = _eos_ids(model)
        return [
            _finish(processor.tokenizer, row, lp, n, c, eos)
            for row, lp, n, c in zip(new, chosen, prompt_tokens, cached, strict=True)
        ]

    def _cache(self):
        """The prompt prefix cache (made on first use, on the batcher's thread, its only user)."""
        from artloop.models.prefill import PrefixCache

        if self._prefixes is None:
            self._prefixes = PrefixCache(self.prefix_cache_entries, self.prefix_cache_tokens)
        return self._prefixes

    def _choice_rows(self, jobs: list[Job]) -> list[dict[str, float]]:
        """choice_logprobs' batch: each row's prompt alone (unpadded, as prefill_rows does, and
        reusing a cached prefix: a VQA score asks many questions about one image), the
        next-token log-softmax at its last position, read at each choice's first token."""
        import torch
        from artloop.models.prefill import next_token_logits

        model, processor, _, _ = self.setup()
        choices = jobs[0].key[1]
        tok = processor.tokenizer
        ids = [tok.encode(c, add_special_tokens=False)[0] for c in choices]
        out = []
        for job in jobs:
            r: _Request = job.payload
            text = processor.apply_chat_template(r.chat, tokenize=False, add_generation_prompt=True)
            inputs = processor(text=[text], images=r.images or None, return_tensors="pt")
            logits, _ = next_token_logits(model, inputs.to(self.device), r.images, self._cache())
            logp = torch.log_softmax(logits.float(), dim=-1)
            out.append({c: float(logp[i]) for c, i in zip(choices, ids, strict=True)})
        return out


def _floats(node: Any) -> set[float]:
    """Every float of the schema's enums (the number grids of grammar_schema)."""
    if isinstance(node, list):
        return set().union(*(_floats(v) for v in node)) if node else set()
    if not isinstance(node, dict):
        return set()
    found = {v for v in node.get("enum", []) if isinstance(v, float)}
    return found.union(*(_floats(v) for k, v in node.items() if k != "enum"))


def short_floats(schema: dict, floats: set[float] | None = None):
    """The schema's xgrammar grammar, its enum floats spelt as JSON writes them. xgrammar spells
    an enum's float with 17 significant digits (0.9 as "0.90000000000000002", 10.0 as "10"), so
    a model under it could not write 0.9 and must spell 17 digits for every strength and score.
    `floats`: the schema's enum floats, when the caller has found them already."""
    import xgrammar as xgr

    text = str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
    for v in _floats(schema) if floats is None else floats:
        text = text.replace(f'("{v:.17g}")', f'("{json.dumps(v)}")')
    return xgr.Grammar.from_ebnf(text)


@dataclass
class _Request:
    chat: list[dict]
    images: list
    schema: dict | None


def _finish(
    tokenizer, row, logprobs, prompt_tokens: int, cached: int, eos: set[int]
) -> tuple[str, dict]:
    """A generated row (padded past its end once the row stopped) and its tokens'
    log-probabilities -> text and metadata: token counts (`cached_tokens`: prompt tokens whose
    prefill was reused) and logprobs in the OpenAI API's shapes, and the finish reason."""
    ids = row.tolist()
    stop = next((i for i, t in enumerate(ids) if t in eos), None)
    ids = ids if stop is None else ids[: stop + 1]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    meta = {
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": len(ids),
        "cached_tokens": int(cached),
        "token_usage": {
            "prompt_tokens": int(prompt_tokens),
            "completion_tokens": len(ids),
            "total_tokens": int(prompt_tokens) + len(ids),
            "prompt_tokens_details": {"cached_tokens": int(cached)},
        },
        "logprobs": {
            "content": [
                {"token": t, "logprob": float(lp)}
                for t, lp in zip(tokens, logprobs[: len(ids)].tolist(), strict=True)
            ]
        },
        "finish_reason": "length" if stop is None else "stop",
    }
    return tokenizer.decode(ids, skip_special_tokens=True), meta


class _TokenLogProbs:
    """A logits processor that changes nothing and records, for each generated token, its
    log-probability under the scores it sees. Placed after the grammar's mask (and after
    generate's own processors), before temperature (a warper, which generate runs after the
    processors given): the distribution the grammar left, as vLLM's default logprobs
    (raw_logprobs: after the structured-output bitmask, before temperature)."""

    def __init__(self) -> None:
        self.last = None  # (B, vocab): the last step's log-softmax
        self.chosen: list = []  # (B,) a step

    def __call__(self, input_ids, scores):  # input_ids: (B, T), scores: (B, vocab)
        import torch

        if self.last is not None:  # the token chosen from the last step's distribution
            self.chosen.append(self.last.gather(1, input_ids[:, -1:])[:, 0])
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, new):
        """(B, n) log-probabilities of the n generated tokens `new` (B, n)."""
        import torch

        if self.last is not None and len(self.chosen) < new.shape[1]:
            self.chosen.append(self.last.gather(1, new[:, -1:])[:, 0])
        self.last = None
        if not self.chosen:
            return torch.zeros(new.shape, dtype=torch.float32)
        return torch.stack(self.chosen, dim=1)


class _GrammarRows:
    """A logits processor: each row of a batched generate follows its own grammar (xgrammar's
    matchers, filled in parallel), and tokens holding control characters are banned."""

    def __init__(self, grammars: list, banned) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.matchers = [xgr.GrammarMatcher(g) for g in grammars]
        self.filler = xgr.BatchGrammarMatcher()
        vocab = grammars[0].tokenizer_info.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab)  # (B, ceil(vocab/32))
        # xgrammar 0.2.8 lets raw control characters into maxLength-bounded strings, which
        # breaks JSON parsing; JSON output never needs them. (The grammar's vocabulary is the
        # model's, so the ids past it, added tokens only, can be dropped once here.)
        self.banned = banned[banned < vocab]
        self.started = False

    def __call__(self, input_ids, scores):  # input_ids: (B, T), scores: (B, vocab)
        if self.started:  # the tokens chosen last step
            live = [i for i, m in enumerate(self.matchers) if not m.is_terminated()]
            tokens = input_ids[live, -1].tolist()
            accepted = self.xgr.BatchGrammarMatcher.batch_accept_token(
                [self.matchers[i] for i in live], tokens
            )
            assert all(accepted), "a token outside the grammar was chosen"
        self.started = True
        # A finished row is padded by generate whatever it scores; its mask stays as it was.
        live = [i for i, m in enumerate(self.matchers) if not m.is_terminated()]
        if live:
            self.filler.batch_fill_next_token_bitmask(
                [self.matchers[i] for i in live], self.bitmask, indices=live
            )
            self.xgr.apply_token_bitmask_inplace(scores, self.bitmask, indices=live)
        scores[:, self.banned] = float("-inf")
        return scores


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])
