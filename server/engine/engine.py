"""The offline engine: add requests, step (schedule -> run -> sample -> postprocess)."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from peftserve.adapters.handle import BASE_KIND, AdapterInfo, AdapterKind
from peftserve.adapters.loader import AdapterLimits, LoadedAdapter
from peftserve.adapters.manager import PLACEHOLDER_TOKEN, AdapterManager
from peftserve.adapters.registry import AdapterEntry, AdapterRegistry
from peftserve.adapters.slots import DeviceSlots
from peftserve.config import EngineConfig
from peftserve.engine.block_manager import BlockManager
from peftserve.engine.detokenizer import Detokenizer
from peftserve.engine.model_runner import ModelRunner
from peftserve.engine.request import Request, RequestOutput, Timings
from peftserve.engine.sampler import sample
from peftserve.engine.sampling_params import SamplingParams
from peftserve.engine.scheduler import ScheduledBatch, Scheduler
from peftserve.engine.sequence import FinishReason, Sequence
from peftserve.engine.stats import EngineStats
from peftserve.errors import InvalidRequest, Overloaded, shorten
from peftserve.layers.backend import Backend, select_backend
from peftserve.models.llama import LlamaModel
from peftserve.models.loader import load_config, load_state_dict, load_tokenizer, resolve_model_dir
from peftserve.platform import resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class _Tracked:
    seq: Sequence
    detok: Detokenizer
    emitted_tokens: int = 0


class Engine:
    def __init__(
        self, config: EngineConfig, model: LlamaModel, tokenizer, eos_token_ids: set[int]
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        # No token is longer than the vocabulary's longest entry (byte-level and SentencePiece
        # entries are spelled with at least one character per character of text), so a text
        # longer than `n * max_token_chars` surely has more than n tokens: checked before
        # tokenizing, it keeps a multi-megabyte prompt off this thread.
        self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=1)
        self.eos_token_ids = frozenset(eos_token_ids)
        per_block = ModelRunner.cache_bytes_per_block(model, config.block_size)
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_bytes // per_block)
        capacity = num_blocks * config.block_size
        # A lone sequence always fits, so preemption can never starve the last one running.
        self.max_model_len = min(
            config.max_model_len or model.shape.max_positions, model.shape.max_positions, capacity
        )
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.slots = DeviceSlots(
            model.shape, config.max_loras, config.max_lora_rank, model.dtype, model.device,
            model.backend,
        )
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.slots)
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
        self._tracked: dict[str, _Tracked] = {}
        self._seq_ids = itertools.count()
        self.steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig, backend: Backend | None = None) -> Engine:
        """The engine `config` describes; `backend` replaces the one config.backend names
        (tests pass one to compare backends)."""
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        backend = backend or select_backend(config.backend, device)
        model_dir = resolve_model_dir(config.model, config.cache_dir)
        hf_config = load_config(model_dir)
        t0 = time.perf_counter()
        model = LlamaModel(hf_config, load_state_dict(model_dir), dtype, device, backend)
        tokenizer = load_tokenizer(model_dir)
        log.info("loaded %s (%s, %s, %s backend) in %.2fs", model_dir, dtype, device, backend.name,
                 time.perf_counter() - t0)  # fmt: skip
        eos = hf_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        return cls(config, model, tokenizer, eos_ids)

    # --- requests ---------------------------------------------------------------------------

    def _chat_ids(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        try:
            return list(
                self.tokenizer.apply_chat_template(
                    messages,
                    add_generation_prompt=generation_prompt,
                    tokenize=True,
                    return_dict=True,
                )["input_ids"]
            )
        except Exception as e:  # the template's own message says what is wrong
            raise InvalidRequest(f"chat template failed: {e}") from e

    def tokenize(self, req: Request, entry: AdapterEntry | None = None) -> tuple[list[int], int]:
        """-> (token ids, how many leading ids a prompt template contributes)."""
        given = [x is not None for x in (req.prompt, req.messages, req.prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequest("give exactly one of prompt, messages, prompt_token_ids")
        self.check_chars(req, self.max_model_len)
        if entry is not None and entry.template is not None:
            return self._template_ids(req, entry)
        if req.prompt is not None:
            ids = self.tokenizer(req.prompt)["input_ids"] if req.prompt else []
        elif req.messages is not None:
            if not req.messages:
                raise InvalidRequest("messages is empty")
            ids = self._chat_ids(list(req.messages), True)
        else:
            ids = list(req.prompt_token_ids or ())
            vocab = self.model.shape.vocab
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequest(f"prompt_token_ids must be in [0, {vocab})")
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return list(ids), 0

    def check_chars(self, req: Request, max_tokens: int) -> None:
        """Refuses, without tokenizing, a prompt too long to have at most `max_tokens` tokens."""
        limit = max_tokens * self.max_token_chars
        if req.num_chars > limit:
            raise InvalidRequest(
                f"the prompt has {req.num_chars} characters: more than the {max_tokens} tokens "
                f"this server takes (at most {limit} characters)"
            )

    def _template_ids(self, req: Request, entry: AdapterEntry) -> tuple[list[int], int]:
        """The template's turns, then the request's turn(s). The template part is tokenized on
        its own so that its KV blocks can be shared by every request."""
        template = entry.template
        assert template is not None
        if req.prompt_token_ids is not None:
            raise InvalidRequest("a prompt template needs prompt text or messages, not token ids")
        turns = list(req.messages or ()) or [{"role": "user", "content": req.prompt or ""}]
        if not turns[-1].get("content"):
            raise InvalidRequest("the prompt is empty")
        turns[-1] = {**turns[-1], "content": template.user_turn(turns[-1]["content"])}
        prefix_msgs = template.prefix_messages()
        if not prefix_msgs:
            return self._chat_ids(turns, True), 0
        prefix_text = self.tokenizer.apply_chat_template(prefix_msgs, tokenize=False)
        full_text = self.tokenizer.apply_chat_template(
            prefix_msgs + turns, tokenize=False, add_generation_prompt=True
        )
        if not full_text.startswith(prefix_text):
            raise InvalidRequest(
                "this model's chat template does not render the template's turns "
                "as a prefix of the conversation"
            )
        prefix = self.tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
        rest = self.tokenizer(full_text[len(prefix_text) :], add_special_tokens=False)["input_ids"]
        return list(prefix) + list(rest), len(prefix)

    def validate(self, prompt_len: int, req: Request) -> None:
        if req.request_id in self._tracked:
            raise InvalidRequest(f"request id {shorten(req.request_id)} is already in use")
        if prompt_len >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {prompt_len} tokens; this server's context is "
                f"{self.max_model_len} tokens, leaving no room to generate"
            )
        if req.params.max_new_tokens > self.config.max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens {req.params.max_new_tokens} exceeds the limit "
                f"{self.config.max_new_tokens_limit}"
            )

    def add_request(self, req: Request) -> Sequence:
        """Validates, tokenizes and queues a request. Raises InvalidRequest, AdapterNotFound or
        Overloaded and leaves the engine unchanged when it does."""
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise Overloaded(f"the waiting queue is full ({self.config.max_waiting} requests)")
        entry = self.registry.get(req.adapter) if req.adapter else None
        ids, template_len = self.tokenize(req, entry)
        virtual = 0
        if entry is not None and entry.kind in (
            AdapterKind.PREFIX_TUNING,
            AdapterKind.PROMPT_TUNING,
        ):
            virtual = entry.ranks["virtual_tokens"]
            ids = [PLACEHOLDER_TOKEN] * virtual + ids
        self.validate(len(ids), req)
        seq = Sequence(
            next(self._seq_ids),
            req.request_id,
            ids,
            req.params,
            eos_token_ids=frozenset() if req.params.ignore_eos else self.eos_token_ids,
            prefix_len=virtual or template_len,
            num_virtual=virtual,
            arrival_time=time.monotonic() if req.arrival_time is None else req.arrival_time,
        )
        if entry is not None:
            self.adapters.attach(seq, entry)
        self._tracked[req.request_id] = _Tracked(
            seq, Detokenizer(self.tokenizer, req.params.stop, req.params.skip_special_tokens)
        )
        self.scheduler.add(seq)
        return seq

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self.adapters.detach(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request at once and frees its KV blocks. None if it is not known."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return None
        self._finish(tracked.seq, FinishReason.ABORT)
        return self._output(tracked, [], "", final=True)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        failed = [self._fail(seq) for seq in batch.failed]
        self._last_batch = (len(batch), batch.num_tokens)
        if not len(batch):
            return failed
        logits = self.runner.run(batch)
        self.scheduler.postprocess(batch)
        self.steps += 1
        return failed + self._process_samples(batch, logits)

    @property
    def last_batch_size(self) -> int:
        return self._last_batch[0]

    def _fail(self, seq: Sequence) -> RequestOutput:
        tracked = self._tracked.pop(seq.request_id)
        self._finish(seq, FinishReason.ABORT)
        out = self._output(tracked, [], "", final=True)
        return replace(out, error=seq.error)

    def _process_samples(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[RequestOutput]:
        sampling = [item.seq for item in batch.items if item.seq.num_uncomputed == 0]
        if not sampling:
            return []
        tokens, logprobs = sample(
            logits,
            [s.params for s in sampling],
            [s.token_ids[s.num_virtual :] for s in sampling],
            [s.generator for s in sampling],
            self.model.backend,
        )
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
        elif (
            seq.num_output_tokens >= seq.params.max_new_tokens
            or len(seq.token_ids) >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        ids = seq.output_token_ids
        if reason is FinishReason.STOP:
            ids = ids[:-1]  # the stop token is not part of the text
        delta, stopped = tracked.detok.update(ids, final=reason is not None)
        if stopped:
            reason = FinishReason.STOP
        new_tokens = seq.output_token_ids[tracked.emitted_tokens :]
        if reason is not None:
            self._finish(seq, reason)
            del self._tracked[seq.request_id]
        return self._output(tracked, new_tokens, delta, final=reason is not None)

    def _output(
        self, tracked: _Tracked, new_tokens: list[int], text: str, final: bool
    ) -> RequestOutput:
        seq = tracked.seq
        first = tracked.emitted_tokens == 0 and bool(new_tokens)
        logprobs = None
        if seq.params.logprobs:
            logprobs = seq.output_logprobs[
                tracked.emitted_tokens : tracked.emitted_tokens + len(new_tokens)
            ]
        tracked.emitted_tokens += len(new_tokens)
        timings = None
        if first or final:
            now = time.monotonic()
            start = seq.first_scheduled_time or now
            timings = Timings(
                queue_s=start - seq.arrival_time,
                ttft_s=None
                if seq.first_token_time is None
                else seq.first_token_time - seq.arrival_time,
                e2e_s=now - seq.arrival_time if final else None,
            )
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=new_tokens,
            logprobs=logprobs,
            finished=final,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            timings=timings,
            adapter_kind=seq.adapter.kind.value if seq.adapter is not None else BASE_KIND,
        )

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
            batch = self.scheduler.schedule()
            while not len(batch) and not batch.failed:  # the adapter is loading
                time.sleep(0.001)
                batch = self.scheduler.schedule()
            if batch.failed:
                raise InvalidRequest(batch.failed[0].error or "the adapter failed to load")
            with torch.inference_mode():
                h = self.runner.hidden_states(batch, self.runner.adapter_hook(batch))
                return self.model.logits(h).cpu()
        finally:
            self.abort(rid)

    # --- adapters (engine thread) -----------------------------------------------------------

    def add_adapter(
        self, name: str, loaded: LoadedAdapter, source: Path, replace: bool = False
    ) -> AdapterInfo:
        """Registers weights already read by `registry.load_from_disk` (off this thread).
        With `replace`, new requests get the new weights at once; running ones finish on the
        old ones, whose device state is freed when they are done."""
        return self.registry.add(
            name, loaded, source, replace, on_replaced=self.adapters.retire
        ).info()

    def register_adapter(self, name: str, path: str | Path, replace: bool = False) -> AdapterInfo:
        """Reads and registers in one call (offline use; the server loads off the step loop)."""
        return self.add_adapter(name, self.registry.load_from_disk(Path(path)), Path(path), replace)

    def unregister_adapter(self, name: str) -> None:
        """The name is gone at once; requests already using the adapter finish normally."""
        self.adapters.retire(self.registry.remove(name))

    def list_adapters(self) -> list[AdapterInfo]:
        return [e.info() for e in self.registry.entries()]

    def get_adapter(self, name: str) -> AdapterInfo:
        return self.registry.get(name).info()

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
