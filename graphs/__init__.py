"""LangGraph state machines: the refine loop and its checkpointer wiring."""
