"""Format parsers: Alpaca, ShareGPT, OpenAI messages; files, shards and rejected rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.adapters.errors import BadRequest
from loraplex.trainer.formats import RowError, parse_row, read_rows
from loraplex.trainer.sources import data_files, iter_objects


def u(c: str) -> dict:
    return {"role": "user", "content": c}


def a(c: str) -> dict:
    return {"role": "assistant", "content": c}


def test_alpaca_instruction_input_system_history():
    kind, msgs = parse_row({"instruction": "Spell it.", "input": "cat", "output": "c a t"})
    assert kind == "alpaca" and msgs == [u("Spell it.\n\ncat"), a("c a t")]
    _, msgs = parse_row({"instruction": "Spell dog.", "input": "", "output": "d o g",
                         "system": "Be brief.", "history": [["Spell ox.", "o x"]]})
    assert msgs == [{"role": "system", "content": "Be brief."}, u("Spell ox."), a("o x"),
                    u("Spell dog."), a("d o g")]


def test_alpaca_errors():
    with pytest.raises(RowError) as exc:
        parse_row({"instruction": "x", "output": "  "})
    assert exc.value.code == "empty_output"
    with pytest.raises(RowError, match="missing `output`"):
        parse_row({"instruction": "x"})
    with pytest.raises(RowError, match="history"):
        parse_row({"instruction": "x", "output": "y", "history": [["only one"]]})
    with pytest.raises(RowError, match="output must be a string"):
        parse_row({"instruction": "x", "output": 3})


def test_sharegpt_role_mapping():
    row = {"system": "Sys.", "conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"}, {"from": "chatgpt", "value": "a2"}]}
    kind, msgs = parse_row(row)
    assert kind == "sharegpt"
    assert msgs == [{"role": "system", "content": "Sys."}, u("q1"), a("a1"), u("q2"), a("a2")]
    _, msgs = parse_row({"conversations": [{"from": "system", "value": "S"},
                                           {"from": "Human", "value": "q"},
                                           {"from": "bot", "value": "r"}]})
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]


def test_sharegpt_unknown_role():
    with pytest.raises(RowError) as exc:
        parse_row({"conversations": [{"from": "human", "value": "q"},
                                     {"from": "robot", "value": "{}"}]})
    assert exc.value.code == "unknown_role"
    assert "'robot'" in exc.value.detail and "conversations[1].from" in exc.value.detail


def test_openai_messages_and_parts():
    kind, msgs = parse_row({"messages": [
        {"role": "developer", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"}]})
    assert kind == "openai"
    assert msgs == [{"role": "system", "content": "S"}, u("a\nb"), a("c")]  # as the server joins
    with pytest.raises(RowError) as exc:
        parse_row({"messages": [u("q"), {"role": "robot", "content": "x"}, a("r")]})
    assert exc.value.code == "unknown_role" and "messages[1].role" in exc.value.detail


@pytest.mark.parametrize("msgs, code", [
    ([u("q")], "no_assistant"),
    ([u("q"), a("r"), u("again")], "bad_structure"),
    ([u("q"), {"role": "system", "content": "late"}, a("r")], "bad_structure"),
    ([u(""), a("r")], "empty_input"),
    ([u("q"), a("")], "empty_output"),
])
def test_conversation_structure(msgs, code):
    with pytest.raises(RowError) as exc:
        parse_row({"messages": msgs})
    assert exc.value.code == code


def test_detection_and_forced_format():
    with pytest.raises(RowError) as exc:
        parse_row({"prompt": "x", "completion": "y"})
    assert exc.value.code == "unknown_format"
    with pytest.raises(RowError, match="not an Alpaca row"):
        parse_row({"messages": [u("q"), a("r")]}, "alpaca")
    with pytest.raises(RowError):
        parse_row({"instruction": "q", "output": "r"}, "openai")
    with pytest.raises(RowError, match="JSON object"):
        parse_row(["a", "list"])


def test_jsonl_bad_line_keeps_file_and_line(tmp_path: Path):
    lines = [json.dumps({"instruction": f"q{i}", "output": f"r{i}"}) for i in range(1, 41)]
    lines[36] = '{"instruction": "q37", "output": '  # line 37 is truncated
    f = tmp_path / "data.jsonl"
    f.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is not a row
    rows, rejected = read_rows([f])
    assert len(rows) == 39 and len(rejected) == 1
    assert rejected[0].source == f"{f}:37" and rejected[0].code == "bad_json"
    assert str(rejected[0]).startswith(f"{f}:37: bad JSON")
    assert rows[36].source == f"{f}:38"


def test_json_array_with_line_numbers(tmp_path: Path):
    f = tmp_path / "data.json"
    f.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"conversations": '
                 '[{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}\n]\n')
    assert [line for line, _, _ in iter_objects(f)] == [2, 4]
    rows, rejected = read_rows([f])
    assert [r.format for r in rows] == ["alpaca", "sharegpt"] and not rejected
    f.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": oops}\n]')
    with pytest.raises(BadRequest, match=r"data.json:3: bad JSON"):
        read_rows([f])
    f.write_text("[]")
    assert read_rows([f]) == ([], [])


def test_json_file_with_jsonl_content(tmp_path: Path):
    f = tmp_path / "data.json"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    rows, _ = read_rows([f])
    assert len(rows) == 2


def test_directory_of_shards_mixed_formats(tmp_path: Path):
    d = tmp_path / "shards"
    (d / "sub").mkdir(parents=True)
    (d / "b.jsonl").write_text(json.dumps({"messages": [u("q"), a("r")]}) + "\n")
    (d / "a.jsonl").write_text(json.dumps({"instruction": "q", "output": "r"}) + "\n")
    (d / "sub" / "c.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}]))
    (d / "notes.txt").write_text("ignored")
    files = data_files([d])
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl", "c.json"]
    rows, _ = read_rows(files)
    assert [r.format for r in rows] == ["alpaca", "openai", "sharegpt"]
    with pytest.raises(BadRequest, match="does not exist"):
        data_files([tmp_path / "missing.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadRequest, match="no \\*.jsonl"):
        data_files([tmp_path / "empty"])


def test_bundled_datasets_parse_cleanly():
    data = Path(__file__).resolve().parents[2] / "trainer" / "data"
    expected = {"words.alpaca": "alpaca", "lists.sharegpt": "sharegpt", "numbers.openai": "openai"}
    for stem, fmt in expected.items():
        for suffix in (".jsonl", ".heldout.jsonl"):
            rows, rejected = read_rows([data / (stem + suffix)])
            assert rows and not rejected
            assert {r.format for r in rows} == {fmt}
