"""Writes corpus.txt, the bundled pre-training text of the toy base model.

Run once by hand (`python trainer/data/make_corpus.py`); the output is committed so the toy
model depends on a file, not on this script. The text is simple synthetic English about
everyday things, numbers, word spellings and short ChatML chats: enough for a 5M-parameter
model to learn words, casing and turn structure, so that LoRA tuning has something to build on.
"""

from __future__ import annotations

import random
from pathlib import Path

ANIMALS = "cat dog bird fish horse cow sheep goat mouse lion tiger bear wolf fox duck owl frog bee ant rabbit".split()
FRUITS = "apple pear plum grape lemon lime peach cherry mango melon berry orange banana kiwi fig".split()
COLORS = "red blue green yellow black white brown pink purple gray gold silver orange".split()
THINGS = "book cup chair table door window lamp box ball hat coat shoe key pen map clock bag bell boat car".split()
PLACES = "park river town city garden forest lake hill farm school market house beach road bridge".split()
NAMES = "Anna Ben Cara Dan Eva Finn Gina Hugo Ida Jack Kim Leo Mia Nina Omar Pia Rosa Sam Tom Uma".split()
ADJS = "big small old new fast slow happy sad warm cold bright dark quiet loud soft hard clean tall short long".split()
VERBS = "sees likes finds holds takes moves paints opens closes carries watches helps".split()
NUMWORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def sentence(r: random.Random) -> str:
    n = r.choice
    k = r.randrange(13)
    if k == 0:
        return f"The {n(ADJS)} {n(ANIMALS)} {n(VERBS)} the {n(COLORS)} {n(THINGS)} in the {n(PLACES)}."
    if k == 1:
        a, b = r.randrange(50), r.randrange(50)
        return f"{a} plus {b} is {a + b}."
    if k == 2:
        a = r.randrange(100)
        return f"After {a} comes {a + 1}, and before {a + 1} comes {a}."
    if k == 3:
        w = n(ANIMALS + FRUITS + THINGS)
        return f"The word {w} is spelled {' '.join(w)} and has {len(w)} letters."
    if k == 4:
        w = n(ANIMALS + FRUITS + COLORS + THINGS)
        return f"In capital letters {w} is written {w.upper()}, and {w.upper()} in small letters is {w}."
    if k == 5:
        items = r.sample(FRUITS, 3)
        return f"{n(NAMES)} buys {', '.join(items[:-1])} and {items[-1]} at the market."
    if k == 6:
        c = r.randrange(1, 13)
        return f"{n(NAMES)} has {NUMWORDS[c]} {n(FRUITS)}s, that is {c} in digits."
    if k == 7:
        return f"{n(NAMES)} and {n(NAMES)} walk to the {n(PLACES)} on a {n(ADJS)} day."
    if k == 8:
        items = r.sample(COLORS, 4)
        return f"Colors: {', '.join(items)}. Sorted: {', '.join(sorted(items))}."
    if k == 9:
        words = r.sample(ANIMALS, 3)
        return f"First {words[0]}, then {words[1]}, last {words[2]}."
    if k == 10:
        return f"A {n(FRUITS)} is {n(COLORS)} and a {n(ANIMALS)} is {n(ADJS)}."
    if k == 11:
        return f"{n(NAMES)} says: the {n(THINGS)} is {n(ADJS)} and {n(COLORS)}."
    return f"Where is the {n(THINGS)}? It is near the {n(PLACES)}."


def chat(r: random.Random) -> str:
    # Short ChatML conversations teach the turn structure, the end-of-turn token, and answers
    # that start with any kind of word (lowercase, capitals, digits) and copy from the question,
    # so that LoRA tuning on instruction data has a base it can bend in a few steps.
    thing, place = r.choice(THINGS), r.choice(PLACES)
    words = r.sample(ANIMALS + FRUITS + COLORS + THINGS, r.randint(2, 5))
    said = " ".join(words)
    q, a = r.choice([
        (f"Where is the {thing}?", f"The {thing} is in the {place}."),
        (f"What color is the {thing}?", f"{r.choice(COLORS)}"),
        ("Tell me a sentence.", sentence(r)),
        (f"Who is in the {place}?", f"{r.choice(NAMES)} is in the {place}."),
        (f"Repeat after me: {said}", said),
        (f"Say this again: {said}", f"{said}"),
        (f"Name a {r.choice(['fruit', 'animal'])}.", r.choice(FRUITS + ANIMALS)),
        ("Give me a number.", str(r.randrange(100))),
        (f"Shout the word {words[0]}.", words[0].upper()),
        ("List some things.", ", ".join(words)),
    ])
    return f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>"


def main(out: Path | None = None, seed: int = 1234, docs: int = 3000) -> None:
    out = out or Path(__file__).with_name("corpus.txt")
    r = random.Random(seed)
    lines = []
    for _ in range(docs):
        if r.random() < 0.4:
            lines.append(chat(r))
        else:
            lines.append(" ".join(sentence(r) for _ in range(r.randint(2, 6))))
    out.write_text("\n\n".join(lines) + "\n")  # blank line = document break


if __name__ == "__main__":
    main()
