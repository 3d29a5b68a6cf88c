"""The tools the graph and the trainers drive: the diffusion model (diffusion.py, and Ray actors
in ray_diffusion.py), the content-addressed image store and tone edits (images.py) and image
measurements (image_facts.py)."""
