"""Instruction-data parsers: Alpaca, ShareGPT and OpenAI `messages`, all turned into chat messages.

Every row becomes either a conversation (`[{"role", "content"}, ...]`) or a rejection with its
`file:line` and a reason; nothing is dropped silently. The format is detected per row from its
keys (`messages` -> OpenAI, `conversations` -> ShareGPT, `instruction` -> Alpaca) unless forced,
so a directory of shards may mix formats.

- Alpaca: {"instruction", "input"?, "output", "system"?, "history"?: [[instruction, output], ...]};
  a non-empty `input` is appended to the instruction after a blank line (the Alpaca convention).
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}], "system"?}.
- OpenAI: {"messages": [{"role": "system"|"user"|"assistant", "content": str | text parts}]}.

Files: `.jsonl` (one object per line) or `.json` (one array of objects, or JSONL in disguise).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import BadRequest

FORMATS = ("alpaca", "sharegpt", "openai")
DATA_SUFFIXES = (".jsonl", ".json")

# ShareGPT speaker names seen in the wild -> chat roles. Tool/function turns are out of scope.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "ai": "assistant",
    "system": "system",
}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RowError(Exception):
    """A row that cannot become a training conversation; `code` groups the report."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass
class Row:
    """One parsed row: its provenance, the detected format, and its conversation."""

    source: str  # "path:line"
    format: str
    messages: list[dict[str, str]]


@dataclass
class Rejected:
    source: str
    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.source}: {self.detail}"


# -- files ---------------------------------------------------------------------------------------

def data_files(specs: list[str | Path]) -> list[Path]:
    """Expand files and directories of shards (*.jsonl, *.json, sorted) into a file list."""
    files: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            shards = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
            if not shards:
                raise BadRequest(f"data directory {str(p)!r} holds no *.jsonl or *.json files",
                                 param="data")
            files += shards
        elif p.is_file():
            files.append(p)
        else:
            raise BadRequest(f"data path {str(p)!r} does not exist", param="data")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read data file {str(path)!r}: {exc}", param="data") from None


def iter_objects(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line, object, None) per row, or (line, None, error) for a line that is not JSON."""
    text = _read_text(path)
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        yield from _iter_array(path, text)
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield n, None, f"bad JSON: {exc.msg} (column {exc.colno})"


def _iter_array(path: Path, text: str) -> Iterator[tuple[int, Any, str | None]]:
    """Items of a top-level JSON array with the line each starts on."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)

    def skip(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # A broken array cannot be re-synchronised: the rest of the file is unreadable.
            raise BadRequest(f"{path}:{exc.lineno}: bad JSON: {exc.msg} (column {exc.colno}); "
                             "a .json file is one array, so nothing after this point can be "
                             "read: fix it (or use JSONL, where one bad line drops one row)",
                             param="data") from None
        yield line, obj, None
        pos = skip(pos)
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            return
        raise BadRequest(f"{path}:{text.count(chr(10), 0, pos) + 1}: bad JSON: expected ',' or "
                         "']' between array items", param="data")


# -- rows -> messages ----------------------------------------------------------------------------

def detect_format(obj: dict[str, Any]) -> str:
    if "messages" in obj:
        return "openai"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj:
        return "alpaca"
    raise RowError("unknown_format", "unrecognized row: expected `messages` (OpenAI), "
                   "`conversations` (ShareGPT) or `instruction`/`output` (Alpaca), got keys "
                   + ", ".join(sorted(map(str, obj))[:8]))


def _text(value: Any, where: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RowError("bad_field", f"{where} must be a string, got {type(value).__name__}")
    return value


def from_alpaca(obj: dict[str, Any]) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    system = _text(obj.get("system"), "system", required=False)
    if system.strip():
        msgs.append({"role": "system", "content": system})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RowError("bad_field", "history must be a list of [instruction, output] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError("bad_field", f"history[{i}] must be an [instruction, output] pair")
        msgs.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        msgs.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    instruction = _text(obj.get("instruction"), "instruction")
    extra = _text(obj.get("input"), "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    if "output" not in obj:
        raise RowError("bad_field", "missing `output`")
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": _text(obj.get("output"), "output")})
    return msgs


def from_sharegpt(obj: dict[str, Any]) -> list[dict[str, str]]:
    conv = obj.get("conversations")
    if not isinstance(conv, list):
        raise RowError("bad_field", "conversations must be a list of {from, value} turns")
    msgs: list[dict[str, str]] = []
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        msgs.append({"role": "system", "content": system})
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RowError("bad_field", f"conversations[{i}] must be an object")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if isinstance(speaker, str) else None
        if role is None:
            raise RowError("unknown_role", f"unknown role {speaker!r} in conversations[{i}].from "
                           f"(known: {', '.join(sorted(SHAREGPT_ROLES))})")
        value = turn.get("value", turn.get("content"))
        msgs.append({"role": role, "content": _text(value, f"conversations[{i}].value")})
    return msgs


def from_openai(obj: dict[str, Any]) -> list[dict[str, str]]:
    raw = obj.get("messages")
    if not isinstance(raw, list):
        raise RowError("bad_field", "messages must be a list of {role, content} objects")
    msgs: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RowError("bad_field", f"messages[{i}] must be an object")
        role = OPENAI_ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise RowError("unknown_role", f"unknown role {m.get('role')!r} in messages[{i}].role"
                           " (supported: system, user, assistant; tool turns are out of scope)")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise RowError("bad_field", f"messages[{i}].content parts must all be text parts")
            content = "".join(p["text"] for p in content)
        msgs.append({"role": role, "content": _text(content, f"messages[{i}].content")})
    return msgs


PARSERS = {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "openai": from_openai}


def check_conversation(msgs: list[dict[str, str]]) -> None:
    """Structural checks every trainable conversation must pass (raises RowError)."""
    if not msgs:
        raise RowError("empty", "no messages")
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise RowError("bad_structure", f"system message at position {i}; only the first "
                           "message may be a system message")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError("empty_output", f"empty output (assistant turn {i})")
        if m["role"] == "user" and not m["content"].strip():
            raise RowError("empty_input", f"empty user message (turn {i})")
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError("no_assistant", "no assistant turn: nothing to learn")
    if msgs[-1]["role"] != "assistant":
        raise RowError("bad_structure", "the conversation ends with a user turn: nothing is "
                       "learned after it; drop the last turn or add the answer")


def parse_row(obj: Any, fmt: str = "auto") -> tuple[str, list[dict[str, str]]]:
    """(format, messages) for one decoded JSON row; RowError otherwise."""
    if not isinstance(obj, dict):
        raise RowError("bad_field", f"row must be a JSON object, got {type(obj).__name__}")
    kind = detect_format(obj) if fmt == "auto" else fmt
    if fmt != "auto" and kind == "alpaca" and "instruction" not in obj:
        raise RowError("bad_field", "not an Alpaca row (--format alpaca): missing `instruction`")
    msgs = PARSERS[kind](obj)
    check_conversation(msgs)
    return kind, msgs


def read_rows(files: list[Path], fmt: str = "auto") -> tuple[list[Row], list[Rejected]]:
    """Every row of every file, parsed; rejected rows keep their file:line and reason."""
    if fmt != "auto" and fmt not in FORMATS:
        raise BadRequest(f"unknown format {fmt!r}; use auto, {', '.join(FORMATS)}", param="format")
    rows: list[Row] = []
    rejected: list[Rejected] = []
    for path in files:
        for line, obj, error in iter_objects(path):
            source = f"{path}:{line}"
            if error is not None:
                rejected.append(Rejected(source, "bad_json", error))
                continue
            try:
                kind, msgs = parse_row(obj, fmt)
            except RowError as exc:
                rejected.append(Rejected(source, exc.code, exc.detail))
                continue
            rows.append(Row(source, kind, msgs))
    return rows, rejected
