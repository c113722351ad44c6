"""Training data: JSON lines read and checked (errors name the line), tokenized with loss masks.

Each line is one of
    {"prompt": "...", "completion": "..."}   plain text; served as `prompt` (no chat template)
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                                             the chat template is applied; served as `messages`
The loss is on the completion (plus the end-of-sequence token) or on the assistant turns only.
Prompt and completion are tokenized separately, so the prompt's ids are exactly the ones the
server makes from the same request.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100  # label of a token that is not trained on
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad training data; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Record:
    where: str  # "train.jsonl:12": where errors point
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict[str, str], ...] | None = None


@dataclass(frozen=True)
class Example:
    where: str
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def read_jsonl(path: Path) -> list[Record]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    numbered = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON: {e.msg} "
                                f"(column {e.colno})") from None
            numbered.append((f"{path}:{number}", obj))
    if not numbered:
        raise DataError(f"{path}: the file is empty (expected one JSON object per line)")
    return parse_records(numbered)


def parse_records(numbered: Iterable[tuple[str, Any]]) -> list[Record]:
    return [_parse(where, obj) for where, obj in numbered]


def _parse(where: str, obj: Any) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Record(where, messages=_parse_messages(where, obj["messages"]))
    for key in ("prompt", "completion"):
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r} (each line needs \"prompt\" and "
                            "\"completion\", or \"messages\")")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["completion"]:
        raise DataError(f"{where}: 'completion' is empty: there is nothing to learn")
    return Record(where, prompt=obj["prompt"], completion=obj["completion"])


def _parse_messages(where: str, messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs string fields 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(f"{where}: no 'assistant' message: there is nothing to learn")
    if roles[0] == "assistant":
        raise DataError(f"{where}: the first message is the assistant's; it needs a prompt")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def encode(records: Sequence[Record], tokenizer: Any, max_len: int) -> list[Example]:
    """Token ids and labels; a sequence longer than `max_len` is an error naming its line."""
    out = []
    for rec in records:
        if rec.messages is not None:
            ids, labels = _encode_messages(rec, tokenizer)
        else:
            ids, labels = _encode_completion(rec, tokenizer)
        if len(ids) > max_len:
            raise DataError(f"{rec.where}: {len(ids)} tokens, longer than the context "
                            f"({max_len}); shorten it or set --max-seq-len")
        out.append(Example(rec.where, ids, labels))
    return out


def _encode_completion(rec: Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    assert rec.prompt is not None and rec.completion is not None
    prompt = list(tokenizer(rec.prompt)["input_ids"]) if rec.prompt else []
    completion = list(tokenizer(rec.completion, add_special_tokens=False)["input_ids"])
    completion.append(tokenizer.eos_token_id)
    return prompt + completion, [IGNORE] * len(prompt) + completion


def _encode_messages(rec: Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Renders the conversation up to each assistant turn and after it; the text in between is
    the turn (content and end-of-turn tokens), trained on. Everything else is masked."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{rec.where}: 'messages' needs a chat template and the base model's "
                        "tokenizer has none; use prompt/completion lines")
    messages = list(rec.messages or ())
    cuts: list[tuple[str, bool]] = []  # (rendered text so far, is the last piece trained on)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            cuts.append((_render(tokenizer, messages[:i], True, rec.where), False))
            cuts.append((_render(tokenizer, messages[:i + 1], False, rec.where), True))
    cuts.append((_render(tokenizer, messages, False, rec.where), False))
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for text, trained in cuts:
        if not text.startswith(done):
            raise DataError(f"{rec.where}: the chat template does not render the conversation "
                            "turn by turn (a later turn changes earlier text); use "
                            "prompt/completion lines")
        piece = list(tokenizer(text[len(done):], add_special_tokens=False)["input_ids"])
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
        done = text
    return ids, labels


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool,
            where: str) -> str:
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=generation_prompt))
    except Exception as e:  # the template's own message says what is wrong
        raise DataError(f"{where}: the chat template failed: {e}") from e


def split(examples: list[Example], fraction: float,
          seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded shuffle, at least one example on each side."""
    if len(examples) < 2:
        raise DataError(f"{len(examples)} example(s): too few to hold out a validation split; "
                        "give --eval FILE or more data")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels [B, T]."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
