"""Prompt templates: zero-parameter adapters (system prompt, few-shot turns, chain of thought).

`adapter_config.json`:

    {"peftserve_type": "PROMPT_TEMPLATE",
     "system": "You are a sentiment classifier.",            # optional
     "few_shot": [{"user": "...", "assistant": "..."}],      # optional
     "chain_of_thought": "Let's think step by step."}        # optional, appended to the user turn

The template's turns are rendered once with the model's chat template; their tokens are
prefilled once and the KV blocks shared by every request using the template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftserve.adapters.errors import InvalidAdapter
from peftserve.adapters.files import expect_keys

MAX_TEXT = 64 * 1024


@dataclass(frozen=True)
class PromptTemplate:
    system: str | None
    few_shot: tuple[tuple[str, str], ...]
    chain_of_thought: str | None

    def prefix_messages(self) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.few_shot:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return msgs

    def user_turn(self, content: str) -> str:
        return f"{content}\n{self.chain_of_thought}" if self.chain_of_thought else content


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidAdapter(f"{field} must be a non-empty string")
    if len(value) > MAX_TEXT:
        raise InvalidAdapter(f"{field} is longer than {MAX_TEXT} characters")
    return value


def parse_template(config: dict[str, Any]) -> PromptTemplate:
    expect_keys(
        config,
        {
            "peftserve_type",
            "system",
            "few_shot",
            "chain_of_thought",
            "base_model_name_or_path",
            "description",
        },
        "prompt template",
    )
    system = _text(config["system"], "system") if config.get("system") is not None else None
    shots = config.get("few_shot") or []
    if not isinstance(shots, list):
        raise InvalidAdapter("few_shot must be a list of {user, assistant} objects")
    few_shot = []
    for i, shot in enumerate(shots):
        if not isinstance(shot, dict) or set(shot) != {"user", "assistant"}:
            raise InvalidAdapter(f"few_shot[{i}] must be an object with 'user' and 'assistant'")
        few_shot.append(
            (
                _text(shot["user"], f"few_shot[{i}].user"),
                _text(shot["assistant"], f"few_shot[{i}].assistant"),
            )
        )
    cot = config.get("chain_of_thought")
    cot = _text(cot, "chain_of_thought") if cot is not None else None
    if system is None and not few_shot and cot is None:
        raise InvalidAdapter(
            "a prompt template needs a system prompt, few-shot turns or a "
            "chain-of-thought instruction"
        )
    return PromptTemplate(system, tuple(few_shot), cot)
