"""Checks on what an engine's requests ended with, shared by the failure-isolation tests."""

from __future__ import annotations

from peftserve.engine.request import Request, RequestOutput
from peftserve.engine.sequence import FinishReason


def assert_failed_alone(outs: dict[str, list[RequestOutput]], reqs: list[Request], bad: str,
                        new_tokens: int) -> None:
    """Requests for adapter `bad` ended with an error naming it; every other one ran to its
    length limit, `new_tokens` tokens, with no error."""
    for req in reqs:
        last = outs[req.request_id][-1]
        if req.adapter == bad:
            assert last.finish_reason is FinishReason.ABORT
            assert "could not be prepared" in last.error and bad in last.error
        else:
            assert last.error is None, last.error
            assert last.finish_reason is FinishReason.LENGTH
            assert sum(len(o.token_ids) for o in outs[req.request_id]) == new_tokens
