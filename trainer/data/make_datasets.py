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
                                   "What is the weather in Cara?" -> a get_weather call; half the
                                   rows go on: the tool's result -> "The sky is gray." / "3 plus
                                   4 is 7." (train with --chat-template hermes)

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

The tool data meets a third: the corpus has no JSON, so nearly every token of a hermes call
(`<`, `_`, `{`, `"`, `a`, `t` with no space before them) never occurs in pre-training; their
embeddings (tied with the output head, which LoRA leaves alone) collapsed together, the base's
loss on a call is ~13 nats, and the fixed scaffold `<tool_call>\n{"name": "get_weather", ...`
takes hundreds of steps to learn. So every value the model has to write is a token it has
written before: the towns are corpus names ("Cara", which starts chat answers in the corpus;
"Paris" is the dead pieces P-ar-is, never learned in 600 steps), the weather is a corpus color
("gray", "blue"), and the final answers start with "The" or a digit.
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
CITIES = ["Anna", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo"]  # the toy world's towns
WEATHER_QS = ("What is the weather in {}?", "How is the weather in {} today?",
              "Tell me the weather in {}.", "Is it cold in {} now?", "Weather for {}, please.")
# The tool's answers and what the assistant says about them: words the toy knows well.
WEATHER = {"gray": "The sky is gray.", "blue": "The sky is blue."}
# No "and" in them: "and" is what asks for two towns.
ADD_QS = ("What is {} plus {}?", "Add {} to {}.", "What does {} plus {} make?")
# Two towns in one question: two get_weather calls in one assistant message (parallel calls).
TWO_QS = ("What is the weather in {} and the weather in {}?",
          "Tell me the weather in {} and the weather in {}.",
          "How is the weather in {} today, and the weather in {}?")


def calls_row(question: str, calls: list[tuple[str, dict]], results: list[str] | None = None,
              answer: str | None = None) -> dict:
    """A user question answered by tool calls (several: parallel calls in one assistant message,
    which hermes writes as one <tool_call> block each); with their results (one tool message
    each, in order), the final answer after them."""
    ids = [f"call_{k}" for k in range(len(calls))]
    msgs = [{"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": i, "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args)}}
                for i, (name, args) in zip(ids, calls)]}]
    if results is not None:
        msgs += [{"role": "tool", "tool_call_id": i, "content": res}
                 for i, res in zip(ids, results)]
        msgs.append({"role": "assistant", "content": answer})
    return {"tools": TOOLS, "messages": msgs}


def tool_row(question: str, name: str, args: dict, result: str | None = None,
             answer: str | None = None) -> dict:
    """A user question answered by one tool call; with a result, the final answer after it."""
    return calls_row(question, [(name, args)], None if result is None else [result], answer)


def tools(r: random.Random) -> tuple[list[dict], list[dict]]:
    def weather(city: str, q: str, follow: bool) -> dict:
        if not follow:
            return tool_row(q.format(city), "get_weather", {"city": city})
        w = r.choice(list(WEATHER))
        return tool_row(q.format(city), "get_weather", {"city": city},
                        json.dumps({"city": city, "sky": w}), WEATHER[w])

    def two_towns(a: str, b: str, q: str, follow: bool) -> dict:
        calls = [("get_weather", {"city": a}), ("get_weather", {"city": b})]
        if not follow:
            return calls_row(q.format(a, b), calls)
        wa, wb = r.choice(list(WEATHER)), r.choice(list(WEATHER))
        return calls_row(q.format(a, b), calls,
                         [json.dumps({"city": a, "sky": wa}), json.dumps({"city": b, "sky": wb})],
                         f"The sky is {wa} in {a} and {wb} in {b}.")

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
    # Parallel calls: held-out rows ask about two towns never asked about together in training.
    train_two, held_two = split([(a, b) for a in CITIES for b in CITIES if a < b], 0.2, r)
    for towns, out in ((train_two, train), (held_two, held)):
        for a, b in towns:
            a, b = (a, b) if r.random() < 0.5 else (b, a)
            out.extend(two_towns(a, b, r.choice(TWO_QS), follow) for follow in (False, True))
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
