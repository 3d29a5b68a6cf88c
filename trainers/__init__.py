"""LoRA trainers on exported trajectories: supervised / differential (sft.py, ArtAug),
Diffusion-DPO (dpo.py, AGFSync), DDPO with a reward (ddpo.py), and base-vs-LoRA evaluation
(evaluate.py); the model families they share (families.py) and the training loop (common.py)."""
