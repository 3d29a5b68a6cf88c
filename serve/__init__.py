"""Serving: the vLLM launcher for Qwen2-VL and the HTTP API / web UI: not built yet."""
