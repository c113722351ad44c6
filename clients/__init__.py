"""Python client for the peftserve gRPC API (no torch import)."""
