"""`loraplex data filter` on hand-made rows: which rows are dropped, and why (no server)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loraplex.trainer.datagen.cli import main
from loraplex.trainer.datagen.filter import FilterConfig, filter_files, filter_rows, summary
from loraplex.trainer.datagen.textsim import RougeIndex, lcs_len, rouge_l, words
from loraplex.trainer.formats import read_rows

LONG = ("Plants capture light with chlorophyll in their leaves and use that energy to split "
        "water into oxygen and hydrogen, then combine the hydrogen with carbon dioxide from the "
        "air to build glucose, which the plant burns later for energy or stores as starch in "
        "its roots, seeds and stems for the winter months ahead")


def row(instruction: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": instruction},
                         {"role": "assistant", "content": answer}], **extra}


EVAL_QUESTION = ("Which river flows through the ancient city of Baghdad and joins the "
                 "Euphrates before reaching the Persian Gulf")

ROWS = [
    # 1: kept
    row("Explain how plants turn sunlight into chemical energy.", LONG),
    # 2: exact duplicate of 1 up to case and whitespace
    row("explain how plants  turn sunlight into chemical energy.", LONG.upper()),
    # 3: kept
    row("Write a short poem about the sea at night.", "Dark water hums below the stars."),
    # 4: near duplicate of 1: its last word changed
    row("Explain how plants turn sunlight into chemical energy.", LONG.replace("ahead", "later")),
    # 5: ROUGE-L near copy of 3's instruction, another answer
    row("Write a short poem about the sea at dawn.", "Pale light spills over quiet waves."),
    # 6: contains 13 words of the eval question
    row("Answer this: which river flows through the ancient city of Baghdad and joins the "
        "Euphrates before reaching the sea?", "The Tigris."),
    # 7: empty answer
    row("Name three primary colors please.", "   "),
    # 8: kept (different topic, nothing shared)
    row("List three uses of a paperclip.", "Holding papers, resetting devices, a bookmark."),
    # 9: the teacher was cut at max_tokens
    row("Summarize the plot of Hamlet briefly.", "Prince Hamlet seeks",
        provenance={"method": "distill", "finish_reason": "length"}),
    # 10: refusal boilerplate
    row("Tell me how to pick a lock quickly.", "I'm sorry, but I can't help with that."),
    # 11: instruction too short (2 words < 3)
    row("Name colors.", "Red, green and blue."),
    # 12: an Evol-Instruct template marker left in
    row("#Rewritten Prompt#: Explain gravity to a child using a ball.", "Things fall down."),
    # 13: eliminated at generation
    {"id": "evol-x", "skipped": "unchanged", "provenance": {"method": "evol_instruct"}},
    # 14: a tool-free row the trainer rejects (ends with a user turn)
    {"messages": [{"role": "user", "content": "Is this row valid at all?"}]},
]
EXPECTED = {
    2: "duplicate", 4: "near_duplicate", 5: "rouge_similar", 6: "eval_overlap",
    7: "empty_answer", 9: "truncated", 10: "refusal", 11: "too_short", 12: "template_leak",
    13: "unchanged", 14: "invalid", 15: "unreadable",
}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "rows.jsonl"
    lines = [json.dumps(r) for r in ROWS] + ["{not json"]
    data.write_text("\n".join(lines) + "\n")
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps(row(EVAL_QUESTION + "?", "The Tigris.")) + "\n"
                  + json.dumps({"prompt": "Spell the word lighthouse backwards"}) + "\n")
    return data, ev


def test_filter_drops_each_planted_row_for_its_reason(files, tmp_path):
    data, ev = files
    cfg = FilterConfig(eval_files=[ev])
    report = filter_files([data], tmp_path / "out.jsonl", cfg, report_path=tmp_path / "r.json",
                          dropped_path=tmp_path / "d.jsonl")
    dropped = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    got = {int(d["source"].rsplit(":", 1)[1]): d["reason"] for d in dropped}
    assert got == EXPECTED
    assert report["rows"] == 15 and report["kept"] == 3 and report["dropped"] == 12
    assert report["reasons"] == {r: 1 for r in EXPECTED.values()}
    by_line = {int(d["source"].rsplit(":", 1)[1]): d for d in dropped}
    assert by_line[2]["detail"].endswith("rows.jsonl:1")  # the first occurrence wins
    assert by_line[4]["detail"].startswith("Jaccard 0.9") and by_line[4]["detail"].endswith(":1")
    assert by_line[5]["detail"].startswith("ROUGE-L 0.8") and by_line[5]["detail"].endswith(":3")
    assert "which river flows through" in by_line[6]["detail"] and "eval.jsonl:1" in by_line[6]["detail"]
    assert by_line[6]["row"] == ROWS[5]  # the dropped row itself, for inspection
    # the report: JSON on disk with examples per reason, and a printed summary
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk["reasons"] == report["reasons"]
    assert on_disk["examples"]["rouge_similar"][0]["instruction"].startswith("Write a short poem")
    assert on_disk["eval"]["texts"] == 3 and on_disk["eval"]["unchecked_short_texts"] == 2
    text = summary(report)
    assert "15 rows -> 3 kept, 12 dropped" in text and "near_duplicate" in text
    # what is kept is what the trainer reads, unchanged
    kept = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kept == [ROWS[0], ROWS[2], ROWS[7]]
    rows, rejected = read_rows([tmp_path / "out.jsonl"])
    assert len(rows) == 3 and rejected == []


def test_options_turn_rules_off_and_short_eval_texts_match_whole(files, tmp_path):
    data, ev = files
    objs = [json.loads(x) for x in data.read_text().splitlines()[:14]]
    rows = [(f"r:{i}", o, None) for i, o in enumerate(objs, 1)]
    loose = FilterConfig(near_dup_threshold=None, rouge_threshold=None, drop_refusals=False,
                         drop_truncated=False, min_instruction_words=1)
    got = {d.source: d.reason for d in filter_rows(rows, loose).dropped}
    assert got == {"r:2": "duplicate", "r:7": "empty_answer", "r:12": "template_leak",
                   "r:13": "unchanged", "r:14": "invalid"}
    # a short eval text (5 words < --ngram) counts when it appears whole, with --min-ngram 5
    extra = [("r:15", row("Please spell the word lighthouse backwards now.", "sesuohthgil"), None)]
    short = FilterConfig(eval_files=[ev], ngram=13, min_ngram=5)
    got = {d.source: d.reason for d in filter_rows(rows[:1] + extra, short).dropped}
    assert got == {"r:15": "eval_overlap"}
    assert filter_rows(rows[:1] + extra, FilterConfig(eval_files=[ev])).dropped == []


def test_filter_cli(files, tmp_path, capsys):
    data, ev = files
    out = tmp_path / "clean.jsonl"
    assert main(["data", "filter", str(data), "--eval", str(ev), "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kept"] == 3 and printed["dropped"] == 12
    assert json.loads((tmp_path / "clean.report.json").read_text())["dropped"] == 12
    assert len((tmp_path / "clean.dropped.jsonl").read_text().splitlines()) == 12
    assert main(["data", "filter", str(data), "--output", str(data)]) == 2  # never in place


def test_lcs_and_rouge_l_are_exact():
    def dp(a, b):
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcdef") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 70))]
        assert lcs_len(a, b) == dp(a, b)
    assert rouge_l("the cat sat", "The cat sat!") == 1.0
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)
    assert rouge_l("", "anything") == 0.0
    assert words("Héllo, wörld_2 x-y") == ["héllo", "wörld", "2", "x", "y"]
    idx = RougeIndex()
    idx.add(words("write a poem about the sea"), "k1")
    idx.add(words("list three colors"), "k2")
    assert idx.most_similar(words("write a poem about the ocean"), 0.7) == (
        pytest.approx(2 * 5 / 12), "k1")
    assert idx.most_similar(words("name a fruit"), 0.7) is None


def test_rouge_l_matches_the_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(1)
    vocab = "the a cat dog sat on mat Quick brown fox, jumps! over lazy 42 x_y".split()
    for _ in range(300):
        a = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 30)))
        b = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 30)))
        assert rouge_l(a, b) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure, abs=1e-12)
