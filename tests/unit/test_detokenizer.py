"""The incremental detokenizer against the whole decode: fed one token at a time, the text it
emits is always a prefix of the decode of the ids so far and, at the end, all of it, for
byte-level BPE (SmolLM2's tokenizer and a tiny one) and a Llama-2 style tokenizer (byte
fallback, a leading space stripped from every decode); characters split over tokens, special
tokens skipped or kept, stop strings, random ids."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peftserve.engine.detokenizer import Detokenizer, rust_decode
from peftserve.models.loader import load_tokenizer, resolve_model_dir
from tests.tiny import make_tokenizer

TEXTS = (
    "Hello, world! Ça va? 日本語のテキスト and emoji 🙂👍🏽 mixed in.",
    " leading space, then\nnew lines\n\nand tabs\t— dashes… “quotes” 'apostrophes' ok",
    "Zürich ß ĳ Ω ≈ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🏳️‍🌈 end",
)


def llama2_style() -> PreTrainedTokenizerFast:
    """A BPE with byte fallback ('<0xE6>' tokens for characters not in the vocabulary), '▁' for
    spaces and the decoder of Llama-2's tokenizer.json (which strips one leading space)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    pieces = ["▁", *map(chr, range(33, 127)), "▁t", "▁th", "▁the", "he", "ll", "llo"]
    vocab.update({p: len(vocab) + i for i, p in enumerate(pieces)})
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("h", "e"), ("l", "l"), ("ll", "o")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip


@pytest.fixture(scope="module", params=["tiny", "smollm2", "llama2_style"])
def tokenizer(request):
    if request.param == "tiny":
        return make_tokenizer()
    if request.param == "smollm2":
        return load_tokenizer(resolve_model_dir("default"))
    return llama2_style()


def sequences(tok, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    special = [i for i in tok.all_special_ids]
    out = [*encoded, encoded[0] + special[:2] + encoded[1]]
    for _ in range(6):  # any ids: partial characters, special tokens anywhere
        out.append([rng.randrange(len(tok)) for _ in range(rng.randrange(1, 60))])
    return out


def whole_decode_deltas(tok, ids: list[int], skip_special: bool) -> list[str]:
    """The text each step emits when every step decodes the whole output (the specification
    the incremental decode keeps): everything up to an incomplete last character."""
    out, emitted = [], ""
    for n in range(1, len(ids) + 1):
        full = tok.decode(ids[:n], skip_special_tokens=skip_special)
        if n < len(ids) and full.endswith("\ufffd") or len(full) <= len(emitted):
            out.append("")
            continue
        out.append(full[len(emitted) :])
        emitted = full
    return out


@pytest.mark.parametrize("skip_special", [True, False])
def test_each_step_emits_what_the_whole_decode_emits(tokenizer, skip_special):
    for i, ids in enumerate(sequences(tokenizer)):
        detok = Detokenizer(tokenizer, (), skip_special)
        deltas = [detok.update(ids[:n], final=n == len(ids)) for n in range(1, len(ids) + 1)]
        assert not any(stopped for _, stopped in deltas)
        assert [d for d, _ in deltas] == whole_decode_deltas(tokenizer, ids, skip_special), ids
        if i < len(TEXTS) + 1:  # real text (random ids under byte fallback can emit a byte
            # whose run later turns into U+FFFD, with the whole decode as much as here)
            assert "".join(d for d, _ in deltas) == tokenizer.decode(
                ids, skip_special_tokens=skip_special)


def test_a_stop_string_ends_the_text_before_it(tokenizer):
    text = "alpha beta gamma delta"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer, ("gamma",), True)
    emitted, stopped_at = "", None
    for n in range(1, len(ids) + 1):
        delta, stopped = detok.update(ids[:n], final=n == len(ids))
        emitted += delta
        if stopped:
            stopped_at = n
            break
    assert stopped_at is not None and emitted == tokenizer.decode(ids).split("gamma")[0]


def test_a_tokenizer_that_cleans_up_spaces_gets_the_whole_decode():
    """Word-level tokens joined by spaces, then " ," -> "," and " 's" -> "'s" over the whole
    text (transformers applies the clean-up to tokenizers other than BPE): a window's decode is
    not the whole decode's tail there, so such a tokenizer keeps the whole decode."""
    words = ["<unk>", "it", "'s", "a", "test", ",", "isn", "'t", "?"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                  clean_up_tokenization_spaces=True)
    ids = tok("it 's a test , isn 't it ?", add_special_tokens=False)["input_ids"]
    whole = tok.decode(ids)
    assert whole != tok.decode(ids, clean_up_tokenization_spaces=False)  # cleaned up
    detok = Detokenizer(tok, (), True)
    deltas = [detok.update(ids[:n], final=n == len(ids))[0] for n in range(1, len(ids) + 1)]
    assert deltas == whole_decode_deltas(tok, ids, True)
    assert "".join(deltas) == whole


def test_the_rust_decode_serves_only_where_transformers_adds_nothing(tokenizer):
    """The tokenizers above decode through the `tokenizers` library directly (what the tests
    above compare with transformers' decode); a tokenizer that cleans up spaces, or whose class
    decodes its own way, keeps transformers' decode."""
    assert Detokenizer(tokenizer, (), True)._rust_decode is not None

    class OwnDecode(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    own = OwnDecode(tokenizer_object=tokenizer.backend_tokenizer)
    assert rust_decode(own) is None
    cleans = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                     clean_up_tokenization_spaces=True)  # fmt: skip
    assert rust_decode(cleans) is None


def test_the_output_read_in_place_after_a_prompt(tokenizer):
    """update(ids, start=prompt length, end=...) reads the output where the sequence holds it
    and emits what it emits for the output alone, the stop token left out by `end`."""
    prompt = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    for ids in sequences(tokenizer, seed=3):
        alone, in_place = Detokenizer(tokenizer, ("q",), True), Detokenizer(tokenizer, ("q",), True)
        held = list(prompt)
        for n in range(1, len(ids) + 1):
            held.append(ids[n - 1])
            final = n == len(ids)
            want = alone.update(ids[: n - 1] if final else ids[:n], final=final)
            got = in_place.update(held, final=final, start=len(prompt),
                                  end=len(held) - 1 if final else len(held))  # fmt: skip
            assert got == want, (n, ids)
            if want[1]:
                break
