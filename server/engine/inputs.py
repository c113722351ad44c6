"""Input processing: a request's text, chat turns or token ids -> the token ids a sequence
starts from (an adapter's prompt template applied, virtual tokens in front), checked against the
server's limits. Tokenizes once; needs no engine state beyond the tokenizer and the limits."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from peftserve.adapters.handle import AdapterKind
from peftserve.adapters.manager import PLACEHOLDER_TOKEN
from peftserve.adapters.registry import AdapterEntry
from peftserve.engine.request import Request
from peftserve.errors import InvalidRequest

VIRTUAL_KINDS = (AdapterKind.PREFIX_TUNING, AdapterKind.PROMPT_TUNING)


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]  # virtual placeholders first, then the template's tokens, then the rest
    prefix_len: int  # leading ids served from the adapter's shared KV blocks
    num_virtual: int  # leading placeholders (prefix / prompt tuning)


class InputProcessor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab: int,
        max_model_len: int,
        max_prompt_tokens: int | None,
        max_new_tokens_limit: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.max_model_len = max_model_len
        # None: the context length less the one token it must leave to generate.
        self.max_prompt_tokens = min(max_prompt_tokens or max_model_len - 1, max_model_len - 1)
        self.max_new_tokens_limit = max_new_tokens_limit
        # No token is longer than the vocabulary's longest entry (byte-level and SentencePiece
        # entries are spelled with at least one character per character of text), so a text
        # longer than `n * max_token_chars` surely has more than n tokens: checked before
        # tokenizing, it keeps a multi-megabyte prompt away from the tokenizer.
        self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=1)

    def process(self, req: Request, entry: AdapterEntry | None) -> Prompt:
        """The sequence's first token ids, or InvalidRequest saying what is wrong."""
        if req.params.max_new_tokens > self.max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens {req.params.max_new_tokens} exceeds the limit "
                f"{self.max_new_tokens_limit}"
            )
        self.check_chars(req)
        ids, template_len = self._token_ids(req, entry)
        # Given ids, or a tokenizer with more entries than the model's embedding rows: an id
        # past them would fail the step (on a GPU, a device-side assert ends every request).
        if ids and (min(ids) < 0 or max(ids) >= self.vocab):  # builtins: no loop in Python
            bad = next(t for t in ids if not 0 <= t < self.vocab)
            source = "prompt_token_ids" if req.prompt_token_ids is not None else "the tokenizer"
            raise InvalidRequest(f"token id {bad} from {source} is outside this model's "
                                 f"vocabulary [0, {self.vocab})")  # fmt: skip
        if len(ids) > self.max_prompt_tokens:
            if self.max_prompt_tokens == self.max_model_len - 1:
                raise InvalidRequest(
                    f"the prompt has {len(ids)} tokens; this server's context is "
                    f"{self.max_model_len} tokens, leaving no room to generate"
                )
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; this server takes at most "
                f"{self.max_prompt_tokens}"
            )
        virtual = 0
        if entry is not None and entry.kind in VIRTUAL_KINDS:
            virtual = entry.ranks["virtual_tokens"]
            ids = [PLACEHOLDER_TOKEN] * virtual + ids
            if len(ids) >= self.max_model_len:
                raise InvalidRequest(
                    f"the prompt has {len(ids) - virtual} tokens and adapter "
                    f"{entry.name!r} adds {virtual} virtual tokens; this server's context is "
                    f"{self.max_model_len} tokens, leaving no room to generate"
                )
        return Prompt(ids, virtual or template_len, virtual)

    def check_chars(self, req: Request) -> None:
        """Refuses, without tokenizing, a prompt too long to have at most max_prompt_tokens."""
        limit = self.max_prompt_tokens * self.max_token_chars
        if req.num_chars > limit:
            raise InvalidRequest(
                f"the prompt has {req.num_chars} characters: more than the "
                f"{self.max_prompt_tokens} tokens this server takes (at most {limit} characters)"
            )

    def _token_ids(self, req: Request, entry: AdapterEntry | None) -> tuple[list[int], int]:
        """-> (token ids, how many leading ids a prompt template contributes)."""
        given = [x is not None for x in (req.prompt, req.messages, req.prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequest("give exactly one of prompt, messages, prompt_token_ids")
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
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return list(ids), 0

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
