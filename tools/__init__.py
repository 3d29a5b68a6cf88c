"""Tools the graph drives: the diffusion model, image measurements, the stores, the report."""
