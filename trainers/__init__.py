"""LoRA trainers on exported trajectories (SFT/differential, Diffusion-DPO, DDPO): not built yet."""
