"""The engine: input processing (`inputs`), then a step loop (schedule -> place adapters -> run
-> sample), then output processing (`outputs`). Engine thread only; `AsyncEngine` drives it for
the server."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import torch

from peftserve.adapters.loader import AdapterLimits
from peftserve.adapters.manager import AdapterManager
from peftserve.adapters.registry import AdapterRegistry
from peftserve.adapters.slots import DeviceSlots
from peftserve.config import EngineConfig
from peftserve.engine.block_manager import BlockManager
from peftserve.engine.inputs import InputProcessor
from peftserve.engine.model_runner import ModelRunner, static_options
from peftserve.engine.outputs import OutputProcessor
from peftserve.engine.request import Request, RequestOutput
from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.scheduler import ScheduledBatch, ScheduledSeq, Scheduler
from peftserve.engine.sequence import FinishReason, SeqStatus, Sequence
from peftserve.engine.static_step import SampledTokens
from peftserve.engine.stats import EngineInfo, EngineStats
from peftserve.errors import InvalidRequest, Overloaded, shorten
from peftserve.layers.backend import Backend, select_backend
from peftserve.models.llama import LlamaModel
from peftserve.models.loader import load_config, load_state_dict, load_tokenizer, resolve_model_dir
from peftserve.platform import resolve_device, resolve_dtype, use_device

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self, config: EngineConfig, model: LlamaModel, tokenizer, eos_token_ids: set[int]
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        per_block = ModelRunner.cache_bytes_per_block(model, config.block_size)
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_bytes // per_block)
        capacity = num_blocks * config.block_size
        # A lone sequence always fits, so preemption can never starve the last one running.
        self.max_model_len = min(
            config.max_model_len or model.shape.max_positions, model.shape.max_positions, capacity
        )
        model.rotary.build(self.max_model_len, model.dtype)
        self.inputs = InputProcessor(
            tokenizer, model.shape.vocab, self.max_model_len, config.max_prompt_tokens,
            config.max_new_tokens_limit,
        )
        self.outputs = OutputProcessor(tokenizer, self.max_model_len)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.slots = DeviceSlots(
            model.shape, config.max_loras, config.max_lora_rank, model.dtype, model.device,
            model.backend,
        )
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.slots,
                                  static_options(config, model, self.max_model_len))  # fmt: skip
        self.registry = AdapterRegistry(
            model.shape,
            AdapterLimits(config.max_lora_rank, config.max_virtual_tokens),
            config.max_cpu_adapters,
        )
        self.adapters = AdapterManager(self.registry, self.slots, self.block_manager, self.runner)
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            admission=self.adapters,
        )
        self._last_batch = (0, 0)
        self._seq_ids = itertools.count()
        self.steps = 0
        # sequences whose output for their newest token is made during the next step (overlap)
        self._pending: list[Sequence] = []
        # the decode step queued on the device behind the last one (schedule ahead): its batch
        # and the wait for its tokens
        self._ahead: tuple[ScheduledBatch, Callable[[], SampledTokens]] | None = None
        self.ahead_failed = False  # a step ahead failed to launch: no more are tried
        self.steps_ahead = 0
        self.ahead_rows_dropped = 0

    @classmethod
    def from_config(cls, config: EngineConfig, backend: Backend | None = None) -> Engine:
        """The engine `config` describes; `backend` replaces the one config.backend names
        (tests pass one to compare backends)."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = resolve_device(config.device)
        use_device(device)  # before anything runs there: the model's load, the graphs' capture
        dtype = resolve_dtype(config.dtype, device)
        backend = backend or select_backend(config.backend, device)
        model_dir = resolve_model_dir(config.model, config.cache_dir)
        hf_config = load_config(model_dir)
        t0 = time.perf_counter()
        model = LlamaModel(hf_config, load_state_dict(model_dir), dtype, device, backend,
                           config.weights, config.screened_head)
        tokenizer = load_tokenizer(model_dir)
        log.info("loaded %s (%s, %s, %s backend) in %.2fs", model_dir, dtype, device, backend.name,
                 time.perf_counter() - t0)  # fmt: skip
        eos = hf_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        engine = cls(config, model, tokenizer, eos_ids)
        engine.bind_thread()  # this thread runs the steps unless AsyncEngine.start binds its own
        return engine

    def bind_thread(self) -> None:
        """Fixes the calling thread's torch thread count (config.num_threads, else the
        process's) for every parallel op the steps run on it (Backend.bind_thread), and makes
        the engine's GPU, if it has one, the thread's current device: the thread that runs the
        steps calls this before its first step."""
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        use_device(self.model.device)
        self.model.backend.bind_thread()

    # --- requests ---------------------------------------------------------------------------

    def add_request(self, req: Request) -> Sequence:
        """Validates, tokenizes and queues a request. Raises InvalidRequest, AdapterNotFound or
        Overloaded and leaves the engine unchanged when it does."""
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise Overloaded(f"the waiting queue is full ({self.config.max_waiting} requests)")
        if req.request_id in self.outputs:
            raise InvalidRequest(f"request id {shorten(req.request_id)} is already in use")
        entry = self.registry.get(req.adapter) if req.adapter else None
        prompt = self.inputs.process(req, entry)
        seq = Sequence(
            next(self._seq_ids),
            req.request_id,
            prompt.token_ids,
            req.params,
            eos_token_ids=frozenset() if req.params.ignore_eos else self.eos_token_ids,
            prefix_len=prompt.prefix_len,
            num_virtual=prompt.num_virtual,
            arrival_time=time.monotonic() if req.arrival_time is None else req.arrival_time,
        )
        if entry is not None:
            self.adapters.attach(seq, entry)
        self.outputs.track(seq)
        self.scheduler.add(seq)
        return seq

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self.adapters.detach(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request at once and frees its KV blocks. None if it is not known."""
        seq = self.outputs.get(request_id)
        if seq is None:
            return None
        self._finish(seq, FinishReason.ABORT)
        return self.outputs.finished(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the step ---------------------------------------------------------------------------

    def step(
        self, emit: Callable[[list[RequestOutput]], None] | None = None
    ) -> list[RequestOutput]:
        """One step -> the outputs it made. Where decode steps replay CUDA graphs:
        - (config.overlap_outputs) a continuing sequence's output for its newest token is made
          during the next step, while the device runs it (its text is the host's largest part
          of a step): those outputs are passed to `emit` as soon as they are made, or returned
          first. A request's outputs keep their order either way.
        - (config.schedule_ahead) the next decode step is queued on the device before this
          one's tokens are back, when it is known without them (_launch_ahead): the device
          need not wait for the host between steps. The next call's step is that one."""
        taken = self._take_ahead()
        failed: list[RequestOutput] = []
        if taken is None:
            batch = self._schedule()
            failed = [self._fail(seq) for seq in batch.failed]
            self._last_batch = (len(batch), batch.num_tokens)
            if not len(batch):
                return self._pending_outputs(emit) + failed
            wait, rows = self.runner.launch(batch), None
        else:
            batch, wait, rows = taken
            self._last_batch = (len(batch), batch.num_tokens)
        self._ahead = self._launch_ahead(batch, rows)
        ready = self._pending_outputs(emit)  # while the device works
        sampled = wait()
        self.scheduler.postprocess(batch)
        self.steps += 1
        return ready + failed + self._process_samples(batch, sampled)

    def _pending_outputs(
        self, emit: Callable[[list[RequestOutput]], None] | None
    ) -> list[RequestOutput]:
        """The outputs the last step left to this one, passed to `emit` (-> none) or returned;
        a request that ended since (aborted, failed) gets none."""
        pending, self._pending = self._pending, []
        outputs = [self.outputs.on_token(seq, None)[0] for seq in pending
                   if self.outputs.get(seq.request_id) is seq]  # fmt: skip
        if emit is None or not outputs:
            return outputs
        emit(outputs)
        return []

    def _take_ahead(
        self,
    ) -> tuple[ScheduledBatch, Callable[[], SampledTokens], list[int]] | None:
        """The step the last one queued ahead -> its batch less the sequences that ended
        since (a stop token or string, an abort), the wait for their tokens, and each one's
        row in that step; None when there is none, or when none of its sequences goes on (its
        tokens are waited for and dropped)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        batch, wait = ahead
        rows = [i for i, item in enumerate(batch.decodes) if item.seq.status is SeqStatus.RUNNING]
        self.ahead_rows_dropped += len(batch.decodes) - len(rows)
        if not rows:
            wait()
            return None
        if len(rows) == len(batch.decodes):
            return batch, wait, rows

        def kept() -> SampledTokens:
            s = wait()
            logprobs = None if s.logprobs is None else [s.logprobs[i] for i in rows]
            return SampledTokens([s.tokens[i] for i in rows], logprobs)

        return ScheduledBatch([batch.decodes[i] for i in rows], [], [], []), kept, rows

    def _launch_ahead(
        self, batch: ScheduledBatch, rows: list[int] | None
    ) -> tuple[ScheduledBatch, Callable[[], SampledTokens]] | None:
        """Queues the next decode step behind `batch` (just launched; `rows`: each decode's
        row in it, None: its own order) before its tokens are back, when the scheduler's next
        step is known without them: every running sequence decodes in `batch`, no waiting
        request could be admitted (there is no room, or its adapter is still loading), and each
        sequence's next KV slot is free to take (a repetition penalty reads the newest token on
        the device). A sequence that reaches its length in `batch` is left out; one that stops
        on a token or a string there is known only after, and its row of the step ahead is
        dropped (_take_ahead). -> the step's batch and its wait; None: the next step is
        scheduled after this one's tokens, as without."""
        if not (self.config.schedule_ahead and self.runner.replays_graphs) or self.ahead_failed:
            return None
        sched = self.scheduler
        if batch.prefills or len(batch.decodes) != len(sched.running):
            return None  # a prefill, or a sequence left out for the token budget
        if len(sched.running) < sched.max_num_seqs and any(
            s.adapter is None or not self.registry.load_in_flight(s.adapter) for s in sched.waiting
        ):
            return None
        decodes: list[ScheduledSeq] = []
        feed: list[int] = []
        for item, row in zip(batch.decodes, range(len(batch.decodes)) if rows is None else rows,
                             strict=True):  # fmt: skip
            if not self.outputs.length_reached(item.seq, 1):
                decodes.append(ScheduledSeq(item.seq, 1))
                feed.append(row)
        blocks = self.block_manager
        need = [blocks.blocks_needed(d.seq, d.seq.num_computed_tokens + 2) for d in decodes]
        if not decodes or not blocks.can_allocate(sum(need)):
            return None  # (the scheduler preempts)
        for d, n in zip(decodes, need, strict=True):
            if n:  # (most steps: none)
                blocks.allocate(d.seq, d.seq.num_computed_tokens + 2)
        try:
            wait = self.runner.launch_ahead(decodes, feed)
        except Exception as e:  # a bug on some device: serve on, each step after the last
            log.warning("a decode step scheduled ahead failed to launch; steps are scheduled "
                        "after the last one's tokens from now on: %s: %s",
                        type(e).__name__, e)  # fmt: skip
            self.ahead_failed = True
            return None  # (the blocks it took are the ones the next step takes)
        self.steps_ahead += 1
        return ScheduledBatch(decodes, [], [], []), wait

    def _schedule(self) -> ScheduledBatch:
        """The scheduler's decision, then the device work it needs (adapter slots, prefix KV);
        a sequence whose adapter could not be placed leaves the batch for `failed`."""
        batch = self.scheduler.schedule()
        unplaced = self.adapters.prepare(item.seq for item in batch.items)
        return batch.without(unplaced) if unplaced else batch

    @property
    def last_batch_size(self) -> int:
        return self._last_batch[0]

    @property
    def last_batch_tokens(self) -> int:
        """The last step's tokens: its decodes' one each and its prefill chunks'."""
        return self._last_batch[1]

    def _fail(self, seq: Sequence) -> RequestOutput:
        self._finish(seq, FinishReason.ABORT)
        out = self.outputs.finished(seq.request_id, error=seq.error)
        assert out is not None
        return out

    def _process_samples(
        self, batch: ScheduledBatch, sampled: SampledTokens
    ) -> list[RequestOutput]:
        sampling = [item.seq for item in batch.items if item.seq.num_uncomputed == 0]
        if not sampling:
            return []
        tokens, logprobs = sampled.tokens, sampled.logprobs
        now = time.monotonic()
        outputs = []
        # the next step makes the outputs of sequences that go on (and need no text to know)
        overlap = self.config.overlap_outputs and self.runner.replays_graphs
        for i, seq in enumerate(sampling):
            token = tokens[i]
            seq.token_ids.append(token)
            if logprobs is not None and seq.params.logprobs:
                seq.output_logprobs.append(logprobs[i])
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self.outputs.stop_reason(seq, token)
            if overlap and reason is None and not seq.params.stop:
                self._pending.append(seq)
                continue
            out, done = self.outputs.on_token(seq, reason)
            if done:
                assert seq.finish_reason is not None
                self._finish(seq, seq.finish_reason)
            outputs.append(out)
        return outputs

    def score(self, token_ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """Logits at every position of `token_ids` under `adapter` ([n, vocab] fp32, on the
        CPU), for evaluation and parity checks. Runs alone: call it only while no request is in
        flight."""
        if self.has_unfinished():
            raise RuntimeError("score() needs an idle engine")
        if len(token_ids) > self.config.max_num_batched_tokens:
            raise InvalidRequest(
                f"score() takes at most {self.config.max_num_batched_tokens} tokens"
            )
        rid = f"score-{next(self._seq_ids)}"
        self.add_request(
            Request(
                rid,
                prompt_token_ids=tuple(token_ids),
                adapter=adapter,
                params=SamplingParams(max_new_tokens=1),
            )
        )
        try:
            batch = self._schedule()
            while not len(batch) and not batch.failed:  # the adapter is loading
                time.sleep(0.001)
                batch = self._schedule()
            if batch.failed:
                raise InvalidRequest(batch.failed[0].error or "the adapter failed to load")
            with torch.inference_mode():
                h = self.runner.hidden_states(batch, self.runner.adapter_hook(batch))
                return self.model.logits(h).cpu()
        finally:
            self.abort(rid)

    def stats(self) -> EngineStats:
        sched = self.scheduler
        names = lambda seqs: tuple(sorted({s.adapter.name for s in seqs if s.adapter is not None}))  # noqa: E731
        reg, mgr = self.registry, self.adapters
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            batch_size=self._last_batch[0],
            batch_tokens=self._last_batch[1],
            kv_blocks_used=self.block_manager.num_used,
            kv_blocks_total=self.block_manager.num_blocks,
            running_adapters=names(sched.running),
            waiting_adapters=names(sched.waiting),
            max_loras=self.config.max_loras,
            adapters_resident=reg.resident_counts(),
            adapter_loads=reg.loads,
            adapter_load_seconds=reg.load_seconds,
            cache_hits=mgr.hits,
            cache_misses=mgr.misses,
            cache_evictions=mgr.evictions + reg.host_evictions,
            steps=self.steps,
            steps_ahead=self.steps_ahead,
            ahead_rows_dropped=self.ahead_rows_dropped,
        )

    def info(self) -> EngineInfo:
        return EngineInfo(
            model=self.config.model, dtype=str(self.model.dtype).removeprefix("torch."),
            device=str(self.model.device), kernel_backend=self.model.backend.name,
            max_model_len=self.max_model_len, max_prompt_tokens=self.inputs.max_prompt_tokens,
            max_new_tokens=self.config.max_new_tokens_limit, max_waiting=self.config.max_waiting,
            max_num_seqs=self.config.max_num_seqs, stats=self.stats(),
        )

    # --- offline convenience ----------------------------------------------------------------

    def generate(self, requests: list[Request]) -> dict[str, list[RequestOutput]]:
        """Runs the given requests to completion; returns every output, per request id."""
        results: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        for r in requests:
            self.add_request(r)
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].append(out)
        return results
