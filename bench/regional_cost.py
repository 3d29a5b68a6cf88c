"""What regional prompting costs: a plain text-to-image call against regional calls with 1 and
3 regions (tools/regional.py), same model, size and steps, through the DiffusionTool (prompt
encoding, the denoising loop, decoding, storing). The calls are interleaved, repeat by repeat,
so that they share the machine's state; each reports its median seconds and its ratio to the
plain call (the target: at most 1.3x).

    OMP_NUM_THREADS=1 .venv/bin/python bench/regional_cost.py --model tiny-shapes-sd
    .venv/bin/python bench/regional_cost.py --model tiny-flux --size 256 --steps 8
    .venv/bin/python bench/regional_cost.py --model tiny-sd --size 512 --device cuda
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-shapes-sd")
    ap.add_argument("--size", type=int, default=None, help="default: 64 (shapes), else 256")
    ap.add_argument("--steps", type=int, default=None, help="default: 20 (shapes), else 8")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    shapes = args.model == "tiny-shapes-sd"
    size = args.size or (64 if shapes else 256)
    steps = args.steps or (20 if shapes else 8)
    tool = DiffusionTool(
        args.model, store=ImageStore(tempfile.mkdtemp()), device=args.device, dtype=args.dtype
    )
    tool.setup()
    params = GenParams(size, size, steps, args.guidance, seed=0)
    calls = {
        "text-to-image": lambda: tool.text_to_image(PROMPT, "", params),
        "regional, 1 region": lambda: tool.regional(None, PROMPT, "", REGIONS[:1], params),
        "regional, 3 regions": lambda: tool.regional(None, PROMPT, "", REGIONS, params),
    }
    sync = _synchronizer(args.device)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(args.repeats + 1):  # the first round warms up, untimed
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            if repeat:
                seconds[name].append(time.perf_counter() - start)
    print(
        f"{args.model} ({tool.family}) {size}x{size}, {steps} steps, guidance {args.guidance}, "
        f"{args.device} {args.dtype}; median of {args.repeats}"
    )
    base = statistics.median(seconds["text-to-image"])
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"  {name:<20} {median * 1000:9.1f} ms   {median / base:5.2f}x")


def _synchronizer(device: str):
    """Waits for queued GPU work, so that a call's time is its own."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


if __name__ == "__main__":
    main()
