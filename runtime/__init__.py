"""Plumbing shared by the model backends and the tools: concurrent calls gathered into batches
(batching.py) and where the time goes (accounting.py)."""
