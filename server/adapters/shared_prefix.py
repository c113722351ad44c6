"""KV blocks written once for an adapter's virtual tokens or template, shared by refcount."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class SharedPrefix:
    length: int  # tokens in the cache before the prompt (V, or the template's tokens)
    token_ids: list[int]  # what stands in token_ids for them (placeholders or template tokens)
    blocks: list[int]  # ceil(length / block_size) blocks; the prefix holds one reference
