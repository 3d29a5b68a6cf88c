"""A tiny random-weight Qwen2-VL (model + tokenizer + image-only processor), built offline.

Same classes as Qwen/Qwen2-VL-7B-Instruct, so the loading code that takes it takes the real
model. Head dim 32 (hidden 128, 4 heads) because vLLM's CPU attention wants it.
"""

from __future__ import annotations

# Deliberately lazy: transformers and tokenizers are imported inside the functions that use them, so
# that importing this module (the CLI's --help, the config, a test) does not load them.
import json
import sysconfig
from functools import cache
from pathlib import Path

from artloop.models.tiny.cache import build_cached

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL-Instruct's chat template (image and video parts become vision placeholders).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONFIG = {
    "vocab_size": 4096,  # BPE vocabulary before special tokens
    "text": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "vision": {"depth": 2, "embed_dim": 32, "num_heads": 2},
    # Image tokens per image are bounded: at most 16x16 patches of 14 px -> 64 merged tokens.
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 64,
    "seed": 0,
    "builder": 2,  # bump when the builder's output changes: the cache key is this dict's hash
}


def _corpus() -> list[str]:
    """Local text to train the tokenizer on: the standard library's own sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:120]
    return [f.read_text(encoding="utf-8", errors="ignore") for f in files]


@cache
def _image_only_processor_class():
    """Qwen2VLProcessor without the video slot: its video processor needs torchvision."""
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLProcessor

    class Qwen2VLImageProcessorOnly(Qwen2VLProcessor):
        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # ProcessorMixin accepts only the declared attributes; skip Qwen2VLProcessor's own
            # __init__ (it passes a video_processor positionally).
            self.image_token = "<|image_pad|>"
            self.video_token = "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            super(Qwen2VLProcessor, self).__init__(
                image_processor, tokenizer, chat_template=chat_template
            )

    try:
        AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageProcessorOnly, exist_ok=True)
    except TypeError:  # older signature without exist_ok
        AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageProcessorOnly)
    return Qwen2VLImageProcessorOnly


def _build(config: dict, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config["vocab_size"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown token
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer)

    text = config["text"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # M-RoPE splits half the head dim into (temporal, height, width) sections.
    q = head_dim // 2
    mrope = [q - 2 * (q * 3 // 8), q * 3 // 8, q * 3 // 8]
    model_config = Qwen2VLConfig(
        text_config={
            **text,
            "vocab_size": vocab,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={**config["vision"], "hidden_size": text["hidden_size"]},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(config["seed"])
    model = Qwen2VLForConditionalGeneration(model_config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=config["min_pixels"], max_pixels=config["max_pixels"]
    )
    processor = _image_only_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    # Name the stock class, as a real Qwen2-VL checkpoint does, so other loaders (vLLM) take it.
    cfg_path = out / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["processor_class"] = "Qwen2VLProcessor"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    # A real checkpoint also configures the video processor; vLLM's loader requires it.
    video = {**cfg["image_processor"], "video_processor_type": "Qwen2VLVideoProcessor"}
    video.pop("image_processor_type", None)
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


def build_tiny_qwen2vl() -> Path:
    """Build (once) and return the directory of the tiny Qwen2-VL."""
    return build_cached("tiny-qwen2vl", CONFIG, _build)


def load_processor(path: str):
    """Load a Qwen2-VL processor; works without torchvision (no video processor)."""
    from transformers import AutoProcessor

    cls = _image_only_processor_class()
    try:
        import torchvision  # noqa: F401
    except Exception:
        return cls.from_pretrained(path)
    return AutoProcessor.from_pretrained(path)
