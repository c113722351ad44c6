"""Building blocks of the base model's forward pass, over flattened tokens [T, ...]."""
