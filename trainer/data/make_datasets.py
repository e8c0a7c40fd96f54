"""Writes the bundled instruction datasets (run by hand; the JSONL output is committed).

    python trainer/data/make_datasets.py

Small tasks with one verifiable answer each, built from the toy corpus vocabulary. The toy base
(5M parameters, 250 pre-training steps) has read every word and number in rich contexts but
cannot copy a word from its prompt (asked "What comes after 24?" it says "The ball is pink.";
completing "After 24 comes" it says "41"), so copy-based tasks (uppercase, spell, reverse a
list) are out of reach of a LoRA trained for minutes. What it can learn quickly is to answer a
question about a word or number from what the pre-training put into its embeddings, in a closed
answer set, so the bundled tasks are of that kind:

- words.alpaca[.heldout].jsonl     Alpaca: the group of a word (animal / fruit / color / thing)
                                   and "Is X a fruit?" yes/no; with and without `input`
- lists.sharegpt[.heldout].jsonl   ShareGPT, multi-turn, system prompt on half: how many items
                                   are in a list (2-5), is there a fruit in it (yes/no)
- numbers.openai[.heldout].jsonl   OpenAI messages with a system prompt: is N more than 50,
                                   is N less than 20 (yes/no)

Held-out rows use words, numbers or lists that never appear in the training rows, so the
held-out exact-match score measures the learned skill on unseen inputs. Chance levels: 1/4 for
the word group, 1/2 for yes/no (balanced), 1/4 for the item count.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

GROUPS = {
    "animal": "cat dog bird fish horse cow sheep goat mouse lion tiger bear wolf fox duck owl "
              "frog bee ant rabbit".split(),
    "fruit": "apple pear plum grape lemon lime peach cherry mango melon berry banana kiwi fig".split(),
    "color": "red blue green yellow black white brown pink purple gray gold silver".split(),
    "thing": "book cup chair table door window lamp box ball hat coat shoe key pen map clock bag "
             "bell boat car".split(),
}
ARTICLE = {"animal": "an animal", "fruit": "a fruit", "color": "a color", "thing": "a thing"}
SYSTEM = "You answer with one word."

OUT = Path(__file__).parent


def split(items: list, frac: float, r: random.Random) -> tuple[list, list]:
    items = list(items)
    r.shuffle(items)
    k = max(1, round(len(items) * frac))
    return items[k:], items[:k]


def word_rows(word: str, group: str, r: random.Random) -> list[dict]:
    """Group questions (two phrasings) and one yes and one no question for a word."""
    other = r.choice([g for g in GROUPS if g != group])
    return [
        {"instruction": f"What kind of word is {word}?", "input": "", "output": group},
        {"instruction": "Is the word an animal, a fruit, a color or a thing?", "input": word,
         "output": group},
        {"instruction": f"Is {word} {ARTICLE[group]}?", "input": "", "output": "yes"},
        {"instruction": f"Is {word} {ARTICLE[other]}?", "input": "", "output": "no"},
    ]


def words(r: random.Random) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for group, ws in GROUPS.items():  # hold out a fifth of each group's words
        tw, hw = split(ws, 0.2, r)
        train += [row for w in tw for row in word_rows(w, group, r) + word_rows(w, group, r)]
        held += [row for w in hw for row in word_rows(w, group, r)]
    train = list({json.dumps(x, sort_keys=True): x for x in train}.values())  # no duplicates
    r.shuffle(train)
    return train, held


def lists(r: random.Random) -> tuple[list[dict], list[dict]]:
    things = GROUPS["animal"] + GROUPS["thing"] + GROUPS["color"]
    seen: set[tuple] = set()

    def qa() -> tuple[str, str]:
        while True:
            if r.random() < 0.5:
                items = r.sample(things + GROUPS["fruit"], r.randint(2, 5))
                q, a = f"How many items: {', '.join(items)}", str(len(items))
            else:
                items = r.sample(things, r.randint(2, 4))
                if r.random() < 0.5:
                    items[r.randrange(len(items))] = r.choice(GROUPS["fruit"])
                has = any(x in GROUPS["fruit"] for x in items)
                q, a = f"Is there a fruit in: {', '.join(items)}", "yes" if has else "no"
            if q not in seen:
                seen.add(q)
                return q, a

    def conv(n_turns: int) -> dict:
        turns = []
        for _ in range(n_turns):
            q, a = qa()
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        if r.random() < 0.5:
            turns = [{"from": "system", "value": SYSTEM}] + turns
        return {"conversations": turns}

    held = [conv(1) for _ in range(60)]  # drawn first: training rows never repeat a question
    train = [conv(r.choice((1, 2))) for _ in range(400)]
    return train, held


def numbers(r: random.Random) -> tuple[list[dict], list[dict]]:
    train_n, held_n = split(list(range(1, 100)), 0.2, r)

    def row(n: int, kind: str) -> dict:
        if kind == "more":
            q, a = f"Is {n} more than 50?", "yes" if n > 50 else "no"
        else:
            q, a = f"Is {n} less than 50?", "yes" if n < 50 else "no"
        return {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": q},
                             {"role": "assistant", "content": a}]}

    train = [row(n, k) for n in train_n for k in ("more", "less")]
    held = [row(n, k) for n in held_n for k in ("more", "less")]
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
