"""Output processing: a sampled token -> whether its sequence stops (EOS, stop tokens, length,
stop strings), the new text (incremental detokenization) and the `RequestOutput` a client gets."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from peftserve.adapters.handle import BASE_KIND
from peftserve.engine.detokenizer import Detokenizer
from peftserve.engine.request import RequestOutput, Timings
from peftserve.engine.sequence import FinishReason, Sequence


@dataclass
class _Tracked:
    seq: Sequence
    detok: Detokenizer
    emitted_tokens: int = 0


class OutputProcessor:
    """The requests in flight, by id, and what each has been sent so far."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._tracked: dict[str, _Tracked] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._tracked

    def track(self, seq: Sequence) -> None:
        params = seq.params
        detok = Detokenizer(self.tokenizer, params.stop, params.skip_special_tokens)
        self._tracked[seq.request_id] = _Tracked(seq, detok)

    def get(self, request_id: str) -> Sequence | None:
        tracked = self._tracked.get(request_id)
        return None if tracked is None else tracked.seq

    def stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        """Whether `token`, just appended, ends the sequence (stop strings aside)."""
        if token in seq.eos_token_ids or token in seq.params.stop_token_ids:
            return FinishReason.STOP
        return FinishReason.LENGTH if self.length_reached(seq) else None

    def length_reached(self, seq: Sequence, more: int = 0) -> bool:
        """Whether `seq`, `more` tokens longer, is as long as it may be (max_new_tokens, the
        context)."""
        return (
            seq.num_output_tokens + more >= seq.params.max_new_tokens
            or len(seq.token_ids) + more >= self.max_model_len
        )

    def on_token(self, seq: Sequence, reason: FinishReason | None) -> tuple[RequestOutput, bool]:
        """The output for the token just appended to `seq` -> (it, whether `seq` is done). A
        stop string can end the sequence here even when `reason` is None."""
        tracked = self._tracked[seq.request_id]
        # the output's ids in place (seq.output_token_ids copies them: O(length) a token)
        ids, start, end = seq.token_ids, seq.prompt_len, len(seq.token_ids)
        if reason is FinishReason.STOP:
            end -= 1  # the stop token is not part of the text
        delta, stopped = tracked.detok.update(ids, final=reason is not None, start=start, end=end)
        if stopped:
            reason = FinishReason.STOP
        new_tokens = ids[start + tracked.emitted_tokens :]
        if reason is not None:
            seq.finish_reason = reason
            del self._tracked[seq.request_id]
        done = reason is not None
        return self._output(tracked, new_tokens, delta, final=done), done

    def finished(self, request_id: str, error: str | None = None) -> RequestOutput | None:
        """The last output of a request that ended without a token (aborted, failed); None if
        the request is not in flight."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return None
        out = self._output(tracked, [], "", final=True)
        return out if error is None else replace(out, error=error)

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
