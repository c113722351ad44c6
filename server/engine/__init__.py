"""The serving engine: scheduler (who runs), model runner (how), sampler, step loop."""
