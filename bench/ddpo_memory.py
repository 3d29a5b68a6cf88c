"""Peak memory of a DDPO training step at sample_steps 4 and 16, side by side: the loop scores
one chain step per backward pass (ddpo-pytorch's), so its memory should not grow with the
chain's length (issue 22, item 5: flat within 20%).

    .venv/bin/python bench/ddpo_memory.py [--model tiny-sd] [--steps 4 16] [--batch-size 2]

What is measured, per sample_steps, for one optimizer step of `train_ddpo` (sampling, rewards,
PPO on every step of the chain, timestep_fraction 1):
- on a GPU, torch.cuda.max_memory_allocated over the step (the model's weights included);
- always, the bytes of the tensors autograd keeps for backward passes, at the most alive at once:
  counted with torch.autograd.graph.saved_tensors_hooks (each storage once per graph), set back to
  zero by each backward pass, which frees its graph. That is the memory that training adds to a
  forward pass and that grew with sample_steps when the whole chain was one graph; tracemalloc
  does not see torch's allocations, and the process's RSS mostly shows the allocator's caching.
For contrast, the same count for the old structure (every chain step's PPO loss in one graph,
one backward pass), which grows with sample_steps: it shows that the measure sees the graph.
The sampled chain itself, (sample_steps + 1) latents per image, is kept until the round ends:
its bytes are printed too (small: 4 x 8 x 8 floats per image at 64 px on tiny-sd).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from artloop.trainers.common import add_lora, load_base
from artloop.trainers.ddpo import (
    Chain,
    DDPOConfig,
    guided_prediction,
    ppo_loss,
    sample_with_logprobs,
    train_ddpo,
)


class SavedBytes:
    """Bytes of the storages autograd saves for backward, most alive at once (one graph at a
    time: each backward pass frees its graph and starts the count again)."""

    def __init__(self) -> None:
        self.current, self.peak, self.seen = 0, 0, set()
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda x: x)
        self.backward = torch.autograd.backward

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return x

    def backward_done(self, *args, **kwargs):
        out = self.backward(*args, **kwargs)
        self.current, self.seen = 0, set()
        return out

    def __enter__(self) -> SavedBytes:
        torch.autograd.backward = self.backward_done  # Tensor.backward calls it by this name
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
        torch.autograd.backward = self.backward


def config(root: Path, args: argparse.Namespace, steps: int) -> DDPOConfig:
    prompts = root / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse\n")
    return DDPOConfig(
        data=str(prompts),
        output_dir=str(root / f"lora-{steps}"),
        model=args.model,
        resolution=args.resolution,
        sample_steps=steps,
        batch_size=args.batch_size,
        train_steps=1,
        inner_epochs=1,
        resume_from_checkpoint="none",
    )


def loop_step(cfg: DDPOConfig) -> dict[str, float]:
    """One optimizer step of train_ddpo: saved-tensor peak, and the GPU's peak where there is one."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with SavedBytes() as saved:
        train_ddpo(cfg, progress=False)
    out = {"saved_peak_bytes": saved.peak}
    if cuda:
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def one_graph_step(cfg: DDPOConfig) -> int:
    """The structure before issue 22: the PPO loss of every chain step in one graph."""
    family = load_base(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    family.pipe.to(device)
    unet = family.denoiser
    add_lora(unet, cfg.rank, cfg.lora_alpha)
    chain, g = Chain(family, cfg.sample_steps, cfg.eta), torch.Generator().manual_seed(0)
    text, uncond = family.encode_captions(["a red fox"] * cfg.batch_size)
    text = {k: v.to(device) for k, v in text.items()}
    unc = {k: v.to(device).expand(cfg.batch_size, *v.shape[1:]) for k, v in uncond.items()}
    states, old, _ = sample_with_logprobs(family, unet, chain, text, unc, cfg, g)
    adv = torch.linspace(-1, 1, cfg.batch_size, device=device)
    with SavedBytes() as saved:
        losses = []
        for j, t in enumerate(chain.timesteps):
            pred = guided_prediction(family, unet, states[j], t.to(device), text, unc, 5.0)
            _, lp = chain.step(j, pred, states[j], prev_sample=states[j + 1])
            losses.append(ppo_loss(lp, old[j], adv, cfg.clip_range))
        torch.stack(losses).mean().backward()
    return saved.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--steps", type=int, nargs=2, default=[4, 16])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            cfg = config(Path(tmp), args, steps)
            family = load_base(cfg)
            latent = cfg.resolution // family.pipe.vae_scale_factor
            channels = family.pipe.vae.config.latent_channels
            rows[steps] = {
                **loop_step(cfg),
                "one_graph_saved_peak_bytes": one_graph_step(cfg),
                "chain_bytes": (steps + 1) * cfg.batch_size * channels * latent**2 * 4,
            }
    small, large = (rows[s] for s in args.steps)
    ratios = {k: large[k] / small[k] for k in small if small[k]}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": device, "model": args.model, "by_sample_steps": rows}, indent=2))
    for key, ratio in ratios.items():
        print(f"{key}: sample_steps {args.steps[1]} / {args.steps[0]} = {ratio:.3f}")
    flat = ratios.get("cuda_max_allocated_bytes", ratios["saved_peak_bytes"])
    print(
        f"DDPO step memory ratio {flat:.3f} ({'flat' if flat <= 1.2 else 'NOT flat'}, target <= 1.2)"
    )


if __name__ == "__main__":
    main()
