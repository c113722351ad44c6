"""Owns the device tensors: the KV cache, the step's inputs and metadata; runs the model."""

from __future__ import annotations

import torch

from peftserve.engine.scheduler import ScheduledBatch, ScheduledSeq
from peftserve.layers.attention import AttentionMetadata, PrefillChunk
from peftserve.layers.linear import DeltaHook
from peftserve.models.llama import LlamaModel, StepContext


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        s = model.shape
        self.device = model.device
        # [layers, K/V, slots, kv_heads, head_dim]; slot = block * block_size + offset
        self.kv_cache = torch.zeros(s.layers, 2, num_blocks * block_size, s.kv_heads, s.head_dim,
                                    dtype=model.dtype, device=self.device)

    @staticmethod
    def cache_bytes_per_block(model: LlamaModel, block_size: int) -> int:
        s = model.shape
        return s.layers * 2 * block_size * s.kv_heads * s.head_dim * model.dtype.itemsize

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        # flat cache slots of positions start..end-1: [end - start]
        bs = self.block_size
        blocks = torch.tensor(block_table[start // bs: -(-end // bs)], dtype=torch.long)
        slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()
        first = (start // bs) * bs
        return slots[start - first: end - first]

    def _decode_metadata(self, decodes: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.block_size
        ctx_lens = torch.tensor([d.seq.num_computed_tokens + 1 for d in decodes])
        max_blocks = -(-int(ctx_lens.max()) // bs)
        table = torch.zeros(len(decodes), max_blocks, dtype=torch.long)
        for i, d in enumerate(decodes):
            bt = d.seq.block_table[:max_blocks]
            table[i, :len(bt)] = torch.tensor(bt, dtype=torch.long)
        slots = (table[:, :, None] * bs + torch.arange(bs)).flatten(1)  # [nd, max_blocks * bs]
        mask = torch.arange(max_blocks * bs)[None, :] < ctx_lens[:, None]
        return slots, mask[:, None, None, :]

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """-> input_ids [T], positions [T], attention metadata (all on the model's device)."""
        ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        for d in batch.decodes:
            pos = d.seq.num_computed_tokens
            ids.append(d.seq.token_ids[pos])
            positions.append(pos)
        if batch.decodes:
            bs = self.block_size
            slot_parts.append(torch.tensor(
                [d.seq.block_table[p // bs] * bs + p % bs
                 for d, p in zip(batch.decodes, positions, strict=True)], dtype=torch.long))
        chunks: list[PrefillChunk] = []
        row = len(batch.decodes)
        for p in batch.prefills:
            seq, start, n = p.seq, p.seq.num_computed_tokens, p.num_new_tokens
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slot_parts.append(self._slots(seq.block_table, start, start + n))
            ctx_slots = mask = None
            if start > 0:
                ctx_slots = self._slots(seq.block_table, 0, start + n).to(self.device)
                mask = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start).to(self.device)
            chunks.append(PrefillChunk(row, row + n, ctx_slots, mask))
            row += n
        dev = self.device
        decode_slots = decode_mask = None
        if batch.decodes:
            decode_slots, decode_mask = self._decode_metadata(batch.decodes)
            decode_slots, decode_mask = decode_slots.to(dev), decode_mask.to(dev)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_parts).to(dev),
            num_decodes=len(batch.decodes),
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            prefills=tuple(chunks),
        )
        return (torch.tensor(ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), meta)

    def hidden_states(self, batch: ScheduledBatch, hook: DeltaHook | None = None) -> torch.Tensor:
        """Runs the model over the step's tokens -> final hidden states [T, hidden]."""
        input_ids, positions, meta = self.prepare(batch)
        cos, sin = self.model.rotary.cos_sin(positions, self.model.dtype)
        ctx = StepContext(attn=meta, cos=cos, sin=sin, hook=hook)
        return self.model(self.model.embed_tokens(input_ids), self.kv_cache, ctx)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, hook: DeltaHook | None = None) -> torch.Tensor:
        """Runs one step. Returns fp32 logits [B, vocab] for the items that sample, in
        `batch.items` order (items that only advance a prefill chunk have no row)."""
        h = self.hidden_states(batch, hook)
        rows, row = [], 0
        for item in batch.items:
            row += item.num_new_tokens
            if item.samples:
                rows.append(row - 1)
        if not rows:
            return torch.empty(0, self.model.shape.vocab, device=self.device)
        return self.model.logits(h[torch.tensor(rows, device=self.device)])
