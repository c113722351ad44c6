"""Training data: bad lines are refused with their file and line number; the loss mask covers the
completion / assistant turns only; the prompt tokens are the ones the engine makes."""

from __future__ import annotations

import json

import pytest

from peftserve.models.loader import load_tokenizer
from peftserve.train.data import IGNORE, DataError, encode, parse_records, read_jsonl, split
from tests.train.conftest import run_train, write_jsonl

GOOD = json.dumps({"prompt": "hello", "completion": " world"})
CHAT = json.dumps({"messages": [{"role": "user", "content": "hello"},
                                {"role": "assistant", "content": "world"}]})


@pytest.mark.parametrize("lines, message", [
    ([GOOD, GOOD, json.dumps({"prompt": "hi"})], ":3: missing field 'completion'"),
    ([GOOD, json.dumps({"completion": "x"})], ":2: missing field 'prompt'"),
    ([GOOD, '{"prompt": "a", "completion": "b"', GOOD], ":2: invalid JSON"),
    ([GOOD, "", "[1, 2]"], ":3: expected a JSON object"),
    ([GOOD, json.dumps({"prompt": "a", "completion": 7})], ":2: 'completion' must be a string"),
    ([json.dumps({"prompt": "a", "completion": ""})], ":1: 'completion' is empty"),
    ([CHAT, json.dumps({"messages": [{"role": "user", "content": "hi"}]})],
     ":2: no 'assistant' message"),
    ([json.dumps({"messages": [{"role": "bot", "content": "hi"}]})], ":1: messages[0] has role"),
    ([CHAT, CHAT, json.dumps({"messages": [{"role": "user"}]})],
     ":3: messages[0] needs string fields"),
    ([json.dumps({"messages": []})], ":1: 'messages' must be a non-empty list"),
], ids=["missing-completion", "missing-prompt", "invalid-json", "not-an-object", "not-a-string",
        "empty-completion", "no-assistant", "bad-role", "no-content", "empty-messages"])
def test_bad_lines_name_their_line(tmp_path, lines, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert str(err.value).startswith(f"{path}{message}")


@pytest.mark.parametrize("text", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match="the file is empty"):
        read_jsonl(path)


def test_too_long_sequence_names_its_line(tmp_path, tiny_train_dir):
    tok = load_tokenizer(tiny_train_dir)
    long = json.dumps({"prompt": "the quick brown fox " * 30, "completion": " dog"})
    path = write_jsonl(tmp_path / "data.jsonl", [json.loads(GOOD), json.loads(long)])
    with pytest.raises(DataError,
                       match=r"data\.jsonl:2: \d+ tokens, longer than the context \(64\)"):
        encode(read_jsonl(path), tok, max_len=64)


def test_cli_reports_bad_data_with_the_line_and_exits_2(tmp_path, tiny_train_dir, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD + "\n" + GOOD + "\n" + '{"prompt": "x"}\n')
    rc = run_train("--method", "lora", "--data", str(path), "--out", str(tmp_path / "out"),
                   "--base", str(tiny_train_dir))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{path}:3: missing field 'completion'" in err
    assert "Traceback" not in err
    good = write_jsonl(tmp_path / "good.jsonl", [json.loads(GOOD)] * 4)
    long = write_jsonl(tmp_path / "long.jsonl", [json.loads(GOOD), {"prompt": "hello " * 40,
                                                                     "completion": "x"}])
    rc = run_train("--method", "lora", "--data", str(good), "--eval", str(long), "--out",
                   str(tmp_path / "out"), "--base", str(tiny_train_dir), "--max-seq-len", "16")
    assert rc == 2
    assert f"{long}:2: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_chat_loss_mask_covers_assistant_turns_and_the_prompt_is_the_servers(tiny_train_dir):
    tok = load_tokenizer(tiny_train_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "world"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "fox"}]
    (ex,) = encode(parse_records([("x:1", {"messages": messages})]), tok, max_len=512)
    trained = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE]
    assert [label for label in ex.labels if label != IGNORE] == trained
    assert tok.decode(trained) == "world<|im_end|>\nfox<|im_end|>\n"
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
    served = tok.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    assert ex.input_ids[:first] == list(served)  # what the engine makes of a `messages` request


def test_completion_loss_mask_and_prompt_tokens(tiny_train_dir):
    tok = load_tokenizer(tiny_train_dir)
    (ex,) = encode(parse_records([("x:1", {"prompt": "hello world", "completion": " fox"})]),
                   tok, max_len=512)
    n_prompt = len(tok("hello world")["input_ids"])  # what the engine makes of a `prompt`
    assert ex.input_ids[:n_prompt] == tok("hello world")["input_ids"]
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:]) == " fox<|im_end|>"


def test_eval_split_is_seeded_and_disjoint(tiny_train_dir):
    tok = load_tokenizer(tiny_train_dir)
    rows = [(f"x:{i}", {"prompt": f"p{i}", "completion": f" c{i}"}) for i in range(20)]
    examples = encode(parse_records(rows), tok, max_len=512)
    train, valid = split(examples, 0.1, seed=3)
    assert len(valid) == 2 and len(train) == 18
    assert {e.where for e in train}.isdisjoint(e.where for e in valid)
    assert [e.where for e in valid] == [e.where for e in split(examples, 0.1, seed=3)[1]]
    with pytest.raises(DataError, match="too few"):
        split(examples[:1], 0.1, seed=0)
