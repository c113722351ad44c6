"""OpenAI request bodies -> engine requests: the prompt forms OpenAI allows, chat content parts,
sampling fields, and what this server refuses rather than ignores."""

from __future__ import annotations

import pytest

from peftserve.errors import InvalidRequest
from peftserve.openai_http import convert
from peftserve.openai_http.schemas import ChatCompletionRequest, CompletionRequest


def completion(**body: object):
    return convert.completion_request(CompletionRequest(model="m", **body), "r", None, 16, 0.0)


def chat(**body: object):
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return convert.chat_request(ChatCompletionRequest(model="m", **body), "r", "lora", 99, 0.0)


@pytest.mark.parametrize("prompt, text, ids", [
    ("hello", "hello", None), (["hello"], "hello", None), ([5, 6, 7], None, (5, 6, 7)),
    ([[5, 6]], None, (5, 6)),
])
def test_completion_prompt_forms(prompt, text, ids):
    req = completion(prompt=prompt)
    assert (req.prompt, req.prompt_token_ids, req.params.max_new_tokens) == (text, ids, 16)


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2]], []])
def test_more_than_one_prompt_is_refused(prompt):
    with pytest.raises(InvalidRequest, match="one prompt"):
        completion(prompt=prompt)


def test_sampling_fields_map_to_the_engines():
    p = completion(prompt="x", max_tokens=5, temperature=0.7, top_p=0.9, seed=3, stop="\n",
                   logprobs=0, top_k=4, repetition_penalty=1.1, ignore_eos=True,
                   stop_token_ids=[2]).params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.seed, p.stop) == (5, 0.7, 0.9, 3, ("\n",))
    assert (p.logprobs, p.top_k, p.repetition_penalty, p.ignore_eos) == (True, 4, 1.1, True)
    assert p.stop_token_ids == (2,)
    assert not completion(prompt="x").params.logprobs


def test_chat_messages_parts_roles_and_token_limits():
    req = chat(messages=[{"role": "developer", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "text", "text": "b"}]}],
               max_tokens=7, max_completion_tokens=5, stop=["x", "y"], logprobs=True)
    assert req.messages == ({"role": "system", "content": "be brief"},
                            {"role": "user", "content": "ab"})
    assert (req.adapter, req.params.max_new_tokens, req.params.stop) == ("lora", 5, ("x", "y"))
    assert req.params.logprobs
    assert chat().params.max_new_tokens == 99  # the server's default


@pytest.mark.parametrize("build, body, reason", [
    (completion, {"prompt": "x", "n": 2}, "n must be 1"),
    (completion, {"prompt": "x", "echo": True}, "echo"),
    (completion, {"prompt": "x", "best_of": 3}, "best_of"),
    (completion, {"prompt": "x", "suffix": "end"}, "suffix"),
    (completion, {"prompt": "x", "logprobs": 2}, "logprobs=0"),
    (completion, {"prompt": "x", "frequency_penalty": 0.5}, "repetition_penalty is"),
    (completion, {"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias"),
    (chat, {"top_logprobs": 2}, "top_logprobs"),
    (chat, {"tools": [{"type": "function"}]}, "tools"),
    (chat, {"response_format": {"type": "json_object"}}, "response_format"),
    (chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text only"),
])
def test_what_cannot_be_honoured_is_refused(build, body, reason):
    with pytest.raises(InvalidRequest, match=reason):
        build(**body)
