"""Tiny random-weight Stable Diffusion 1.5, SDXL and FLUX.1 pipelines, built offline from configs.

Same classes as the real models (so `from_pretrained` and the pipelines' code paths are the real
ones), a few MB each, fast on a CPU. Tokenizers are trained here on an embedded corpus: nothing
is downloaded, and the same config always gives the same files.
"""

from __future__ import annotations

# Deliberately lazy: torch, transformers, tokenizers and diffusers are imported inside the functions
# that use them, so that importing this module (the CLI's --help, the config, a test) does not load
# them.
from pathlib import Path

from artloop.models.tiny.cache import build_cached
from artloop.models.tiny.vae import faithful_tiny_vae

# The tokenizers' training text: prompt-like words, so that prompts split into few tokens.
_PROMPT_TEXT = """
a an the of with and in on at by from for to under over near behind beside portrait landscape
photo photograph painting drawing sketch illustration render watercolor oil acrylic pastel ink
charcoal pencil digital art concept poster cinematic dramatic soft hard warm cool golden hour
sunset sunrise night day morning evening light lighting shadow shadows bright dark moody vivid
muted colorful monochrome black white red orange yellow green blue purple pink brown gray grey
cat dog bird horse fish dragon robot person man woman child girl boy face eyes hair hands tree
trees forest mountain mountains river lake sea ocean beach sky clouds cloud rain snow fog city
street building house castle room window door table chair car boat ship flower flowers garden
field grass stone rock sand fire water ice glass metal wood gold silver highly detailed detail
sharp focus blurry blur bokeh depth field wide angle close up macro high quality best quality
masterpiece realistic photorealistic hyperrealistic style artstation trending studio ghibli
anime cartoon pixel vector flat minimal minimalist abstract surreal fantasy science fiction
futuristic retro vintage old new small large tiny huge beautiful ugly deformed extra fingers
lowres low resolution jpeg artifacts watermark text signature cropped worst bad anatomy noisy
grainy overexposed underexposed washed out lens flare 4k 8k hdr
"""
_WORDS = _PROMPT_TEXT.split()


def _corpus() -> list[str]:
    """A deterministic list of sentences over `_WORDS` (no randomness: the vocab must be stable)."""
    n = len(_WORDS)
    lines = [" ".join(_WORDS[i : i + 12]) for i in range(0, n, 12)]
    lines += [" ".join(_WORDS[(i * k) % n] for i in range(12)) for k in range(1, 60)]
    lines.append("0123456789 , . ; : ! ? ' \" ( ) [ ] { } - _ + = / \\ * & % $ # @")
    return lines * 4


def _bpe_merges(words: dict[tuple[str, ...], int], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on word counts, ties broken by the pair itself: deterministic, unlike the
    `tokenizers` trainer, whose ids and merge order change from run to run (hash order)."""
    words = dict(words)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def clip_tokenizer(vocab_size: int, model_max_length: int, corpus: list[str] | None = None):
    """A CLIP BPE tokenizer (byte-level, `</w>` word ends) trained on `corpus` (default: the
    embedded prompt-like corpus)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    # An untrained CLIPTokenizer only to split the corpus exactly as CLIP will at run time.
    splitter = CLIPTokenizer().backend_tokenizer
    words: dict[tuple[str, ...], int] = {}
    for line in corpus or _corpus():
        for word, _ in splitter.pre_tokenizer.pre_tokenize_str(
            splitter.normalizer.normalize_str(line)
        ):
            key = (*word[:-1], word[-1] + "</w>")
            words[key] = words.get(key, 0) + 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # Every byte also as a word end: no text ever falls back to the unknown token.
    pieces = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    merges = _bpe_merges(words, vocab_size - len(pieces))
    pieces += [a + b for a, b in merges if a + b not in pieces]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def t5_tokenizer(vocab_size: int, model_max_length: int, corpus: list[str] | None = None):
    """A T5 Unigram tokenizer (pad=0, </s>=1, <unk>=2, no sentinels) over BPE-learnt pieces of
    `corpus` (default: the tiny models' prompt words).

    `tokenizers`' Unigram trainer gives rare pieces scores that change between runs; equal
    scores instead make Viterbi pick the fewest pieces, and the files are the same every build.
    """
    import string

    from transformers import T5Tokenizer

    specials = ["<pad>", "</s>", "<unk>"]
    words: dict[tuple[str, ...], int] = {}
    for line in corpus or _corpus():
        for word in line.split() + line.capitalize().split()[:1]:
            key = ("▁", *word)  # T5's Metaspace marks word starts with "▁"
            words[key] = words.get(key, 0) + 1
    alphabet = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    merges = _bpe_merges(words, vocab_size - len(specials) - len(alphabet))
    pieces = dict.fromkeys([*alphabet, *(a + b for a, b in merges)])
    vocab = [(p, 0.0) for p in specials] + [(p, -1.0) for p in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip_text_encoder(cfg: dict, projection: bool = False):
    """CLIPTextModel, or with `projection` CLIPTextModelWithProjection (SDXL's second encoder,
    whose projected pooled output conditions the UNet)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model(CLIPTextConfig(**cfg))


# The cache key hashes these configs only: bump "builder" when the code here changes what it
# builds (the tokenizer corpus, say), so that stale cached models are not reused.

# Four blocks: an 8x downscale like the real SD VAE (a 2-block one is ~10x slower at 512px).
# Weights set by hand (models/tiny/vae.py) so that decoded images carry the latents' colours.
_SD_VAE: dict = {
    "sample_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 1,
    "scaling_factor": 0.18215,
}

SD_CONFIG: dict = {
    "builder": 2,
    "seed": 0,
    "tokenizer": {"vocab_size": 1000, "model_max_length": 77},
    "text_encoder": {
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    },
    "unet": {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        # Cross-attention only at the coarser level: at full latent size, self-attention over
        # 64x64 tokens made 512px take ~4.5 s; the real UNet's layout is not what is tested here.
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": _SD_VAE,
    "scheduler": {  # Stable Diffusion 1.5's DDIM settings
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    },
}

# SDXL: two CLIP encoders whose penultimate hidden states are concatenated for cross-attention,
# and the UNet's "text_time" added conditioning: text_encoder_2's projected pooled embedding
# plus six Fourier-embedded size numbers (original size, crop corner, target size).
_SDXL_TEXT_2 = {**SD_CONFIG["text_encoder"], "hidden_act": "gelu", "projection_dim": 32}
_SDXL_TIME_DIM = 8
SDXL_CONFIG: dict = {
    "builder": 2,
    "seed": 0,
    "tokenizer": SD_CONFIG["tokenizer"],
    "tokenizer_2": SD_CONFIG["tokenizer"],
    "text_encoder": SD_CONFIG["text_encoder"],
    "text_encoder_2": _SDXL_TEXT_2,
    "unet": {
        **SD_CONFIG["unet"],
        "cross_attention_dim": SD_CONFIG["text_encoder"]["hidden_size"]
        + _SDXL_TEXT_2["hidden_size"],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _SDXL_TIME_DIM,
        "projection_class_embeddings_input_dim": _SDXL_TEXT_2["projection_dim"]
        + 6 * _SDXL_TIME_DIM,
    },
    "vae": {**_SD_VAE, "scaling_factor": 0.13025},  # SDXL's VAE scaling
    "scheduler": {  # SDXL base 1.0's Euler settings
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "timestep_spacing": "leading",
        "steps_offset": 1,
    },
    "force_zeros_for_empty_prompt": True,  # as SDXL base: no negative prompt -> zero embeddings
}

FLUX_CONFIG: dict = {
    "builder": 2,
    "seed": 0,
    "max_sequence_length": 32,  # read by DiffusionTool: T5's padded length at call time
    "tokenizer": {"vocab_size": 1000, "model_max_length": 77},
    "tokenizer_2": {"vocab_size": 1000, "model_max_length": 512},
    "text_encoder": SD_CONFIG["text_encoder"],
    "text_encoder_2": {
        "vocab_size": 1000,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",
        "pad_token_id": 0,
        "eos_token_id": 1,
    },
    "transformer": {
        "patch_size": 1,
        "in_channels": 16,  # 2x2-packed latents: 4 x the VAE's latent channels
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,  # = T5 d_model
        "pooled_projection_dim": 32,  # = CLIP hidden size
        "guidance_embeds": False,
        "axes_dims_rope": [4, 4, 8],  # sums to attention_head_dim
    },
    "vae": {
        "sample_size": 256,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [16, 32, 32, 32],  # vae_scale_factor 8: sizes a multiple of 16
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "norm_num_groups": 1,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        # FluxPipeline adds shift_factor when decoding: the default None would fail there.
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
    },
    "scheduler": {  # FLUX.1-dev's flow-matching settings
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}


def _sd_components(config: dict) -> dict:
    """The seeded VAE, first CLIP encoder + tokenizer and UNet shared by SD and SDXL (made in
    this order, so that SD's weights stay those it always had)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(config["seed"])
    return {
        "vae": faithful_tiny_vae(config["vae"]),
        "text_encoder": _clip_text_encoder(config["text_encoder"]),
        "tokenizer": clip_tokenizer(**config["tokenizer"]),
        "unet": UNet2DConditionModel(**config["unet"]),
    }


def build_sd(config: dict, out_dir: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **_sd_components(config),
        scheduler=DDIMScheduler(**config["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def _build_sdxl(config: dict, out_dir: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        **_sd_components(config),
        text_encoder_2=_clip_text_encoder(config["text_encoder_2"], projection=True),
        tokenizer_2=clip_tokenizer(**config["tokenizer_2"]),
        scheduler=EulerDiscreteScheduler(**config["scheduler"]),
        force_zeros_for_empty_prompt=config["force_zeros_for_empty_prompt"],
        add_watermarker=False,  # not saved: loading decides, as for the real model
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def _build_flux(config: dict, out_dir: Path) -> None:
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(config["seed"])
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
        vae=faithful_tiny_vae(config["vae"]),
        text_encoder=_clip_text_encoder(config["text_encoder"]),
        tokenizer=clip_tokenizer(**config["tokenizer"]),
        text_encoder_2=T5EncoderModel(T5Config(**config["text_encoder_2"])),
        tokenizer_2=t5_tokenizer(**config["tokenizer_2"]),
        transformer=FluxTransformer2DModel(**config["transformer"]),
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_sd() -> Path:
    """The tiny SD 1.5 pipeline directory (built on first use, then cached)."""
    return build_cached("tiny-sd", SD_CONFIG, build_sd)


def build_tiny_sdxl() -> Path:
    """The tiny SDXL pipeline directory (built on first use, then cached)."""
    return build_cached("tiny-sdxl", SDXL_CONFIG, _build_sdxl)


def build_tiny_flux() -> Path:
    """The tiny FLUX.1 pipeline directory (built on first use, then cached)."""
    return build_cached("tiny-flux", FLUX_CONFIG, _build_flux)
