"""Serving: the vLLM launcher for Qwen2-VL (vlm.py), the web UI for interactive sessions (ui.py)
and its guards: login, upload and size limits (guard.py)."""
