"""Writes the bundled instruction datasets (run by hand; the JSONL output is committed).

    python trainer/data/make_datasets.py

Small tasks with one verifiable answer each, built from the toy corpus vocabulary. The toy base
(5M parameters, 250 pre-training steps) has read every word and number in rich contexts but
cannot copy a word from its prompt (asked "What comes after 24?" it says "The ball is pink.";
completing "After 24 comes" it says "41"), so copy-based tasks (uppercase, spell, reverse a
list) are out of reach of a LoRA trained for minutes. What it can learn quickly is to answer a
question about a word or number from what the pre-training put into its embeddings, in a closed
answer set, so the bundled tasks are of that kind:

- words.alpaca[.heldout].jsonl     Alpaca: "Is plum a fruit?" -> yes/no, for words of the four
                                   groups (animal, fruit, color, thing), with and without `input`
- lists.sharegpt[.heldout].jsonl   ShareGPT, multi-turn, a system prompt on half: "Is there a
                                   fruit in: cat, plum, box" -> yes/no
- numbers.openai[.heldout].jsonl   OpenAI messages with a system prompt: "Is 73 more than 50?"
                                   -> yes/no

(Harder variants were unreliable or stayed at chance after 300 steps: the word's group as a
4-way answer, "Is X a/an G?" over all four groups G, "more than 50" mixed with "less than 50".)
Held-out rows use words, numbers or lists that never appear in the training rows, so the
held-out exact-match score measures the learned skill on unseen inputs. Answers are roughly
balanced (always answering "no" scores 0.45 / 0.62 / 0.5 on the three held-out files).
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


PHRASES = [("Is {} a fruit?", False), ("Answer yes or no: is the word a fruit?", True),
           ("Is the word {} a fruit?", False), ("Is {} a kind of fruit?", False)]


def word_rows(word: str, group: str, k: int) -> list[dict]:
    """Fruits are a quarter of the words: they get all four phrasings and every other word one
    (the k-th), so yes and no are balanced without duplicate rows (which dedup would drop)."""
    answer = "yes" if group == "fruit" else "no"
    phrases = PHRASES if group == "fruit" else [PHRASES[k % len(PHRASES)]]
    return [{"instruction": p if as_input else p.format(word), "input": word if as_input else "",
             "output": answer} for p, as_input in phrases]


def words(r: random.Random) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for group, ws in GROUPS.items():  # hold out a fifth of each group's words
        tw, hw = split(ws, 0.2, r)
        train += [row for k, w in enumerate(tw) for row in word_rows(w, group, k)]
        held += [row for k, w in enumerate(hw) for row in word_rows(w, group, k)]
    r.shuffle(train)
    return train, held


def lists(r: random.Random) -> tuple[list[dict], list[dict]]:
    others = GROUPS["animal"] + GROUPS["thing"] + GROUPS["color"]
    seen: set[str] = set()

    def qa() -> tuple[str, str]:
        while True:
            items = r.sample(others, r.randint(2, 4))
            answer = "yes" if r.random() < 0.5 else "no"
            if answer == "yes":
                items[r.randrange(len(items))] = r.choice(GROUPS["fruit"])
            q = f"Is there a fruit in: {', '.join(items)}"
            if q not in seen:
                seen.add(q)
                return q, answer

    def conv(n_turns: int) -> dict:
        turns = []
        for _ in range(n_turns):
            q, a = qa()
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        if r.random() < 0.5:
            turns = [{"from": "system", "value": SYSTEM}] + turns
        return {"conversations": turns}

    held = [conv(1) for _ in range(60)]  # drawn first: training rows never repeat a question
    train = [conv(r.choice((1, 2))) for _ in range(300)]
    return train, held


def numbers(r: random.Random) -> tuple[list[dict], list[dict]]:
    train_n, held_n = split([n for n in range(1, 100) if n != 50], 0.2, r)

    def row(n: int, phrase: str) -> dict:
        return {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": phrase.format(n)},
                             {"role": "assistant", "content": "yes" if n > 50 else "no"}]}

    phrases = ("Is {} more than 50?", "Is {} bigger than 50?")
    train = [row(n, p) for n in train_n for p in phrases]
    held = [row(n, r.choice(phrases)) for n in held_n]
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
