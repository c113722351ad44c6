"""peftserve: one frozen base model, many task adapters, one heterogeneous batch."""

__version__ = "0.1.0"
