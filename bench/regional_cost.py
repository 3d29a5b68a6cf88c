"""What regional prompting costs: a plain text-to-image call against regional calls with 1 and
3 regions by each technique (tools/regional.py: masked attention, prediction blending), same
model, size and steps, through the DiffusionTool (prompt encoding, the denoising loop, decoding,
storing). The calls are interleaved, repeat by repeat, so that they share the machine's state;
each reports its median seconds and its ratio to the plain call (the target: at most 1.3x).

    OMP_NUM_THREADS=1 .venv/bin/python bench/regional_cost.py --model tiny-shapes-sd
    OMP_NUM_THREADS=1 .venv/bin/python bench/regional_cost.py --model tiny-sd --size 256
    OMP_NUM_THREADS=1 .venv/bin/python bench/regional_cost.py --model tiny-flux
    .venv/bin/python bench/regional_cost.py --model tiny-sd --size 512 --device cuda

--full-sd15 puts Stable Diffusion 1.5's published UNet and CLIP ViT-L/14 text encoder
architectures, with random weights (nothing is downloaded), into tiny-sd's pipeline (its
tokenizer, scheduler and small VAE: the real VAE's decode, the same in every call, would only
dilute the ratios): what the denoiser costs at full size, where it is compute-bound.

    OMP_NUM_THREADS=1 .venv/bin/python bench/regional_cost.py --full-sd15 --size 512 \\
        --steps 2 --repeats 3 --warmup 0 --clock cpu
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from artloop.tools.diffusion import DiffusionTool, GenParams
from artloop.tools.images import ImageStore

PROMPT = "a red circle to the left of a blue square"
REGIONS = [
    ((0, 0, 500, 1000), "a large green triangle", 1.0),
    ((500, 0, 1000, 500), "a small yellow circle", 0.8),
    ((500, 500, 1000, 1000), "a purple square", 0.6),
]
# Stable Diffusion 1.5's UNet (unet/config.json) and text encoder (CLIP ViT-L/14's text tower).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-shapes-sd")
    ap.add_argument("--full-sd15", action="store_true", help="SD 1.5's architecture, random")
    ap.add_argument("--size", type=int, default=None, help="default: 64 (shapes), else 256")
    ap.add_argument("--steps", type=int, default=None, help="default: 20 (shapes), else 8")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--techniques", default="attention,blend")
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (one-threaded CPU runs on a shared machine)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    model = "tiny-sd" if args.full_sd15 else args.model
    shapes = model == "tiny-shapes-sd"
    size = args.size or (64 if shapes else 256)
    steps = args.steps or (20 if shapes else 8)
    tool = DiffusionTool(
        model, store=ImageStore(tempfile.mkdtemp()), device=args.device, dtype=args.dtype
    )
    tool.setup()
    if args.full_sd15:
        _full_sd15(tool, args.device, args.dtype)
    params = GenParams(size, size, steps, args.guidance, seed=0)
    calls = {"text-to-image": lambda: tool.text_to_image(PROMPT, "", params)}
    for technique in args.techniques.split(","):
        for k in (1, 3):
            calls[f"{technique}, {k} region{'s' * (k > 1)}"] = lambda k=k, technique=technique: (
                tool.regional(None, PROMPT, "", REGIONS[:k], params, technique=technique)
            )
    sync = _synchronizer(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(args.warmup + args.repeats):
        for name, call in calls.items():
            sync()
            start = clock()
            call()
            sync()
            if repeat >= args.warmup:
                seconds[name].append(clock() - start)
    label = "SD 1.5 architecture (random weights)" if args.full_sd15 else model
    print(
        f"{label} ({tool.family}) {size}x{size}, {steps} steps, guidance {args.guidance}, "
        f"{args.device} {args.dtype}; median of {args.repeats} ({args.clock} clock)"
    )
    base = statistics.median(seconds["text-to-image"])
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"  {name:<22} {median * 1000:10.1f} ms   {median / base:5.2f}x")


def _full_sd15(tool: DiffusionTool, device: str, dtype: str) -> None:
    """SD 1.5's UNet and text encoder, random weights, into the tool's (tiny-sd) pipeline."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = tool.pipeline
    torch.manual_seed(0)
    # The tiny tokenizer's vocabulary and special tokens: the embedding's size, not its cost.
    tiny = pipe.text_encoder.config
    ids = {k: getattr(tiny, k) for k in ("vocab_size", "bos_token_id", "eos_token_id")}
    text = CLIPTextModel(CLIPTextConfig(**ids, pad_token_id=tiny.pad_token_id, **SD15_TEXT))
    unet = UNet2DConditionModel(**SD15_UNET)
    kind = getattr(torch, dtype)
    pipe.register_modules(
        unet=unet.to(device, kind).eval(), text_encoder=text.to(device, kind).eval()
    )


def _synchronizer(device: str):
    """Waits for queued GPU work, so that a call's time is its own."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


if __name__ == "__main__":
    main()
