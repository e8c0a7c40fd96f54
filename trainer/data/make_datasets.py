"""Writes the bundled instruction datasets (run by hand; the JSONL output is committed).

    python trainer/data/make_datasets.py

Small tasks with one verifiable answer each, built from the toy corpus vocabulary (the toy base
has read every word, spelling, capitalisation and "after N comes N+1" fact, but never in
instruction form), so a LoRA can learn the instruction -> answer mapping in minutes on a CPU:

- words.alpaca[.heldout].jsonl     Alpaca: capital letters, small letters, spelling, letter count
- lists.sharegpt[.heldout].jsonl   ShareGPT, multi-turn: reverse a list, sort colors, last item
- numbers.openai[.heldout].jsonl   OpenAI messages with a system prompt: after / before N

Held-out rows use words, numbers or combinations that never appear in the training rows, so the
held-out exact-match score measures the learned skill, not memorised answers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ANIMALS = "cat dog bird fish horse cow sheep goat mouse lion tiger bear wolf fox duck owl frog bee ant rabbit".split()
FRUITS = "apple pear plum grape lemon lime peach cherry mango melon berry orange banana kiwi fig".split()
COLORS = "red blue green yellow black white brown pink purple gray gold silver".split()
THINGS = "book cup chair table door window lamp box ball hat coat shoe key pen map clock bag bell boat car".split()
SYSTEM = "You answer with the result only."

OUT = Path(__file__).parent


def split(items: list, frac: float, r: random.Random) -> tuple[list, list]:
    items = list(items)
    r.shuffle(items)
    k = max(1, round(len(items) * frac))
    return items[k:], items[:k]


def word_tasks(word: str) -> list[tuple[str, str, str]]:
    """(instruction, input, output) variants for one word."""
    return [
        ("Write the word in capital letters.", word, word.upper()),
        (f"Write {word} in capital letters.", "", word.upper()),
        ("Write the word in small letters.", word.upper(), word),
        (f"Write {word.upper()} in small letters.", "", word),
        ("Spell the word.", word, " ".join(word)),
        (f"Spell the word {word}.", "", " ".join(word)),
        ("How many letters does the word have?", word, str(len(word))),
    ]


def words(r: random.Random) -> tuple[list[dict], list[dict]]:
    train_w, held_w = split(ANIMALS + FRUITS + THINGS + COLORS, 0.2, r)
    train = [{"instruction": i, "input": x, "output": o}
             for w in train_w for i, x, o in word_tasks(w)]
    held = []
    for w in held_w:  # one phrasing per task (with and without `input`, alternating)
        tasks = word_tasks(w)
        for k in range(0, 6, 2):
            i, x, o = tasks[k + r.randrange(2)]
            held.append({"instruction": i, "input": x, "output": o})
        i, x, o = tasks[6]
        held.append({"instruction": i, "input": x, "output": o})
    r.shuffle(train)
    return train, held


def list_turn(r: random.Random, kind: str, items: list[str]) -> tuple[str, str]:
    joined = ", ".join(items)
    if kind == "reverse":
        return f"Reverse the list: {joined}", ", ".join(reversed(items))
    if kind == "sort":
        return f"Sort these colors: {joined}", ", ".join(sorted(items))
    return f"What is the last item: {joined}", items[-1]


def lists(r: random.Random) -> tuple[list[dict], list[dict]]:
    seen: set[tuple] = set()

    def turn(kind: str) -> tuple[str, str]:
        while True:
            pool = COLORS if kind == "sort" else ANIMALS
            items = r.sample(pool, r.choice((3, 4)))
            if (kind, tuple(items)) not in seen:
                seen.add((kind, tuple(items)))
                return list_turn(r, kind, items)

    def conv(n_turns: int) -> dict:
        turns = []
        for _ in range(n_turns):
            q, a = turn(r.choice(("reverse", "sort", "last")))
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        row: dict = {"conversations": turns}
        if r.random() < 0.5:
            row["conversations"] = [{"from": "system", "value": SYSTEM}] + turns
        return row

    held = [conv(1) for _ in range(60)]  # drawn first: the training rows avoid these lists
    train = [conv(r.choice((1, 2))) for _ in range(500)]
    return train, held


def numbers(r: random.Random) -> tuple[list[dict], list[dict]]:
    train_n, held_n = split(list(range(1, 99)), 0.2, r)

    def row(n: int, kind: str) -> dict:
        q, a = ((f"What comes after {n}?", str(n + 1)) if kind == "after"
                else (f"What comes before {n}?", str(n - 1)))
        return {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": q},
                             {"role": "assistant", "content": a}]}

    train = [row(n, k) for n in train_n for k in ("after", "before")]
    held = [row(n, k) for n in held_n for k in ("after", "before")]
    r.shuffle(train)
    return train, held


def write(name: str, rows: list[dict]) -> None:
    with open(OUT / name, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{name}: {len(rows)} rows")


def main(seed: int = 4) -> None:
    for stem, make in (("words.alpaca", words), ("lists.sharegpt", lists),
                       ("numbers.openai", numbers)):
        train, held = make(random.Random(f"{stem}-{seed}"))
        write(f"{stem}.jsonl", train)
        write(f"{stem}.heldout.jsonl", held)


if __name__ == "__main__":
    main()
