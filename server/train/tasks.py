"""Built-in demo tasks, generated in code (no downloads), each with an exact-match scorer.

- sentiment: a templated product review -> positive | negative | neutral
- arithmetic: a word problem -> a step-by-step solution ending in "The answer is N." (scored on
  the final number)
- format: a sentence about a person -> a JSON object with exactly the keys name, age, city

Items are chat conversations (system, user, assistant); train and held-out items never share a
user message.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftserve.train.data import DataError, Record


@dataclass(frozen=True)
class Item:
    user: str
    answer: str  # the reference assistant reply
    target: Any  # what `score` compares an output with


@dataclass(frozen=True)
class DemoTask:
    name: str
    system: str
    max_new_tokens: int  # enough for the reference answer, used when scoring
    make: Callable[[random.Random], Item]
    score: Callable[[str, Any], bool]  # (generated text, item.target) -> exact match

    def messages(self, item: Item, with_answer: bool = True) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": self.system}, {"role": "user", "content": item.user}]
        if with_answer:
            turns.append({"role": "assistant", "content": item.answer})
        return turns

    def split(self, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Item], list[Item]]:
        """Distinct items (by user message), seeded: the first n_train train, the rest held out."""
        rng = random.Random(f"{self.name}-{seed}")
        items: dict[str, Item] = {}
        for _ in range(50 * (n_train + n_eval)):
            item = self.make(rng)
            items.setdefault(item.user, item)
            if len(items) == n_train + n_eval:
                break
        else:
            raise DataError(f"demo task {self.name} has fewer than {n_train + n_eval} "
                             "distinct items")
        ordered = list(items.values())
        return ordered[:n_train], ordered[n_train:]

    def records(self, items: list[Item], split: str) -> list[Record]:
        return [Record(f"demo:{self.name}:{split}:{i + 1}", messages=tuple(self.messages(item)))
                for i, item in enumerate(items)]


# --- sentiment ------------------------------------------------------------------------------

_PRODUCTS = ("phone", "blender", "hotel room", "pizza", "laptop", "pair of headphones", "movie",
             "book", "jacket", "coffee", "camera", "delivery", "board game", "backpack", "lamp")
_SENTIMENT = {
    "positive": (("excellent", "wonderful", "fantastic", "superb", "delightful", "great"),
                 ("I would buy it again.", "Highly recommended.", "It exceeded my expectations.",
                  "Five stars.", "I love it.")),
    "negative": (("terrible", "awful", "disappointing", "horrible", "dreadful", "useless"),
                 ("I want a refund.", "Never again.", "Not worth the money.", "One star.",
                  "I regret buying it.")),
    "neutral": (("okay", "average", "ordinary", "acceptable", "unremarkable", "so-so"),
                ("Nothing special either way.", "It does what it says.", "Three stars.",
                 "Neither good nor bad.", "About what I expected.")),
}
_REVIEW_FORMS = ("The {p} was {a}. {e}", "This {p} is {a}. {e}", "{e} The {p} felt {a}.",
                 "Honestly, the {p} was {a}. {e}")


def _sentiment(rng: random.Random) -> Item:
    label = rng.choice(tuple(_SENTIMENT))
    adjectives, endings = _SENTIMENT[label]
    review = rng.choice(_REVIEW_FORMS).format(p=rng.choice(_PRODUCTS), a=rng.choice(adjectives),
                                              e=rng.choice(endings))
    user = ("Classify the sentiment of this review as positive, negative or neutral.\n"
            f"Review: {review}")
    return Item(user, label, label)


def _score_label(output: str, target: str) -> bool:
    return output.strip().rstrip(".!").strip().lower() == target


# --- arithmetic -----------------------------------------------------------------------------

_NAMES = ("Tom", "Ana", "Ravi", "Mei", "Lena", "Omar", "Sara", "Ken", "Ines", "Paul")
_THINGS = ("apple", "marble", "pencil", "sticker", "cookie", "coin", "book", "shell")


def _arithmetic(rng: random.Random) -> Item:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    if rng.random() < 0.5:
        a, b = rng.randint(2, 30), rng.randint(2, 20)
        c = rng.randint(1, a + b - 1)
        user = (f"{name} has {a} {thing}s, gets {b} more and then gives away {c}. "
                f"How many {thing}s does {name} have now?")
        answer = (f"{name} starts with {a} {thing}s. Getting {b} more gives {a} + {b} = {a + b}. "
                  f"Giving away {c} leaves {a + b} - {c} = {a + b - c}. "
                  f"The answer is {a + b - c}.")
        return Item(user, answer, a + b - c)
    boxes, per, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 9)
    c = min(c, boxes * per - 1)
    user = (f"{name} has {boxes} boxes with {per} {thing}s in each box and uses {c} of them. "
            f"How many {thing}s are left?")
    answer = (f"{boxes} boxes of {per} make {boxes} * {per} = {boxes * per} {thing}s. "
              f"Using {c} leaves {boxes * per} - {c} = {boxes * per - c}. "
              f"The answer is {boxes * per - c}.")
    return Item(user, answer, boxes * per - c)


def _score_final_number(output: str, target: int) -> bool:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", output.replace(",", ""))
    return bool(numbers) and float(numbers[-1]) == target


# --- format ---------------------------------------------------------------------------------

_PEOPLE = ("Maria", "John", "Aiko", "Pedro", "Fatima", "Lars", "Chen", "Amara", "Ivan", "Zoe")
_CITIES = ("Lisbon", "Toronto", "Osaka", "Nairobi", "Berlin", "Lima", "Oslo", "Cairo", "Perth")
_PERSON_FORMS = ("{n} is {a} years old and lives in {c}.", "{n}, aged {a}, has a flat in {c}.",
                 "Living in {c}, {n} just turned {a}.", "At {a}, {n} moved to {c}.")


def _format(rng: random.Random) -> Item:
    person = {"name": rng.choice(_PEOPLE), "age": rng.randint(18, 80), "city": rng.choice(_CITIES)}
    text = rng.choice(_PERSON_FORMS).format(n=person["name"], a=person["age"], c=person["city"])
    user = ('Reply with only a JSON object with the keys "name", "age" (a number) and "city".\n'
            f"Text: {text}")
    return Item(user, json.dumps(person), person)


def _score_json(output: str, target: dict[str, Any]) -> bool:
    try:
        return bool(json.loads(output.strip()) == target)
    except json.JSONDecodeError:
        return False


TASKS = {
    "sentiment": DemoTask("sentiment", "You label the sentiment of reviews.", 6, _sentiment,
                          _score_label),
    "arithmetic": DemoTask("arithmetic", "You solve word problems step by step.", 64,
                           _arithmetic, _score_final_number),
    "format": DemoTask("format", "You extract fields as JSON.", 32, _format, _score_json),
}


def get_task(name: str) -> DemoTask:
    if name not in TASKS:
        raise ValueError(f"unknown demo task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
