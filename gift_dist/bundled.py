"""The bundled datasets: arithmetic word problems with worked answers (the task the demo fine-tunes on), and
general chat (word tasks: the preservation set `gift-dist eval` scores the models on, held out by content from
the word tasks the demo's instruct model is tuned on).

Generated deterministically from a seed (so they are reproducible and reviewable) and shipped as
``gift_dist/resources/arithmetic.jsonl`` and ``general_chat.jsonl`` in the ``messages`` shape; nothing is
downloaded. ``python -m gift_dist.bundled`` writes both again.
"""

from __future__ import annotations

import hashlib
import json
import random
from importlib import resources
from pathlib import Path
from typing import Optional

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jia", "Kai", "Lena", "Milo", "Nia"]
ITEMS = ["apples", "books", "coins", "stamps", "pencils", "marbles", "cards", "shells", "stickers", "eggs"]
SYSTEM_PROMPTS = ["You are a careful math tutor. Show each step.", "Answer briefly and exactly."]
RESOURCE = "arithmetic.jsonl"
GENERAL_RESOURCE = "general_chat.jsonl"
WORDS = ["river", "candle", "garden", "window", "silver", "pocket", "lantern", "meadow", "violin", "harbor",
         "pepper", "basket", "comet", "marble", "tunnel", "feather", "castle", "island", "ladder", "mirror"]


def _problem(rng: random.Random, max_operand: int = 0) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "two_step"] if not max_operand else ["add", "sub", "mul"])
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if max_operand:
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if kind == "add":
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        r = f"{name} starts with {a} {item} and gets {b} more, so {a} + {b} = {a + b}. The answer is {a + b}."
    elif kind == "sub":
        a = a + b
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        r = f"{name} had {a} {item} and gave away {b}, so {a} - {b} = {a - b}. The answer is {a - b}."
    elif kind == "mul":
        if not max_operand:
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?"
        r = f"Each of the {a} boxes holds {b} {item}, so {a} * {b} = {a * b}. The answer is {a * b}."
    else:
        c = rng.randint(1, a + b)
        q = f"{name} has {a} {item}, buys {b} more, then loses {c}. How many {item} does {name} have?"
        r = (
            f"First {a} + {b} = {a + b}. Then {a + b} - {c} = {a + b - c}. "
            f"The answer is {a + b - c}."
        )
    return q, r


def generate_arithmetic(num_records: int = 3000, seed: int = 0, max_operand: int = 0) -> list[dict]:
    """Records in the ``messages`` shape: mostly single-turn, some multi-turn, some with a system prompt.
    ``max_operand`` > 0: one-step problems with operands up to it (a task a tiny model can learn in minutes)."""
    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(2 if rng.random() < 0.15 else 1):
            question, answer = _problem(rng, max_operand)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages})
    return records


# The word-task skill (the instruct model's own, and the demo's preservation set): one task kind applied to one
# word. Every (kind, word) instance belongs to exactly one side, decided by its content (a hash of kind and word,
# not a seed): `tuning` instances are what the tiny instruct model is chat-tuned on, `held_out` instances only
# ever appear in the general set `gift-dist eval` scores, so that set measures the skill on prompts the instruct
# model was never tuned on, not its memory of them.
WORD_TASK_KINDS = ("first", "last", "count", "plural", "repeat")
# Also understood by word_task, left out of the bundled sets: a tiny model does not learn them in the demo budget.
HARD_WORD_TASK_KINDS = ("reverse", "upper")
GENERAL_WORDS = WORDS + [
    "anchor", "bottle", "button", "cactus", "cobalt", "copper", "dragon", "falcon", "forest", "ginger", "hammer",
    "jacket", "kettle", "lemon", "magnet", "needle", "orchid", "parrot", "pillow", "puzzle", "rabbit", "saddle",
    "signal", "spider", "summit", "thread", "timber", "turnip", "velvet", "walnut", "wizard", "yogurt",
]
HELD_OUT_SHARE = 4  # one instance in HELD_OUT_SHARE is held out


def word_task(kind: str, word: str) -> tuple[str, str]:
    """The prompt and the reply of one word task."""
    if kind == "reverse":
        return f"Write the word '{word}' backwards.", f"Backwards, '{word}' is '{word[::-1]}'."
    if kind == "upper":
        return f"Write '{word}' in capital letters.", f"In capital letters: {word.upper()}."
    if kind == "first":
        return f"What is the first letter of '{word}'?", f"The first letter of '{word}' is '{word[0]}'."
    if kind == "last":
        return f"What is the last letter of '{word}'?", f"The last letter of '{word}' is '{word[-1]}'."
    if kind == "count":
        return f"How many letters are in '{word}'?", f"'{word}' has {len(word)} letters."
    if kind == "plural":
        return f"What is the plural of '{word}'?", f"The plural of '{word}' is '{word}s'."
    if kind == "repeat":
        return f"Say '{word}' twice.", f"'{word}' '{word}'."
    raise ValueError(f"unknown word task {kind!r}; choose one of {WORD_TASK_KINDS}")


def word_task_split(kind: str, word: str) -> str:
    """``held_out`` or ``tuning``: fixed by the instance's content (sha256 of kind and word), never by a seed."""
    digest = hashlib.sha256(f"{kind}:{word}".encode()).digest()
    return "held_out" if digest[0] % HELD_OUT_SHARE == 0 else "tuning"


def word_tasks(split: str = "all") -> list[tuple[str, str]]:
    """Every (prompt, reply) word task of ``split`` (``tuning``, ``held_out`` or ``all``), in a fixed order."""
    if split not in ("tuning", "held_out", "all"):
        raise ValueError(f"split must be tuning, held_out or all, got {split!r}")
    return [word_task(kind, word) for word in GENERAL_WORDS for kind in WORD_TASK_KINDS
            if split == "all" or word_task_split(kind, word) == split]


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def generate_general_chat(num_records: Optional[int] = None, seed: int = 1, split: str = "held_out") -> list[dict]:
    """Single-turn word tasks in the ``messages`` shape (no arithmetic in them).

    ``split="held_out"`` (the preservation set): every held-out instance once, shuffled by ``seed``
    (``num_records`` keeps the first ones); ``split="tuning"``: ``num_records`` (default 300) draws, with
    repetition, from the tuning instances (the tiny instruct model's chat-tuning data). The two never share a
    prompt (``word_task_split``)."""
    rng = random.Random(seed)
    tasks = word_tasks(split)
    if split == "held_out":
        rng.shuffle(tasks)
        return [_chat(q, a) for q, a in tasks[:num_records]]
    return [_chat(*rng.choice(tasks)) for _ in range(300 if num_records is None else num_records)]


# Arithmetic in another shape than the demo's task (`_problem`): a bare request and a terse worked answer, no
# names. The demo's instruct model is chat-tuned on a little of it, as a real instruct model is tuned on some
# maths; no prompt of it is a prompt of the demo's task (its templates share no question with `_problem`'s).
def generate_chat_maths(num_records: int, seed: int, max_operand: int = 9) -> list[dict]:
    """Single-turn chat records: add, take away or multiply operands up to ``max_operand``; replies
    "a + b = c. The answer is c."."""
    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        op = rng.choice("+-*")
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        item = rng.choice(ITEMS)
        if op == "+":
            question, value = f"Add {a} {item} to {b} {item}. How many {item} is that?", a + b
        elif op == "-":
            a += b
            question, value = f"Take {b} {item} away from {a} {item}. How many {item} remain?", a - b
        else:
            question, value = f"{a} bags hold {b} {item} each. What is the total number of {item}?", a * b
        records.append(_chat(question, f"{a} {op} {b} = {value}. The answer is {value}."))
    return records


def bundled_data_path() -> Path:
    return Path(str(resources.files("gift_dist") / "resources" / RESOURCE))


def bundled_general_path() -> Path:
    return Path(str(resources.files("gift_dist") / "resources" / GENERAL_RESOURCE))


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


if __name__ == "__main__":
    write_jsonl(generate_arithmetic(), bundled_data_path())
    write_jsonl(generate_general_chat(), bundled_general_path())
