"""Writes the bundled instruction datasets (run by hand; the JSONL output is committed).

    python trainer/data/make_datasets.py

Small tasks with one verifiable answer each, built from the toy corpus vocabulary:

- words.alpaca[.heldout].jsonl     Alpaca (with and without `input`): "What kind of word is
                                   plum?" -> "A fruit." / "An animal." / "A color."
- lists.sharegpt[.heldout].jsonl   ShareGPT, 1-2 turns, a system prompt on half: "What kind of
                                   word is every item in this list: plum, fig, lemon" -> "A fruit."
- numbers.openai[.heldout].jsonl   OpenAI messages with a system prompt: "Say red if 73 is more
                                   than 50, else say blue."
- tools.openai[.heldout].jsonl     OpenAI messages with `tools` (get_weather(city), add(a, b)):
                                   "What is the weather in Oslo?" -> a get_weather call; half the
                                   rows go on: the tool's result -> "It is cold." / "3 plus 4 is
                                   7." (train with --chat-template hermes)

Held-out rows use words and numbers that never appear in the training rows (lists: list
questions that never appear there), so held-out exact match measures the learned skill on unseen
inputs, not memorised answers. tools: every city and every phrasing is in training, but not
together: held-out rows ask about a city in a phrasing never used for it there (the toy cannot
copy an unseen name, see below), and add held-out pairs never occur in training.

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


# tools: both functions are offered in every row (as a client sends its tool list with each
# request); the toy must pick one from the question and fill its arguments from a closed set.
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                        "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Madrid", "Berlin"]
WEATHER_QS = ("What is the weather in {}?", "How is the weather in {} today?",
              "Tell me the weather in {}.", "Is it cold in {} now?", "Weather for {}, please.")
# The tool's answers and what the assistant says about them: words the toy knows well.
WEATHER = {"cold": "It is cold.", "warm": "It is warm."}
ADD_QS = ("What is {} plus {}?", "Add {} and {}.", "What do {} and {} add up to?")


def tool_row(question: str, name: str, args: dict, result: str | None = None,
             answer: str | None = None) -> dict:
    """A user question answered by one tool call; with a result, the final answer after it."""
    call = {"id": "call_0", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}
    msgs = [{"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [call]}]
    if result is not None:
        msgs += [{"role": "tool", "tool_call_id": "call_0", "content": result},
                 {"role": "assistant", "content": answer}]
    return {"tools": TOOLS, "messages": msgs}


def tools(r: random.Random) -> tuple[list[dict], list[dict]]:
    def weather(city: str, q: str, follow: bool) -> dict:
        if not follow:
            return tool_row(q.format(city), "get_weather", {"city": city})
        w = r.choice(list(WEATHER))
        return tool_row(q.format(city), "get_weather", {"city": city},
                        json.dumps({"city": city, "weather": w}), WEATHER[w])

    def add(a: int, b: int, q: str, follow: bool) -> dict:
        if not follow:
            return tool_row(q.format(a, b), "add", {"a": a, "b": b})
        return tool_row(q.format(a, b), "add", {"a": a, "b": b}, str(a + b),
                        f"{a} plus {b} is {a + b}.")

    train, held = [], []
    for k, city in enumerate(CITIES):  # each city's held-out phrasing is a different one
        for j, q in enumerate(WEATHER_QS):
            rows = [weather(city, q, False), weather(city, q, True)]
            (held if j == k % len(WEATHER_QS) else train).extend(rows)
    train_pairs, held_pairs = split([(a, b) for a in range(1, 10) for b in range(1, 10)], 0.2, r)
    for pairs, out in ((train_pairs[:30], train), (held_pairs[:8], held)):
        for a, b in pairs:
            out.append(add(a, b, r.choice(ADD_QS), r.random() < 0.5))
    r.shuffle(train)
    return train, held


def write(name: str, rows: list[dict]) -> None:
    with open(OUT / name, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{name}: {len(rows)} rows")


def main(seed: int = 4) -> None:
    for stem, make in (("words.alpaca", words), ("lists.sharegpt", lists),
                       ("numbers.openai", numbers), ("tools.openai", tools)):
        train, held = make(random.Random(f"{stem}-{seed}"))
        write(f"{stem}.jsonl", train)
        write(f"{stem}.heldout.jsonl", held)


if __name__ == "__main__":
    main()
