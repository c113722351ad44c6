"""Base models: where weights come from (loader) and our own forward pass (llama)."""
