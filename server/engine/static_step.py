"""The graph-safe decode step: the model and the sampler run from persistent buffers.

    step = StaticDecodeStep(model, kv_cache, block_size, scratch_block, slots, options)
    wait = step.launch(batch.decodes)              # a decode-only step, its device work queued
    wait_next = step.launch(next_decodes, feed)    # the step after it, queued behind it
    sampled = wait()                               # -> one token per row
    wait = step.launch_rows(batch.items)           # short prefill chunks, a row a token (or None)
    sampled = step.sample(logits, sampling_seqs)   # any other step's logits, the same sampler

A step writes its inputs into a pinned host buffer (step_buffers.py), copies it to the device
once, runs the model and samples on the device without a host synchronization, and copies the
sampled ids (and logprobs) back once, to a pinned host buffer of its own. A step launched with
`feed` is scheduled ahead: each of its sequences is one token past what the host knows of it,
and its input token is the one the step launched just before sampled for it (row `feed[i]`),
read on the device: the host need not wait for a step before queuing the next.

With graphs (cuda_graphs.py) the forward and the sampler are replayed per batch-size bucket,
padded with a dummy sequence; without them the same code runs eagerly, unpadded, and on the
CPU gives today's step bit for bit (same ops, same shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seqs
from dataclasses import dataclass

import torch

from peftserve.adapters.slots import AdapterHook, DeviceSlots, ModuleKey
from peftserve.adapters.token_slot_hook import TokenSlotHook
from peftserve.engine.device_sampler import SamplingColumns, request_seed, sample_on_device
from peftserve.engine.scheduler import ScheduledSeq
from peftserve.engine.sequence import Sequence
from peftserve.engine.step_buffers import BlockTableRows, StepBuffers
from peftserve.kernels import build_segment_meta
from peftserve.layers.attention import AttentionMetadata
from peftserve.layers.linear import DeltaHook
from peftserve.models.llama import LlamaModel, StepContext


@dataclass(frozen=True)
class StaticStepOptions:
    max_rows: int  # the most sequences a step samples for (max_num_seqs)
    max_blocks: int  # KV blocks of the longest sequence (block-table width of an eager step)
    # block-table width of a captured step: contexts up to graph_blocks * block_size replay a
    # graph, longer ones run eagerly (a wider graph would launch attention over every split)
    graph_blocks: int
    engine_seed: int = 0  # seeds the streams of requests without a seed
    graph_sizes: tuple[int, ...] = ()  # batch-size buckets captured as CUDA graphs
    prefill_rows: str = "off"  # config.PREFILL_ROWS: steps with prefill chunks as rows
    lora_overlap: str = "off"  # config.LORA_OVERLAP: LoRA work beside the base matmuls


@dataclass(frozen=True)
class SampledTokens:
    """One token per sampling sequence of the step, in the step's item order."""

    tokens: list[int]
    logprobs: list[float] | None  # None when no sequence asked for them


class StaticDecodeStep:
    def __init__(
        self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, scratch_block: int,
        slots: DeviceSlots | None, options: StaticStepOptions,
    ) -> None:  # fmt: skip
        self.model, self.kv_cache, self.slots = model, kv_cache, slots
        self.block_size, self.options = block_size, options
        self.scratch_slot = scratch_block * block_size
        rows, dev, vocab = options.max_rows, model.device, model.shape.vocab
        self.buffers = StepBuffers(rows, options.max_blocks, dev, pin=model.backend.captures_graphs)
        self.tables = BlockTableRows(rows)
        # Static outputs: a captured forward writes the logits here, a captured sampler reads
        # them and writes [token, logprob bits] per row.
        self.logits = torch.zeros(rows, vocab, dtype=torch.float32, device=dev)
        self.out = torch.zeros(2, rows, dtype=torch.int32, device=dev)
        # the sampled ids of the step before, which a step scheduled ahead feeds (a capture
        # before its upload may overwrite self.out)
        self.fed = torch.zeros(rows, dtype=torch.int64, device=dev)
        # each step's results, copied back from self.out in the host buffer's turn, and on a
        # GPU the event that says they are there
        pin = model.backend.captures_graphs
        self.host_out = [torch.zeros(2, rows, dtype=torch.int32, pin_memory=pin)
                         for _ in range(2)]  # fmt: skip
        self.copied = [torch.cuda.Event() for _ in range(2)] if dev.type == "cuda" else None
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=dev)  # penalty histories
        self.row_ids = torch.arange(rows, device=dev)
        self.ctx_positions = torch.arange(options.max_blocks * block_size, device=dev)
        # Adapter deltas by per-token slot (graph-safe) rather than by host-built segments
        # (today's ops, bit-equal on the CPU). On where graphs are captured, also when they
        # are turned off (the same ops either way); tests turn it on on the CPU.
        self.token_slot_deltas = model.backend.captures_graphs
        # the stream a LoRA's first half runs on beside its base matmul (options.lora_overlap)
        self.side_stream = (torch.cuda.Stream(dev)
                            if options.lora_overlap != "off" and dev.type == "cuda" else None)
        self.graphs = None  # cuda_graphs.DecodeGraphs once captured

    # --- host side: fill the buffers -------------------------------------------------------

    def _fill_sampling(self, seqs: Seqs[Sequence], ahead: int = 0) -> tuple[bool, bool]:
        """Rows 0..len(seqs)-1's sampling fields, `ahead` tokens past the sequences' state ->
        (any row draws, any row has a penalty). A list per field, then one conversion: a
        step's host time, before the GPU can start."""
        n, k, engine_seed = self.buffers.np, len(seqs), self.options.engine_seed
        params = [seq.params for seq in seqs]
        temperature = [p.temperature for p in params]
        penalty = [p.repetition_penalty for p in params]
        n["temperature"][:k] = temperature
        n["top_k"][:k] = [p.top_k for p in params]
        n["top_p"][:k] = [p.top_p for p in params]
        n["penalty"][:k] = penalty
        n["seed"][:k] = [request_seed(p.seed, engine_seed, seq.seq_id)
                         for p, seq in zip(params, seqs, strict=True)]  # fmt: skip
        n["counter"][:k] = [len(seq.token_ids) + ahead for seq in seqs]
        return any(t > 0 for t in temperature), any(r != 1.0 for r in penalty)

    def _fill_rows(
        self, seqs: Seqs[Sequence], pos: list[int], width: int, feed: Seqs[int] | None = None
    ) -> None:
        """Row i: sequence seqs[i]'s token at position pos[i], its context up to it; `feed`:
        the step is scheduled ahead (launch()), its input tokens read on the device."""
        n, bs, k = self.buffers.np, self.block_size, len(seqs)
        if feed is None:
            n["input_ids"][:k] = [seq.token_ids[p] for seq, p in zip(seqs, pos, strict=True)]
        else:  # on the device, after the upload
            n["feed"][:k] = feed
        n["positions"][:k] = pos
        n["slot_mapping"][:k] = [seq.block_table[p // bs] * bs + p % bs
                                 for seq, p in zip(seqs, pos, strict=True)]  # fmt: skip
        n["context_lens"][:k] = n["positions"][:k] + 1
        n["token_slot"][:k] = [seq.slot for seq in seqs]
        tables = self.buffers.host_block_tables(k, width)
        tables[:] = 0
        for i, seq in enumerate(seqs):
            blocks = self.tables.row(seq.seq_id, seq.block_table)[:width]
            tables[i, : len(blocks)] = blocks
        self.tables.keep(seq.seq_id for seq in seqs)

    def _load_histories(self, seqs: Seqs[Sequence], ahead: bool = False) -> None:
        """The penalty rows' histories into `seen` (a second copy, only when a row asks). A
        step scheduled ahead adds each row's input token, known only on the device (every
        row's: `seen` counts only where the row has a penalty)."""
        rows: list[int] = []
        ids: list[int] = []
        for i, seq in enumerate(seqs):
            if seq.params.repetition_penalty != 1.0:
                hist = seq.token_ids[seq.num_virtual :]
                rows += [i] * len(hist)
                ids += hist
        pin = self.seen.is_cuda  # (from pageable memory the copy would wait for the device)
        index = torch.tensor([rows, ids], dtype=torch.long, pin_memory=pin)
        index = index.to(self.seen.device, non_blocking=pin)
        n = len(seqs)
        self.seen[:n].zero_()
        self.seen[index[0], index[1]] = True
        if ahead:
            self.seen[self.row_ids[:n], self.buffers.dev["input_ids"][:n]] = True

    def _copy_out(self, turn: int) -> None:
        """The step's one device->host copy (self.out is a few hundred bytes), queued."""
        self.host_out[turn].copy_(self.out, non_blocking=self.host_out[turn].is_pinned())
        if self.copied is not None:
            self.copied[turn].record()

    def _results(self, seqs: Seqs[Sequence], turn: int) -> SampledTokens:
        """The tokens of the step that filled turn `turn`, once they are back."""
        if self.copied is not None:
            self.copied[turn].synchronize()
        host = self.host_out[turn][:, : len(seqs)]
        logprobs = None
        if any(s.params.logprobs for s in seqs):
            logprobs = host[1].view(torch.float32).tolist()
        return SampledTokens(host[0].tolist(), logprobs)

    # --- device side: what a graph captures --------------------------------------------------

    def forward(self, rows: int, width: int, hook: DeltaHook | None) -> None:
        """The model over rows 0..rows-1 of the buffers -> self.logits[:rows]. No host sync."""
        d, model = self.buffers.dev, self.model
        lens = d["context_lens"][:rows]
        mask = None  # the mask of real positions, only for a backend that reads it
        if not model.backend.reads_decode_lens:
            mask = self.ctx_positions[: width * self.block_size][None, :] < lens[:, None]
            mask = mask[:, None, None, None, :]
        meta = AttentionMetadata(
            slot_mapping=d["slot_mapping"][:rows],
            num_decodes=rows,
            block_size=self.block_size,
            decode_blocks=self.buffers.block_tables(rows, width),
            decode_mask=mask,
            decode_lens=lens,
            prefills=(),
        )
        cos, sin = model.rotary.cos_sin(d["positions"][:rows], model.dtype)
        h = model(model.embed_tokens(d["input_ids"][:rows]), self.kv_cache,
                  StepContext(attn=meta, cos=cos, sin=sin, hook=hook))  # fmt: skip
        model.logits(h, out=self.logits[:rows])

    def sample_rows(self, rows: int, draws: bool, penalty: bool) -> None:
        """Samples rows 0..rows-1 of self.logits -> self.out[:, :rows]. No host sync."""
        d = self.buffers.dev
        cols = SamplingColumns(
            temperature=d["temperature"][:rows], top_k=d["top_k"][:rows], top_p=d["top_p"][:rows],
            penalty=d["penalty"][:rows], seed=d["seed"][:rows], counter=d["counter"][:rows],
        )  # fmt: skip
        seen = self.seen[:rows] if penalty else None
        token, logprob = sample_on_device(self.logits[:rows], cols, seen, draws)
        self.out[0, :rows].copy_(token)
        self.out[1, :rows].copy_(logprob.view(torch.int32))

    def hook(self, rows: int, seqs: Seqs[Sequence] | None,
             modules: frozenset[ModuleKey] | None = None) -> DeltaHook | None:  # fmt: skip
        """The step's adapter deltas. `seqs`: the rows' sequences, or None for a captured
        step (its hook covers the allocated slot buffers of `modules`, None: all of them,
        whatever the rows hold)."""
        slots = self.slots
        if slots is None:
            return None
        token_slot = self.buffers.dev["token_slot"][:rows]
        if seqs is None or self.token_slot_deltas:
            if seqs is not None and all(s.slot < 0 for s in seqs):
                return None
            return TokenSlotHook(slots, token_slot, modules, self.options.lora_overlap,
                                 self.side_stream)  # fmt: skip
        if all(s.slot < 0 for s in seqs):
            return None
        acts = {slots.slot_activation.get(s.slot) for s in seqs}
        meta = build_segment_meta(token_slot.to(torch.int32))
        return AdapterHook(slots, meta, tuple(sorted(a for a in acts if a)))

    # --- a step --------------------------------------------------------------------------

    @torch.inference_mode()
    def launch(
        self, decodes: Seqs[ScheduledSeq], feed: Seqs[int] | None = None
    ) -> Callable[[], SampledTokens]:
        """A decode-only step, one new token for each of `decodes` (1 <= len <= max_rows), up
        to its device work queued -> the function that waits for its tokens. The steps
        launched are waited for in order, and at most two are in flight: a step's upload reads
        the page-locked buffer it filled as the device gets to it.

        `feed`: the step is scheduled ahead, behind the step launched just before (not yet
        waited for): each sequence is one token past its state on the host (its KV block for
        that position allocated), and row i's input token is the one that step sampled at its
        row feed[i]."""
        seqs = [d.seq for d in decodes]
        ahead = 0 if feed is None else 1
        pos = [s.num_computed_tokens + ahead for s in seqs]
        turn = self.buffers.next_turn()
        if feed is not None:  # before a capture in prepare() can overwrite self.out
            self.fed.copy_(self.out[0])
        rows, adapters = self._plan(seqs, max(pos) + 1)
        self._queue(seqs, pos, rows, adapters, turn, feed)
        return lambda: self._results(seqs, turn)

    @torch.inference_mode()
    def launch_rows(self, items: Seqs[ScheduledSeq]) -> Callable[[], SampledTokens] | None:
        """A step with prefill chunks (and decodes) run as a decode step's rows: one row a
        token, at its position, its context every position up to it. Each layer writes every
        row's K/V before its attention reads any, so a chunk's rows see each other causally,
        as the classic prefill does; prefix and prompt tuning's virtual tokens are already in
        the sequence's blocks. The sampler runs on every row and the step returns the token
        of each sampling item's last row, in `items` order. Short prompts then replay the
        captured graphs instead of a prefill's eager kernels (a cold request's first token).
        None, and nothing done, where options.prefill_rows does not ask for it: "graphs"
        runs only a step that replays a graph, in half precision."""
        mode = self.options.prefill_rows
        if mode == "off" or (mode == "graphs" and self.model.dtype == torch.float32):
            return None
        if sum(item.num_new_tokens for item in items) > self.options.max_rows:
            return None  # (every bucket is at most max_rows)
        seqs: list[Sequence] = []
        pos: list[int] = []
        picks: list[int] = []
        for item in items:
            start = item.seq.num_computed_tokens
            seqs += [item.seq] * item.num_new_tokens
            pos += range(start, start + item.num_new_tokens)
            if item.samples:
                picks.append(len(pos) - 1)
        rows, adapters = self._plan(seqs, max(pos) + 1)
        if rows is None and mode == "graphs":
            return None
        turn = self.buffers.next_turn()
        self._queue(seqs, pos, rows, adapters, turn)

        def results() -> SampledTokens:
            got = self._results(seqs, turn)
            logprobs = None if got.logprobs is None else [got.logprobs[i] for i in picks]
            return SampledTokens([got.tokens[i] for i in picks], logprobs)

        return results

    def _plan(
        self, seqs: Seqs[Sequence], ctx: int
    ) -> tuple[int | None, frozenset[ModuleKey] | None]:
        """The bucket a step of these rows replays (None: it runs eagerly), with `ctx` its
        longest context, and the modules its rows' adapters have deltas on (None: no adapter,
        or eager): the graph of those alone skips the kernels that would add only zeros for
        these rows. A capture (rare) fills the buffers: before the step fills them."""
        graphs = self.graphs
        if graphs is None or ctx > self.options.graph_blocks * self.block_size:
            return None, None
        rows = graphs.bucket(len(seqs))
        if rows is None:
            return None, None
        adapters = None
        if self.slots is not None:
            slots = frozenset(s.slot for s in seqs if s.slot >= 0)
            adapters = self.slots.modules_of(slots) if slots else None
        if not graphs.prepare(rows, adapters):  # False: this step runs eagerly
            return None, None
        return rows, adapters

    def _queue(
        self, seqs: Seqs[Sequence], pos: list[int], rows: int | None,
        adapters: frozenset[ModuleKey] | None, turn: int, feed: Seqs[int] | None = None,
    ) -> None:  # fmt: skip
        """Fills the buffers with row i = seqs[i] at pos[i], uploads them and queues the step:
        replays bucket `rows` (_plan), or eagerly, unpadded, the block tables as wide as these
        rows need; then the one copy of its results out to host buffer `turn`."""
        n = len(seqs)
        draws, penalty = self._fill_sampling(seqs, 0 if feed is None else 1)
        width = -(-(max(pos) + 1) // self.block_size)  # eager: unpadded, as wide as needed
        if rows is not None:
            width = self.options.graph_blocks
        self._fill_rows(seqs, pos, width, feed)
        if rows is not None:
            self.buffers.pad(n, rows, width, self.scratch_slot, self.block_size)
        self.buffers.upload(rows or n, width)
        if feed is not None:
            d = self.buffers.dev
            d["input_ids"][:n].copy_(self.fed.index_select(0, d["feed"][:n]))
        if penalty:
            self._load_histories(seqs, ahead=feed is not None)
        if rows is None:
            self.forward(n, width, self.hook(n, seqs))
            self.sample_rows(n, draws, penalty)
        else:
            assert self.graphs is not None
            self.graphs.replay(rows, adapters, full=draws or penalty)
        self._copy_out(turn)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: Seqs[Sequence]) -> SampledTokens:
        """The sampler over another step's logits ([len(seqs), vocab] fp32), eagerly."""
        n = len(seqs)
        turn = self.buffers.next_turn()
        draws, penalty = self._fill_sampling(seqs)
        self.buffers.upload()
        if penalty:
            self._load_histories(seqs)
        self.logits[:n].copy_(logits)
        self.sample_rows(n, draws, penalty)
        self._copy_out(turn)
        return self._results(seqs, turn)
