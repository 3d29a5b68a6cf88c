"""Model loading: the tiny offline model factory and the chat-model backends."""
