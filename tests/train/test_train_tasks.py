"""The built-in demo tasks: seeded, train and held-out items disjoint, reference answers score as
correct and wrong answers do not."""

from __future__ import annotations

import json
import re

import pytest

from peftserve.adapters.bottleneck import ACTIVATIONS
from peftserve.train import config
from peftserve.train.tasks import TASKS, get_task


def test_the_cli_lists_match_the_implementations():
    assert sorted(config.DEMO_TASKS) == sorted(TASKS)
    assert sorted(config.ACTIVATIONS) == sorted(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_split_is_seeded_distinct_and_held_out(name):
    task = get_task(name)
    train, held = task.split(200, 60, seed=0)
    assert len(train) == 200 and len(held) == 60
    assert {i.user for i in train}.isdisjoint(i.user for i in held)
    assert len({i.user for i in train + held}) == 260
    assert task.split(200, 60, seed=0) == (train, held)
    assert task.split(200, 60, seed=1) != (train, held)
    for item in train + held:
        assert task.score(item.answer, item.target)
    records = task.records(held, "eval")
    assert records[0].where == f"demo:{name}:eval:1"
    assert [m["role"] for m in records[0].messages] == ["system", "user", "assistant"]


def test_sentiment_labels_and_scorer():
    task = get_task("sentiment")
    train, _ = task.split(200, 0)
    assert {i.target for i in train} == {"positive", "negative", "neutral"}
    assert task.score(" Positive.\n", "positive")
    assert not task.score("The review is positive.", "positive")
    assert not task.score("negative", "positive")


def test_arithmetic_solution_is_right_and_scored_on_the_final_number():
    task = get_task("arithmetic")
    train, _ = task.split(100, 0)
    for item in train:
        for lhs, rhs in re.findall(r"(\d+ [-+*] \d+) = (\d+)", item.answer):
            assert eval(lhs) == int(rhs)  # noqa: S307 - digits and one operator
        assert item.answer.endswith(f"The answer is {item.target}.")
    assert task.score("3 + 4 = 7. The answer is 7.", 7)
    assert not task.score("The answer is 7. Or maybe 8", 7)
    assert not task.score("no number here", 7)


def test_format_scorer_wants_exactly_the_keys():
    task = get_task("format")
    (item,), _ = task.split(1, 0)
    assert set(json.loads(item.answer)) == {"name", "age", "city"}
    assert task.score(json.dumps(item.target), item.target)
    assert not task.score(json.dumps({**item.target, "extra": 1}), item.target)
    assert not task.score(json.dumps({**item.target, "age": str(item.target["age"])}), item.target)
    assert not task.score("```json\n" + item.answer + "\n```", item.target)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown demo task 'poetry'"):
        get_task("poetry")
