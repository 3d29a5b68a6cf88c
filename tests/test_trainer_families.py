"""The trainers beyond SD 1.5: SDXL (UNet + pooled embeddings + time ids) and FLUX (transformer
on packed latents, rectified flow, the flow SDE for DDPO); and data-parallel training with two
CPU processes under torchrun."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from artloop.trainers.common import TrainerConfigError, load_base
from artloop.trainers.ddpo import DDPOConfig, flow_sde_step_with_logprob, train_ddpo
from artloop.trainers.dpo import DPOConfig, train_dpo
from artloop.trainers.sft import SFTConfig, diffusion_loss, load_rows, train_sft
from conftest import free_port
from safetensors.torch import load_file

MODELS = {"tiny-sdxl": "unet.", "tiny-flux": "transformer."}  # where diffusers puts the LoRA


def image(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe(
        "a red fox", num_inference_steps=2, height=64, width=64, generator=g, output_type="np"
    ).images[0]


def fixed_loss(family, latents, captions) -> float:
    """The denoising loss over every example, on 8 fixed noise draws."""
    with torch.no_grad():
        return float(
            np.mean(
                [
                    diffusion_loss(
                        family,
                        family.denoiser,
                        latents,
                        captions,
                        torch.Generator().manual_seed(100 + k),
                    ).item()
                    for k in range(8)
                ]
            )
        )


@pytest.mark.parametrize("model", MODELS)
def test_sft_trains_a_lora_diffusers_loads(model, sft_data, tmp_path):
    cfg = SFTConfig(
        data=str(sft_data),
        output_dir=str(tmp_path / "lora"),
        model=model,
        resolution=64,
        train_steps=40,
        learning_rate=1e-2,
        caption_dropout=0.0,
    )
    summary = train_sft(cfg, progress=False)
    assert summary["family"] == model.removeprefix("tiny-")
    weights = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith(MODELS[model]) and "lora" in k for k in weights)

    family = load_base(cfg)  # a fresh base; diffusers' own loader puts the LoRA on it
    rows = load_rows(cfg.data)
    latents = family.encode_images([img for img, _ in rows], 64)
    captions = family.encode_texts([text for _, text in rows])
    base_loss, base_image = fixed_loss(family, latents, captions), image(family.pipe)
    family.pipe.load_lora_weights(tmp_path / "lora")
    trained_loss = fixed_loss(family, latents, captions)
    # Measured: SDXL 1.112 -> 1.030, FLUX 3.43 -> 1.78.
    assert trained_loss < base_loss - 0.02  # it learnt the data
    assert not np.allclose(base_image, image(family.pipe), atol=1e-3)


@pytest.mark.parametrize("model", MODELS)
def test_dpo_starts_at_ln2(model, dpo_data, tmp_path):
    cfg = DPOConfig(
        data=str(dpo_data),
        output_dir=str(tmp_path / "lora"),
        model=model,
        resolution=64,
        train_steps=3,
    )
    summary = train_dpo(cfg, progress=False)
    # The LoRA starts as a no-op: policy == reference on the family's own loss, so exactly ln 2.
    assert summary["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(x) for x in summary["losses"])


@pytest.mark.parametrize("model", MODELS)
def test_ddpo_runs_its_chain(model, tmp_path):
    (tmp_path / "p.txt").write_text("a red fox\na lighthouse\n")
    cfg = DDPOConfig(
        data=str(tmp_path / "p.txt"),
        output_dir=str(tmp_path / "lora"),
        model=model,
        train_steps=2,
        inner_epochs=2,
        sample_steps=3,
        batch_size=2,
        eta=0.7,
    )
    summary = train_ddpo(cfg, progress=False)
    assert abs(summary["first_loss"]) < 1e-5  # ratio 1 at the sampling policy: -mean(adv) = 0
    assert math.isfinite(summary["last_loss"]) and len(summary["mean_rewards"]) == 1
    weights = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert (
        max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k or "lora.up" in k) > 0
    )


def test_flux_prediction_matches_the_pipeline(tmp_path):
    """One Euler step of FluxPipeline from s = 1 lands on noise - velocity: our packing,
    unpacking, ids and timestep convention must give the velocity the pipeline used."""
    family = load_base(
        SFTConfig(data="unused", output_dir=str(tmp_path), model="tiny-flux", resolution=64)
    )
    pipe = family.pipe
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    packed = pipe._pack_latents(noise, 1, 4, 8, 8)
    out = pipe(
        "a red fox",
        latents=packed,
        num_inference_steps=1,
        height=64,
        width=64,
        max_sequence_length=family.max_sequence_length,
        output_type="latent",
    ).images
    stepped = pipe._unpack_latents(out, 64, 64, pipe.vae_scale_factor)
    with torch.no_grad():
        velocity = family.predict(
            family.denoiser, noise, torch.tensor(1.0), family.encode_texts(["a red fox"])
        )
    assert torch.allclose(stepped, noise - velocity, atol=1e-5)


def test_flow_sde_step():
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    for s, nxt in zip(sigmas, sigmas[1:], strict=False):
        # Almost no noise: the Euler step of the flow ODE, x + (s' - s) v.
        quiet, _ = flow_sde_step_with_logprob(
            v, s, nxt, sigmas[1], x, 1e-4, torch.Generator().manual_seed(0)
        )
        assert torch.allclose(quiet, x + (nxt - s) * v, atol=1e-3)
        taken, lp = flow_sde_step_with_logprob(
            v, s, nxt, sigmas[1], x, 0.7, torch.Generator().manual_seed(0)
        )
        _, again = flow_sde_step_with_logprob(v, s, nxt, sigmas[1], x, 0.7, prev_sample=taken)
        _, other = flow_sde_step_with_logprob(v, s, nxt, sigmas[1], x, 0.7, prev_sample=taken + 0.5)
        assert torch.isfinite(lp).all() and torch.allclose(lp, again) and (other < lp).all()


def test_flux_resolution_must_fit_its_patches(tmp_path):
    with pytest.raises(
        TrainerConfigError, match="SFTConfig.resolution: 72 is not a multiple of 16"
    ):
        load_base(SFTConfig(data="x", output_dir=str(tmp_path), model="tiny-flux", resolution=72))


@pytest.mark.slow  # two torchrun processes
def test_two_processes_under_torchrun(sft_data, tmp_path):
    """Data parallel on CPU (gloo): two processes, each its own batches, gradients averaged, so
    the LoRA is the same in both; one summary and one LoRA written."""
    torchrun = Path(sys.executable).with_name("torchrun")
    artloop = Path(sys.executable).with_name("artloop")
    out = tmp_path / "lora"
    run = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(artloop),
            "train",
            "sft",
            "--data",
            str(sft_data),
            "--output-dir",
            str(out),
            "--resolution",
            "64",
            "--train-steps",
            "6",
            "--checkpoint-every",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, run.stdout  # the main process reports
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    a, b = summary["lora_norm_per_process"]
    assert a == pytest.approx(b, rel=1e-6)  # synced (each process drew different batches)
    assert load_file(out / "pytorch_lora_weights.safetensors")
