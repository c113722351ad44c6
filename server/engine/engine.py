"""The offline engine: add requests, step (schedule -> run -> sample -> postprocess)."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from peftserve.config import EngineConfig
from peftserve.engine.block_manager import BlockManager
from peftserve.engine.detokenizer import Detokenizer
from peftserve.engine.model_runner import ModelRunner
from peftserve.engine.request import Request, RequestOutput, Timings
from peftserve.engine.sampler import sample
from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.scheduler import ScheduledBatch, ScheduledSeq, Scheduler
from peftserve.engine.sequence import FinishReason, Sequence
from peftserve.errors import InvalidRequest, Overloaded
from peftserve.models.loader import load_config, load_state_dict, load_tokenizer, resolve_model_dir
from peftserve.models.llama import LlamaModel
from peftserve.platform import resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class _Tracked:
    seq: Sequence
    detok: Detokenizer
    emitted_tokens: int = 0


class Engine:
    def __init__(self, config: EngineConfig, model: LlamaModel, tokenizer, eos_token_ids: set[int]) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        per_block = ModelRunner.cache_bytes_per_block(model, config.block_size)
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_bytes // per_block)
        capacity = num_blocks * config.block_size
        # A lone sequence always fits, so preemption can never starve the last one running.
        self.max_model_len = min(config.max_model_len or model.shape.max_positions,
                                 model.shape.max_positions, capacity)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        self._tracked: dict[str, _Tracked] = {}
        self._seq_ids = itertools.count()
        self.steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        model_dir = resolve_model_dir(config.model, config.cache_dir)
        hf_config = load_config(model_dir)
        t0 = time.perf_counter()
        model = LlamaModel(hf_config, load_state_dict(model_dir), dtype, device)
        tokenizer = load_tokenizer(model_dir)
        log.info("loaded %s (%s, %s) in %.2fs", model_dir, dtype, device, time.perf_counter() - t0)
        eos = hf_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        return cls(config, model, tokenizer, eos_ids)

    # --- requests ---------------------------------------------------------------------------

    def tokenize(self, req: Request) -> list[int]:
        given = [x is not None for x in (req.prompt, req.messages, req.prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequest("give exactly one of prompt, messages, prompt_token_ids")
        if req.prompt is not None:
            ids = self.tokenizer(req.prompt)["input_ids"] if req.prompt else []
        elif req.messages is not None:
            if not req.messages:
                raise InvalidRequest("messages is empty")
            try:
                ids = self.tokenizer.apply_chat_template(
                    list(req.messages), add_generation_prompt=True, tokenize=True,
                    return_dict=True)["input_ids"]
            except Exception as e:  # the template's own message says what is wrong
                raise InvalidRequest(f"chat template failed: {e}") from e
        else:
            ids = list(req.prompt_token_ids or ())
            vocab = self.model.shape.vocab
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequest(f"prompt_token_ids must be in [0, {vocab})")
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return list(ids)

    def validate(self, prompt_len: int, req: Request) -> None:
        if req.request_id in self._tracked:
            raise InvalidRequest(f"request id {req.request_id!r} is already in use")
        if prompt_len >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {prompt_len} tokens; this server's context is "
                f"{self.max_model_len} tokens, leaving no room to generate")
        if req.params.max_new_tokens > self.config.max_new_tokens_limit:
            raise InvalidRequest(f"max_new_tokens {req.params.max_new_tokens} exceeds the limit "
                                 f"{self.config.max_new_tokens_limit}")

    def add_request(self, req: Request) -> Sequence:
        """Validates, tokenizes and queues a request. Raises InvalidRequest or Overloaded and
        leaves the engine unchanged when it does."""
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise Overloaded(f"the waiting queue is full ({self.config.max_waiting} requests)")
        ids = self.tokenize(req)
        self.validate(len(ids), req)
        seq = Sequence(next(self._seq_ids), req.request_id, ids, req.params,
                       eos_token_ids=frozenset() if req.params.ignore_eos else self.eos_token_ids)
        self._tracked[req.request_id] = _Tracked(
            seq, Detokenizer(self.tokenizer, req.params.stop, req.params.skip_special_tokens))
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request at once and frees its KV blocks. None if it is not known."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return None
        self.scheduler.finish(tracked.seq, FinishReason.ABORT)
        return self._output(tracked, [], "", final=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not len(batch):
            return []
        logits = self.runner.run(batch)
        self.scheduler.postprocess(batch)
        self.steps += 1
        return self._process_samples(batch, logits)

    def _process_samples(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[RequestOutput]:
        sampling = [item.seq for item in batch.items if item.seq.num_uncomputed == 0]
        if not sampling:
            return []
        tokens, logprobs = sample(logits, [s.params for s in sampling],
                                  [s.token_ids for s in sampling], [s.generator for s in sampling])
        now = time.monotonic()
        outputs = []
        for i, seq in enumerate(sampling):
            token = tokens[i]
            seq.token_ids.append(token)
            if logprobs is not None and seq.params.logprobs:
                seq.output_logprobs.append(logprobs[i])
            if seq.first_token_time is None:
                seq.first_token_time = now
            outputs.append(self._after_token(seq, token))
        return outputs

    def _after_token(self, seq: Sequence, token: int) -> RequestOutput:
        tracked = self._tracked[seq.request_id]
        reason = None
        if token in seq.eos_token_ids or token in seq.params.stop_token_ids:
            reason = FinishReason.STOP
        elif seq.num_output_tokens >= seq.params.max_new_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = FinishReason.LENGTH
        ids = seq.output_token_ids
        if reason is FinishReason.STOP:
            ids = ids[:-1]  # the stop token is not part of the text
        delta, stopped = tracked.detok.update(ids, final=reason is not None)
        if stopped:
            reason = FinishReason.STOP
        new_tokens = seq.output_token_ids[tracked.emitted_tokens:]
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._tracked[seq.request_id]
        return self._output(tracked, new_tokens, delta, final=reason is not None)

    def _output(self, tracked: _Tracked, new_tokens: list[int], text: str, final: bool) -> RequestOutput:
        seq = tracked.seq
        first = tracked.emitted_tokens == 0 and bool(new_tokens)
        logprobs = None
        if seq.params.logprobs:
            logprobs = seq.output_logprobs[tracked.emitted_tokens:tracked.emitted_tokens + len(new_tokens)]
        tracked.emitted_tokens += len(new_tokens)
        timings = None
        if first or final:
            now = time.monotonic()
            start = seq.first_scheduled_time or now
            timings = Timings(
                queue_s=start - seq.arrival_time,
                ttft_s=None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time,
                e2e_s=now - seq.arrival_time if final else None)
        return RequestOutput(
            request_id=seq.request_id, text=text, token_ids=new_tokens, logprobs=logprobs,
            finished=final, finish_reason=seq.finish_reason, prompt_tokens=seq.prompt_len,
            completion_tokens=seq.num_output_tokens, timings=timings)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of `token_ids` ([n, vocab] fp32), for evaluation and
        parity checks. Runs alone: call it only while no request is in flight."""
        if self.has_unfinished():
            raise RuntimeError("score() needs an idle engine")
        if not 0 < len(token_ids) <= self.max_model_len:
            raise InvalidRequest(f"score() takes 1..{self.max_model_len} tokens")
        seq = Sequence(-1, "score", list(token_ids), SamplingParams(max_new_tokens=1))
        self.block_manager.allocate(seq, len(token_ids))
        try:
            batch = ScheduledBatch([], [ScheduledSeq(seq, len(token_ids))], [])
            with torch.inference_mode():
                return self.model.logits(self.runner.hidden_states(batch))
        finally:
            self.block_manager.free(seq)

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
