"""Owns the device tensors: the KV cache, the step's inputs and metadata; runs the model."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from peftserve.adapters.slots import AdapterHook, DeviceSlots
from peftserve.config import EngineConfig
from peftserve.engine.cuda_graphs import DecodeGraphs, default_sizes
from peftserve.engine.sampler import sample
from peftserve.engine.scheduler import ScheduledBatch, ScheduledSeq
from peftserve.engine.static_step import SampledTokens, StaticDecodeStep, StaticStepOptions
from peftserve.kernels import build_segment_meta
from peftserve.layers.attention import AttentionMetadata, PrefillChunk
from peftserve.layers.linear import DeltaHook
from peftserve.models.llama import LlamaModel, StepContext

log = logging.getLogger(__name__)


def static_options(
    config: EngineConfig, model: LlamaModel, max_model_len: int
) -> StaticStepOptions | None:
    """The static decode step `config` asks for on `model`'s backend; None: the classic step."""
    captures = model.backend.captures_graphs
    if config.decode_step == "classic" or (config.decode_step == "auto" and not captures):
        return None
    graph_batch = min(config.max_cuda_graph_batch, config.max_num_seqs)
    return StaticStepOptions(
        max_rows=config.max_num_seqs,
        max_blocks=-(-max_model_len // config.block_size),
        graph_blocks=-(-min(max_model_len, config.max_cuda_graph_len) // config.block_size),
        engine_seed=config.seed,
        graph_sizes=default_sizes(graph_batch) if captures and config.cuda_graphs else (),
        prefill_rows=config.prefill_rows,
        lora_overlap=config.lora_overlap,
    )


class ModelRunner:
    def __init__(
        self, model: LlamaModel, num_blocks: int, block_size: int, slots: DeviceSlots | None = None,
        static: StaticStepOptions | None = None,
    ) -> None:  # fmt: skip
        """`static`: decode-only steps run the static decode step (static_step.py), and every
        step samples on the device; None: inputs built per step, sampling on the host."""
        self.model = model
        self.slots = slots
        self.block_size = block_size
        s = model.shape
        self.device = model.device
        # [layers, K/V, kv_heads, slots, head_dim]; slot = block * block_size + offset. Head-major:
        # decode attention gathers whole blocks and reads them in place (layers/attention.py).
        # The static step's padding rows write their K/V to one more block, which the block
        # manager (sized num_blocks) never hands out.
        scratch = 1 if static is not None else 0
        self.kv_cache = torch.zeros(
            s.layers,
            2,
            s.kv_heads,
            (num_blocks + scratch) * block_size,
            s.head_dim,
            dtype=model.dtype,
            device=self.device,
        )
        self.static: StaticDecodeStep | None = None
        if static is not None:
            self.static = StaticDecodeStep(
                model, self.kv_cache, block_size, num_blocks, slots, static
            )
            if static.graph_sizes:
                graphs = DecodeGraphs(self.static, static.graph_sizes)
                try:
                    seconds = graphs.capture()
                except Exception as e:  # an op that cannot be captured: serve, eagerly
                    log.warning("CUDA graph capture failed, decode steps run eagerly "
                                "(--no-cuda-graphs skips the attempt): %s: %s",
                                type(e).__name__, e)  # fmt: skip
                else:
                    log.info("captured CUDA graphs of the decode step for batch sizes %s in "
                             "%.2fs", ",".join(map(str, static.graph_sizes)), seconds)  # fmt: skip
                    self.static.graphs = graphs

    @staticmethod
    def cache_bytes_per_block(model: LlamaModel, block_size: int) -> int:
        s = model.shape
        return s.layers * 2 * block_size * s.kv_heads * s.head_dim * model.dtype.itemsize

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        # flat cache slots of positions start..end-1: [end - start]
        bs = self.block_size
        blocks = torch.tensor(block_table[start // bs : -(-end // bs)], dtype=torch.long)
        slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()
        first = (start // bs) * bs
        return slots[start - first : end - first]

    def _tables_and_mask(
        self, decodes: list[ScheduledSeq], lens: torch.Tensor, longest: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """lens: the context lengths [nd], longest their max -> block tables [nd, max_blocks]
        (padded with block 0) and the mask of real context positions
        [nd, 1, 1, 1, max_blocks * block_size] (None where the backend reads only the lengths),
        on the host."""
        bs = self.block_size
        max_blocks = -(-longest // bs)
        table = []
        for d in decodes:
            blocks = d.seq.block_table[:max_blocks]
            table.append(blocks + [0] * (max_blocks - len(blocks)))
        if self.model.backend.reads_decode_lens:
            return torch.tensor(table, dtype=torch.long), None
        mask = torch.arange(max_blocks * bs)[None, :] < lens[:, None]
        return torch.tensor(table, dtype=torch.long), mask[:, None, None, None, :]

    def _metadata(
        self, decodes: list[ScheduledSeq], rows: list[list[int]], slots: torch.Tensor,
        lens: torch.Tensor, prefills: tuple[PrefillChunk, ...] = (),
    ) -> AttentionMetadata:  # fmt: skip
        """The step's attention metadata; rows: _decode_rows(decodes), lens: its last row."""
        dev = self.device
        blocks = mask = None
        if decodes:
            blocks, mask = self._tables_and_mask(decodes, lens, max(rows[3]))
        return AttentionMetadata(
            slot_mapping=slots.to(dev),
            num_decodes=len(decodes),
            block_size=self.block_size,
            decode_blocks=blocks.to(dev) if blocks is not None else None,
            decode_mask=mask.to(dev) if mask is not None else None,
            # read by the backends that take lengths instead of the mask (reads_decode_lens)
            decode_lens=lens.to(dev) if decodes and self.model.backend.reads_decode_lens else None,
            prefills=prefills,
        )

    def _decode_rows(self, decodes: list[ScheduledSeq]) -> list[list[int]]:
        """Per decoding sequence: [tokens, positions, cache slots, context lengths]."""
        bs = self.block_size
        rows: list[list[int]] = [[], [], [], []]
        for d in decodes:
            seq, pos = d.seq, d.seq.num_computed_tokens
            rows[0].append(seq.token_ids[pos])
            rows[1].append(pos)
            rows[2].append(seq.block_table[pos // bs] * bs + pos % bs)
            rows[3].append(pos + 1)
        return rows

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """-> input_ids [T], positions [T], attention metadata (all on the model's device)."""
        decodes = self._decode_rows(batch.decodes)
        if not batch.prefills:  # a decode-only step: its numbers in one host tensor
            host = torch.tensor(decodes, dtype=torch.long)
            ids_pos = host[:2].to(self.device)
            meta = self._metadata(batch.decodes, decodes, host[2], host[3])
            return ids_pos[0], ids_pos[1], meta
        ids, positions = decodes[0], decodes[1]
        slot_parts = [torch.tensor(decodes[2], dtype=torch.long)]
        chunks: list[PrefillChunk] = []
        row = len(batch.decodes)
        for p in batch.prefills:
            seq, start, n = p.seq, p.seq.num_computed_tokens, p.num_new_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slot_parts.append(self._slots(seq.block_table, start, start + n))
            ctx_slots = mask = None
            if start > 0:
                ctx_slots = self._slots(seq.block_table, 0, start + n).to(self.device)
                mask = (
                    torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start).to(self.device)
                )
                mask = mask[None, None, None]
            chunks.append(PrefillChunk(row, row + n, ctx_slots, mask))
            row += n
        lens = torch.tensor(decodes[3], dtype=torch.long)
        meta = self._metadata(batch.decodes, decodes, torch.cat(slot_parts), lens, tuple(chunks))
        return (
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            meta,
        )

    def hidden_states(self, batch: ScheduledBatch, hook: DeltaHook | None = None) -> torch.Tensor:
        """Runs the model over the step's tokens -> final hidden states [T, hidden]."""
        input_ids, positions, meta = self.prepare(batch)
        cos, sin = self.model.rotary.cos_sin(positions, self.model.dtype)
        ctx = StepContext(attn=meta, cos=cos, sin=sin, hook=hook)
        return self.model(self.model.embed_tokens(input_ids), self.kv_cache, ctx)

    def adapter_hook(self, batch: ScheduledBatch) -> DeltaHook | None:
        """The step's per-token adapter deltas; None when no token uses a slot adapter."""
        if self.slots is None or not any(item.seq.slot >= 0 for item in batch.items):
            return None
        token_slot = torch.tensor(
            [item.seq.slot for item in batch.items for _ in range(item.num_new_tokens)],
            dtype=torch.int32,
        )
        meta = build_segment_meta(token_slot.to(self.device))
        acts = {self.slots.slot_activation.get(item.seq.slot) for item in batch.items}
        return AdapterHook(self.slots, meta, tuple(sorted(a for a in acts if a)))

    @torch.inference_mode()
    def sampling_states(self, batch: ScheduledBatch) -> torch.Tensor:
        """Runs one step. Returns the final hidden states [B, hidden] of the items that sample,
        in `batch.items` order (items that only advance a prefill chunk have no row)."""
        h = self.hidden_states(batch, self.adapter_hook(batch))
        rows, row = [], 0
        for item in batch.items:
            row += item.num_new_tokens
            if item.samples:
                rows.append(row - 1)
        if len(rows) == h.shape[0]:  # every row samples (a decode-only step): no gather
            return h
        return h[torch.tensor(rows, dtype=torch.long, device=self.device)]

    def launch(self, batch: ScheduledBatch) -> Callable[[], SampledTokens]:
        """Runs one step and samples -> the function that returns a token for each item that
        samples, in `batch.items` order (before the scheduler's postprocess). A decode-only
        static step, or a step of short prefill chunks run as its rows (StaticDecodeStep
        .launch_rows), returns once its device work is queued (the function waits for its
        tokens); any other step runs here whole."""
        if self.static is not None and batch.decodes and not batch.prefills:
            return self.static.launch(batch.decodes)
        if self.static is not None and batch.prefills:
            wait = self.static.launch_rows(batch.items)
            if wait is not None:
                return wait
        sampled = self._run(batch)
        return lambda: sampled

    def launch_ahead(
        self, decodes: list[ScheduledSeq], feed: list[int]
    ) -> Callable[[], SampledTokens]:
        """A decode-only step queued behind the one launch() just queued, before its tokens
        are back: each sequence one token further, its input token that step's row feed[i]
        (StaticDecodeStep.launch) -> the function that waits for its tokens."""
        assert self.static is not None
        return self.static.launch(decodes, feed)

    @property
    def replays_graphs(self) -> bool:
        """True when decode steps replay CUDA graphs: their device work runs while the host
        goes on."""
        return self.static is not None and self.static.graphs is not None

    def _run(self, batch: ScheduledBatch) -> SampledTokens:
        """launch()'s step other than a static decode-only one, run whole."""
        seqs = [item.seq for item in batch.items if item.samples]
        h = self.sampling_states(batch)
        if not seqs:
            return SampledTokens([], None)
        if self.static is None and all(s.params.plain_greedy for s in seqs):
            tokens = self.model.greedy_tokens(h)  # the argmax without the whole LM head
            if tokens is not None:
                return SampledTokens(tokens, None)
        logits = self.model.logits(h)
        if self.static is not None:  # one sampler for every step: a seed's draws never change
            return self.static.sample(logits, seqs)
        tokens, logprobs = sample(
            logits,
            [s.params for s in seqs],
            [s.token_ids[s.num_virtual :] for s in seqs],
            [s.generator for s in seqs],
            self.model.backend,
        )
        return SampledTokens(tokens, logprobs)

    # --- shared prefixes (PrefixWriter) -----------------------------------------------------

    @torch.inference_mode()
    def write_prefix(
        self,
        blocks: list[int],
        *,
        kv: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        token_ids: list[int] | None = None,
    ) -> None:
        """Fills `blocks` with the K/V of positions 0..n-1: given directly (prefix tuning,
        kv: [layers, 2, n, kv_heads, head_dim]), or computed by a forward pass over input
        embeddings (prompt tuning, embeds: [n, hidden]) or tokens (templates)."""
        n = (
            kv.shape[2]
            if kv is not None
            else embeds.shape[0]
            if embeds is not None
            else len(token_ids or [])
        )
        slots = self._slots(blocks, 0, n).to(self.device)
        if kv is not None:
            kv = kv.to(device=self.device, dtype=self.model.dtype).transpose(2, 3)
            self.kv_cache[:, :, :, slots] = kv
            return
        if embeds is not None:
            h = embeds.to(device=self.device, dtype=self.model.dtype)
        else:
            h = self.model.embed_tokens(
                torch.tensor(token_ids, dtype=torch.long, device=self.device)
            )
        positions = torch.arange(n, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_decodes=0,
            block_size=self.block_size,
            decode_blocks=None,
            decode_mask=None,
            decode_lens=None,
            prefills=(PrefillChunk(0, n, None, None),),
        )
        cos, sin = self.model.rotary.cos_sin(positions, self.model.dtype)
        self.model(h, self.kv_cache, StepContext(attn=meta, cos=cos, sin=sin))

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.kv_cache[:, :, :, dst * bs : (dst + 1) * bs] = self.kv_cache[
            :, :, :, src * bs : (src + 1) * bs
        ]
