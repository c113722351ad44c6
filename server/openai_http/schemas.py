"""Request bodies of the OpenAI API as peftserve takes them (pydantic checks the types).

Fields OpenAI defines that this server cannot honour are accepted only at their neutral value,
so a request is never answered as if it had been honoured. vLLM's extra sampling fields
(`top_k`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`) are accepted too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields both endpoints share."""

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do, with why."""
        if self.n != 1:
            return "n must be 1: each request returns one choice"
        if self.presence_penalty or self.frequency_penalty:
            return ("presence_penalty and frequency_penalty are not supported "
                    "(repetition_penalty is)")
        if self.logit_bias:
            return "logit_bias is not supported"
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of must be 1"
        if self.suffix:
            return "suffix is not supported"
        if self.logprobs:
            return ("logprobs > 0 is not supported: this server returns the sampled token's "
                    "log-probability only (logprobs=0)")
        return super().unsupported()


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.top_logprobs:
            return ("top_logprobs > 0 is not supported: this server returns the sampled "
                    "token's log-probability only")
        if self.tools:
            return "tools are not supported"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format other than text is not supported"
        return super().unsupported()


class LoadAdapterRequest(_Body):
    """vLLM's /v1/load_lora_adapter body; any adapter kind, by path under the adapter root."""

    lora_name: str
    lora_path: str


class UnloadAdapterRequest(_Body):
    lora_name: str
