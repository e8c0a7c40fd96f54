"""Writes the bundled instruction datasets (run by hand; the JSONL output is committed).

    python trainer/data/make_datasets.py

Small tasks with one verifiable answer each, built from the toy corpus vocabulary:

- words.alpaca[.heldout].jsonl     Alpaca (with and without `input`): "What kind of word is
                                   plum?" -> "A fruit." / "An animal." / "A color."
- lists.sharegpt[.heldout].jsonl   ShareGPT, 1-2 turns, a system prompt on half: "What kind of
                                   word is every item in this list: plum, fig, lemon" -> "A fruit."
- numbers.openai[.heldout].jsonl   OpenAI messages with a system prompt: "Say red if 73 is more
                                   than 50, else say blue."

Held-out rows use words and numbers that never appear in the training rows (lists: list
questions that never appear there), so held-out exact match measures the learned skill on unseen
inputs, not memorised answers.

Two properties of the toy base (5M parameters, a few hundred pre-training steps) shape these
tasks. It cannot copy from its prompt (asked to "Repeat after me: cat plum red" it says "silver
fish"), so copy-based tasks (uppercase, spell, reverse a list, next number) stay at 0% after
minutes of LoRA training. And answers must be tokens it knows: "yes"/"no" never occur in its
corpus and split into rare pieces ("y" "es", "n" "o"), and yes/no versions of these same tasks
sat at chance for 300 steps, while "red"/"blue" and "A fruit." (well-trained tokens) reach
100% held-out in 300 steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

GROUPS = {
    "animal": "cat dog bird fish horse cow sheep goat mouse lion tiger bear wolf fox duck owl "
              "frog bee ant rabbit".split(),
    "fruit": "apple pear plum grape lemon lime peach cherry mango melon berry banana kiwi "
             "fig".split(),
    "color": "red blue green yellow black white brown pink purple gray gold silver".split(),
}
ANSWER = {"animal": "An animal.", "fruit": "A fruit.", "color": "A color."}
SYSTEM = "You answer briefly."

OUT = Path(__file__).parent


def split(items: list, frac: float, r: random.Random) -> tuple[list, list]:
    items = list(items)
    r.shuffle(items)
    k = max(1, round(len(items) * frac))
    return items[k:], items[:k]


def word_rows(word: str, group: str) -> list[dict]:
    """Three phrasings, one with the word in Alpaca's `input` field."""
    answer = ANSWER[group]
    return [
        {"instruction": f"What kind of word is {word}?", "input": "", "output": answer},
        {"instruction": "Is the word a fruit, an animal or a color?", "input": word,
         "output": answer},
        {"instruction": f"Tell me what {word} is: a fruit, an animal or a color.", "input": "",
         "output": answer},
    ]


def words(r: random.Random) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for group, ws in GROUPS.items():  # hold out a fifth of each group's words
        tw, hw = split(ws, 0.2, r)
        train += [row for w in tw for row in word_rows(w, group)]
        held += [row for w in hw for row in word_rows(w, group)]
    r.shuffle(train)
    return train, held


def lists(r: random.Random) -> tuple[list[dict], list[dict]]:
    seen: set[str] = set()

    def qa() -> tuple[str, str]:
        while True:
            group = r.choice(list(GROUPS))
            items = r.sample(GROUPS[group], r.randint(2, 4))
            q = f"What kind of word is every item in this list: {', '.join(items)}"
            if q not in seen:
                seen.add(q)
                return q, ANSWER[group]

    def conv(n_turns: int) -> dict:
        turns = []
        for _ in range(n_turns):
            q, a = qa()
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        if r.random() < 0.5:
            turns = [{"from": "system", "value": SYSTEM}] + turns
        return {"conversations": turns}

    held = [conv(1) for _ in range(60)]  # drawn first: training rows never repeat a list
    train = [conv(r.choice((1, 2))) for _ in range(300)]
    return train, held


def numbers(r: random.Random) -> tuple[list[dict], list[dict]]:
    train_n, held_n = split([n for n in range(1, 100) if n != 50], 0.2, r)
    phrases = ("Say red if {} is more than 50, else say blue.",
               "If {} is bigger than 50 answer red, otherwise answer blue.")

    def row(n: int, phrase: str) -> dict:
        return {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": phrase.format(n)},
                             {"role": "assistant", "content": "red" if n > 50 else "blue"}]}

    train = [row(n, p) for n in train_n for p in phrases]
    held = [row(n, p) for n in held_n for p in phrases]
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
