"""Tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL (model + tokenizer + image-only
processor), built offline.

Same classes as the published Instruct checkpoints (Qwen/Qwen2-VL-7B-Instruct,
Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct), each with its family's special tokens,
chat template and image-processor settings (patch size, merge size, normalisation), so the loading
code that takes them takes the real models. Head dim 32 (hidden 128, 4 heads) because vLLM's CPU
attention wants it. What the families share (the BPE tokenizer, the image-only processor, the
saved layout that vLLM loads) is built once in `_build`; each family adds its model config.
"""

from __future__ import annotations

# Deliberately lazy: transformers and tokenizers are imported inside the functions that use them, so
# that importing this module (the CLI's --help, the config, a test) does not load them.
import json
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from artloop.models.tiny.cache import build_cached, shipped

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
# Qwen2.5-VL's tokenizer adds tool-call and fill-in-the-middle tokens; Qwen3-VL's the thinking
# and tool-response ones too (the same ids order as the published tokenizers).
QWEN25_SPECIAL_TOKENS = [
    *SPECIAL_TOKENS,
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
QWEN3_SPECIAL_TOKENS = [
    *QWEN25_SPECIAL_TOKENS,
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

# The vision placeholder of an image or a video content part (shared by the templates).
_VISION_PART = (
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
)

# Qwen2-VL-Instruct's chat template, also Qwen2.5-VL-Instruct's: a default system message when
# the conversation has none.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    + _VISION_PART
    + "{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's chat template (without its tool-calling branch): no default system
# message, and text and vision parts of any message rendered in order.
QWEN3_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    + _VISION_PART
    + "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

CONFIG = {
    "vocab_size": 4096,  # BPE vocabulary before special tokens
    "text": _TEXT,
    "vision": {"depth": 2, "embed_dim": 32, "num_heads": 2},
    # Image tokens per image are bounded: at most 16x16 patches of 14 px -> 64 merged tokens.
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 64,
    # Room for the agents' prompts in this byte-level BPE (2.5k-3.6k tokens) + answer + a repair:
    # at 4096 a sampled EditPlan ran into the context's end and thesis_cot failed in CI.
    "max_positions": 16384,
    "seed": 0,
    "builder": 3,  # bump when the builder's output changes: the cache key is this dict's hash
}

QWEN25_CONFIG = {
    "family": "qwen2.5-vl",
    "vocab_size": 4096,
    "text": _TEXT,
    # Window attention in block 0 (windows of 112 px = 4x4 merged patches), full in block 1.
    "vision": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    },
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 64,
    # Room for the agents' prompts in this byte-level BPE (English prose: ~4k tokens) + answer.
    "max_positions": 16384,
    "seed": 0,
    "builder": 1,
}

QWEN3_CONFIG = {
    "family": "qwen3-vl",
    "vocab_size": 4096,
    "text": {**_TEXT, "head_dim": 32},
    # Patches of 16 px (merged 2x2: 32 px a token); block 0's features also go to text layer 0
    # (DeepStack); learned position embeddings on a 16x16 grid, interpolated.
    "vision": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": [0],
    },
    "min_pixels": 64 * 64,
    "max_pixels": 32 * 32 * 64,  # at most 64 merged tokens, as for the others
    "max_positions": 16384,
    "seed": 0,
    "builder": 1,
}


# tiny-shapes-qwen2vl (trained by trainers/shapes_vlm.py, shipped in weights/): the tiny Qwen2-VL
# grown (hidden 192, 4 layers; head dim 32 still), a BPE trained on the agents' prompts plus one
# token per fixed prompt line. Images: 64 px upscaled to 112 px = 8 x 8 patches of 14 px -> 16
# merged tokens (at the tiny default's 56 px minimum, 4 tokens: too coarse for boxes).
SHAPES_CONFIG = {
    "family": "qwen2-vl",
    "vocab_size": 4096,
    "text": {
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
    },
    "vision": {"depth": 4, "embed_dim": 128, "num_heads": 4},
    "min_pixels": 112 * 112,
    "max_pixels": 112 * 112,
    "max_positions": 8192,
}


@dataclass(frozen=True)
class VLMFamily:
    """What differs between the families' tiny builds, by transformers class name."""

    model_type: str  # config.json's model_type
    config_class: str
    model_class: str
    processor_class: str
    video_processor_class: str
    special_tokens: tuple[str, ...]
    chat_template: str
    # Image normalisation (Qwen2/2.5-VL: OpenAI CLIP's; Qwen3-VL: 0.5 / 0.5).
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None


FAMILIES = {
    "qwen2-vl": VLMFamily(
        "qwen2_vl",
        "Qwen2VLConfig",
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLProcessor",
        "Qwen2VLVideoProcessor",
        tuple(SPECIAL_TOKENS),
        CHAT_TEMPLATE,
    ),
    "qwen2.5-vl": VLMFamily(
        "qwen2_5_vl",
        "Qwen2_5_VLConfig",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLProcessor",
        "Qwen2VLVideoProcessor",
        tuple(QWEN25_SPECIAL_TOKENS),
        CHAT_TEMPLATE,
    ),
    "qwen3-vl": VLMFamily(
        "qwen3_vl",
        "Qwen3VLConfig",
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLProcessor",
        "Qwen3VLVideoProcessor",
        tuple(QWEN3_SPECIAL_TOKENS),
        QWEN3_CHAT_TEMPLATE,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    ),
}
MODEL_TYPES = {f.model_type: name for name, f in FAMILIES.items()}


def _corpus() -> list[str]:
    """Local text to train the tokenizer on: the standard library's own sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:120]
    return [f.read_text(encoding="utf-8", errors="ignore") for f in files]


@cache
def _image_only_processor_class(family: str = "qwen2-vl"):
    """The family's processor without the video slot: its video processor needs torchvision."""
    import transformers
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin

    spec = FAMILIES[family]
    base = getattr(transformers, spec.processor_class)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin accepts only the declared attributes; skip the family's own __init__
        # (it passes a video_processor positionally) and set what it would have set.
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)

    cls = type(
        f"{spec.processor_class}ImageOnly",
        (base,),
        {"attributes": ["image_processor", "tokenizer"], "__init__": __init__},
    )
    config_class = getattr(transformers, spec.config_class)
    try:
        AutoProcessor.register(config_class, cls, exist_ok=True)
    except TypeError:  # older signature without exist_ok
        AutoProcessor.register(config_class, cls)
    return cls


# The published Qwen2/2.5/3-VL tokenizers' pre-tokenizer split (tokenizer.json): one token per
# digit, so that a box coordinate is three 10-way choices, not one of a thousand rare tokens.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _tokenizer(config: dict, spec: VLMFamily, corpus: list[str] | None = None):
    """A byte-level BPE with the Qwen split, trained on `corpus` (default: local text), with
    the family's special tokens and template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config["vocab_size"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown token
        special_tokens=list(spec.special_tokens),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus or _corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(spec.special_tokens[1:]),
        chat_template=spec.chat_template,
    )


def _mrope_section(head_dim: int) -> list[int]:
    """M-RoPE splits half the head dim into (temporal, height, width) sections."""
    q = head_dim // 2
    return [q - 2 * (q * 3 // 8), q * 3 // 8, q * 3 // 8]


def _model_config(family: str, config: dict, ids: dict[str, int], vocab: int):
    """The family's transformers config for the tiny model."""
    import transformers

    spec = FAMILIES[family]
    text = config["text"]
    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": _mrope_section(head_dim)}
    if family == "qwen3-vl":
        # Qwen3-VL interleaves the (t, h, w) frequencies: sections as the published 24/20/20.
        q = head_dim // 2
        rope = {**rope, "rope_theta": 5e6, "mrope_interleaved": True}
        rope["mrope_section"] = [q - 2 * (q * 5 // 16), q * 5 // 16, q * 5 // 16]
    vision = dict(config["vision"])
    if family == "qwen2-vl":
        vision["hidden_size"] = text["hidden_size"]  # Qwen2-VL's merger projects to it
    else:
        vision["out_hidden_size"] = text["hidden_size"]
    return getattr(transformers, spec.config_class)(
        text_config={
            **text,
            "vocab_size": vocab,
            "max_position_embeddings": config.get("max_positions", 4096),
            "rope_parameters": rope,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def new_vlm(config: dict, corpus: list[str] | None = None, phrases: list[str] = ()) -> tuple:
    """(model, processor) of a `config` like CONFIG, random weights (seeded), its tokenizer
    trained on `corpus` (default: the standard library's sources), each of `phrases` one more
    token (matched before the BPE)."""
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    family = config.get("family", "qwen2-vl")
    spec = FAMILIES[family]
    tokenizer = _tokenizer(config, spec, corpus)
    tokenizer.add_tokens(list(phrases))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in spec.special_tokens}
    model_config = _model_config(family, config, ids, len(tokenizer))
    torch.manual_seed(config["seed"])
    model = getattr(transformers, spec.model_class)(model_config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    vision = model_config.vision_config
    norm = {"image_mean": spec.image_mean, "image_std": spec.image_std} if spec.image_mean else {}
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=config["min_pixels"],
        max_pixels=config["max_pixels"],
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        **norm,
    )
    processor = _image_only_processor_class(family)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=spec.chat_template
    )
    return model, processor


def save_vlm(model, processor, out: Path) -> None:
    """Save as a published checkpoint is laid out (safetensors), so that transformers and vLLM
    load it by the family's stock classes."""
    spec = FAMILIES[MODEL_TYPES[model.config.model_type]]
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    # Name the stock class, as a real checkpoint does, so other loaders (vLLM) take it.
    cfg_path = out / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["processor_class"] = spec.processor_class
    cfg_path.write_text(json.dumps(cfg, indent=2))
    # A real checkpoint also configures the video processor; vLLM's loader requires it.
    video = {**cfg["image_processor"], "video_processor_type": spec.video_processor_class}
    video.pop("image_processor_type", None)
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


def _build(config: dict, out: Path) -> None:
    save_vlm(*new_vlm(config), out)


def build_tiny_qwen2vl() -> Path:
    """Build (once) and return the directory of the tiny Qwen2-VL."""
    return build_cached("tiny-qwen2vl", CONFIG, _build)


def build_tiny_qwen25vl() -> Path:
    """Build (once) and return the directory of the tiny Qwen2.5-VL."""
    return build_cached("tiny-qwen2.5vl", QWEN25_CONFIG, _build)


def build_tiny_qwen3vl() -> Path:
    """Build (once) and return the directory of the tiny Qwen3-VL."""
    return build_cached("tiny-qwen3vl", QWEN3_CONFIG, _build)


# The tiny models' image-processor settings, read without building them (for the box frame).
TINY_CONFIGS = {
    "tiny-qwen2vl": CONFIG,
    "tiny-qwen2.5vl": QWEN25_CONFIG,
    "tiny-qwen3vl": QWEN3_CONFIG,
}
TINY_FAMILIES = {name: cfg.get("family", "qwen2-vl") for name, cfg in TINY_CONFIGS.items()}


def shipped_shapes_vlm() -> Path:
    """The shipped tiny-shapes-qwen2vl directory; ValueError when this checkout lacks it."""
    return shipped("tiny-shapes-qwen2vl", "config.json", "train-shapes-vlm", "chat.model")


def model_family(path: str) -> str:
    """The family of a model directory, from its config.json's model_type; ValueError naming
    the model_type when it is none of the families'."""
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"model at {path} has model_type {model_type!r}: not one of {', '.join(MODEL_TYPES)}"
        )
    return MODEL_TYPES[model_type]


def load_processor(path: str):
    """Load a Qwen-VL processor of any family; works without torchvision (no video
    processor)."""
    from transformers import AutoProcessor

    cls = _image_only_processor_class(model_family(path))
    try:
        import torchvision  # noqa: F401
    except Exception:
        return cls.from_pretrained(path)
    return AutoProcessor.from_pretrained(path)
