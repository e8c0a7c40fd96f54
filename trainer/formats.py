"""Instruction-data parsers: Alpaca, ShareGPT and OpenAI `messages`, all turned into chat messages.

Every row becomes either a conversation (`[{"role", "content"}, ...]`) or a rejection with its
`file:line` and a reason; nothing is dropped silently. The format is detected per row from its
keys (`messages` -> OpenAI, `conversations` -> ShareGPT, `instruction` -> Alpaca) unless forced,
so a directory of shards may mix formats.

- Alpaca: {"instruction", "input"?, "output", "system"?, "history"?: [[instruction, output], ...]};
  a non-empty `input` is appended to the instruction after a blank line (the Alpaca convention).
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}], "system"?,
  "tools"?}; LLaMA-Factory's tool turns: `function_call` (the assistant's call, a JSON string
  {"name", "arguments"} or a list of them for parallel calls) and `observation` (a tool result,
  answering the calls before it in order).
- OpenAI: {"messages": [{"role": "system"|"developer"|"user"|"assistant"|"tool", "content": str
  | text parts | null}], "tools"?}: an assistant turn may carry `tool_calls` (content null),
  a `tool` message answers one of them by `tool_call_id`.

Tool definitions (`tools`: a list, or a JSON string of one, as LLaMA-Factory stores the column;
each an OpenAI {"type": "function", "function": {...}} or a bare {"name", "description",
"parameters"}) are normalized to what the server passes its template for the same tools (the
OpenAI shape with the fields name, description, parameters, strict, None left out), so the
system prompt an adapter learns is the one it is served with. Tool calls are normalized to
{"id", "type": "function", "function": {"name", "arguments": {...}}} (arguments parsed, as
vLLM's server passes them to templates). Malformed tool data rejects the row (`bad_tools`,
`bad_tool_call`).

Files, directories, Parquet and `datasets` sources: sources.py (`read_rows` reads any of them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import BadRequest
from loraplex.trainer.sources import DataSource

FORMATS = ("alpaca", "sharegpt", "openai")

# ShareGPT speaker names seen in the wild -> chat roles; `function_call` is an assistant turn
# that calls tools, `observation` (LLaMA-Factory) or `tool` a tool's result.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "ai": "assistant",
    "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool",
}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool"}
# What the server accepts as a function name (server/openai/protocol.py FunctionDef).
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class RowError(Exception):
    """A row that cannot become a training conversation; `code` groups the report."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass
class Row:
    """One parsed row: its provenance, the detected format, and its conversation."""

    source: str  # "path:line" (JSON), "name[index]" (Arrow rows)
    format: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions for the template


@dataclass
class Rejected:
    source: str
    code: str
    detail: str

    def __str__(self) -> str:
        return f"{self.source}: {self.detail}"


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


def from_sharegpt(obj: dict[str, Any]) -> list[dict[str, Any]]:
    conv = obj.get("conversations")
    if not isinstance(conv, list):
        raise RowError("bad_field", "conversations must be a list of {from, value} turns")
    msgs: list[dict[str, Any]] = []
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        msgs.append({"role": "system", "content": system})
    pending: list[str] = []  # ids of the last function_call's calls not yet answered
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RowError("bad_field", f"conversations[{i}] must be an object")
        speaker = turn.get("from", turn.get("role"))
        key = str(speaker).lower() if isinstance(speaker, str) else None
        role = SHAREGPT_ROLES.get(key) if key else None
        if role is None:
            raise RowError("unknown_role", f"unknown role {speaker!r} in conversations[{i}].from "
                           f"(known: {', '.join(sorted(SHAREGPT_ROLES))})")
        where = f"conversations[{i}].value"
        value = _text(turn.get("value", turn.get("content")), where)
        if key == "function_call":
            calls = _sharegpt_calls(value, where, i)
            pending = [c["id"] for c in calls]
            msgs.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif role == "tool":
            if not pending:
                raise RowError("bad_tool_call", f"conversations[{i}] ({speaker}) is a tool result "
                               "with no function_call before it left to answer")
            msgs.append({"role": "tool", "content": value, "tool_call_id": pending.pop(0)})
        else:
            pending = []
            msgs.append({"role": role, "content": value})
    return msgs


def _sharegpt_calls(value: str, where: str, turn: int) -> list[dict[str, Any]]:
    """A `function_call` value: {"name", "arguments"} or a list of them, as a JSON string."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowError("bad_tool_call", f"{where} (function_call) is not JSON: {exc.msg} "
                       f"(column {exc.colno}); expected {{\"name\": ..., \"arguments\": "
                       "{...}}") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise RowError("bad_tool_call", f"{where} (function_call) holds no call")
    return [_call(c, c.get("arguments") if isinstance(c, dict) else None,
                  f"{where}[{j}]" if isinstance(parsed, list) else where, f"call_{turn}_{j}")
            for j, c in enumerate(items)]


def _call(fn: Any, args: Any, where: str, call_id: str) -> dict[str, Any]:
    """One tool call, normalized; `fn` holds its name, `args` its arguments (a JSON object or
    its text; missing: no arguments)."""
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RowError("bad_tool_call", f"{where} must be a call {{\"name\": ..., "
                       "\"arguments\": {...}} with a non-empty name")
    if args is None:
        args = {}
    elif isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise RowError("bad_tool_call", f"{where}: arguments of {fn['name']!r} are not JSON: "
                           f"{exc.msg} (column {exc.colno})") from None
    if not isinstance(args, dict):
        raise RowError("bad_tool_call", f"{where}: arguments of {fn['name']!r} must be a JSON "
                       f"object, got {type(args).__name__}")
    return {"id": call_id, "type": "function",
            "function": {"name": fn["name"], "arguments": args}}


def from_openai(obj: dict[str, Any]) -> list[dict[str, Any]]:
    raw = obj.get("messages")
    if not isinstance(raw, list):
        raise RowError("bad_field", "messages must be a list of {role, content} objects")
    msgs: list[dict[str, Any]] = []
    pending: set[str] = set()  # ids of the last assistant turn's calls not yet answered
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RowError("bad_field", f"messages[{i}] must be an object")
        role = OPENAI_ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise RowError("unknown_role", f"unknown role {m.get('role')!r} in messages[{i}].role"
                           " (supported: system, developer, user, assistant, tool)")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise RowError("bad_field", f"messages[{i}].content parts must all be text parts")
            # joined as the server joins them (vLLM's "\n"), so train and serve see one text
            content = "\n".join(p["text"] for p in content)
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None and calls != []:
            msg = {"role": role, "content": _text(content, f"messages[{i}].content",
                                                  required=False),
                   "tool_calls": _openai_calls(calls, f"messages[{i}].tool_calls")}
            pending = {c["id"] for c in msg["tool_calls"]}
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RowError("bad_tool_call", f"messages[{i}] (role tool) needs tool_call_id: "
                               "the id of the assistant tool call it answers")
            if call_id not in pending:
                raise RowError("bad_tool_call", f"messages[{i}].tool_call_id {call_id!r} answers "
                               "no unanswered tool call of the assistant turn before it")
            pending.discard(call_id)
            msg = {"role": "tool", "content": _text(content, f"messages[{i}].content"),
                   "tool_call_id": call_id}
            if isinstance(m.get("name"), str):
                msg["name"] = m["name"]
        else:
            pending = set()
            msg = {"role": role, "content": _text(content, f"messages[{i}].content")}
        msgs.append(msg)
    return msgs


def _openai_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise RowError("bad_tool_call", f"{where} must be a list of tool calls")
    out = []
    for j, c in enumerate(calls):
        w = f"{where}[{j}]"
        if not isinstance(c, dict) or c.get("type", "function") != "function":
            raise RowError("bad_tool_call", f'{w} must be {{"id": ..., "type": "function", '
                           '"function": {"name": ..., "arguments": "{...}"}}')
        if not isinstance(c.get("id"), str) or not c["id"]:
            raise RowError("bad_tool_call", f"{w} needs an id (the tool message answering it "
                           "names it in tool_call_id)")
        fn = c.get("function")
        out.append(_call(fn, fn.get("arguments") if isinstance(fn, dict) else None,
                         f"{w}.function", c["id"]))
    ids = [c["id"] for c in out]
    if len(set(ids)) != len(ids):
        raise RowError("bad_tool_call", f"{where}: tool call ids must be unique")
    return out


def parse_tools(obj: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The row's `tools` (a list or a JSON string of one), in the shape the server passes the
    template: [{"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}] (`model_dump(exclude_none=True)` of its request model); None when absent."""
    raw = obj.get("tools")
    if raw is None or raw == "" or raw == []:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RowError("bad_tools", f"tools is not JSON: {exc.msg} (column {exc.colno})"
                           ) from None
    if not isinstance(raw, list):
        raise RowError("bad_tools", f"tools must be a list of function definitions, got "
                       f"{type(raw).__name__}")
    out = []
    for j, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) and "function" in t else t
        if not isinstance(fn, dict) or (isinstance(t, dict) and t.get("type", "function")
                                        != "function"):
            raise RowError("bad_tools", f'tools[{j}] must be {{"type": "function", "function": '
                           '{"name": ..., "description": ..., "parameters": {...}}} or the '
                           "function object itself")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise RowError("bad_tools", f"tools[{j}] needs a name of 1-64 letters, digits, _ . or "
                           f"- (got {name!r})")
        for key, kind in (("description", str), ("parameters", dict), ("strict", bool)):
            if fn.get(key) is not None and not isinstance(fn[key], kind):
                raise RowError("bad_tools", f"tools[{j}] ({name}): {key} must be a "
                               f"{'JSON object' if kind is dict else kind.__name__}")
        clean = {k: fn[k] for k in ("name", "description", "parameters", "strict")
                 if fn.get(k) is not None}
        out.append({"type": "function", "function": clean})
    names = [t["function"]["name"] for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise RowError("bad_tools", f"tools defines {dup!r} twice")
    return out


PARSERS = {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "openai": from_openai}


def check_conversation(msgs: list[dict[str, Any]],
                       tools: list[dict[str, Any]] | None = None) -> None:
    """Structural checks every trainable conversation must pass (raises RowError)."""
    if not msgs:
        raise RowError("empty", "no messages")
    names = {t["function"]["name"] for t in tools} if tools else None
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise RowError("bad_structure", f"system message at position {i}; only the first "
                           "message may be a system message")
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise RowError("empty_output", f"empty output (assistant turn {i})")
        if m["role"] == "user" and not m["content"].strip():
            raise RowError("empty_input", f"empty user message (turn {i})")
        if m["role"] == "tool" and (i == 0 or not (msgs[i - 1]["role"] == "tool"
                                                   or msgs[i - 1].get("tool_calls"))):
            raise RowError("bad_tool_call", f"tool result at position {i} does not follow an "
                           "assistant turn that calls tools")
        for call in m.get("tool_calls") or []:
            name = call["function"]["name"]
            if names is not None and name not in names:
                raise RowError("bad_tool_call", f"turn {i} calls {name!r}, which the row's tools "
                               f"do not define ({', '.join(sorted(names))})")
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError("no_assistant", "no assistant turn: nothing to learn")
    if msgs[-1]["role"] != "assistant":
        last = "a tool result" if msgs[-1]["role"] == "tool" else "a user turn"
        raise RowError("bad_structure", f"the conversation ends with {last}: nothing is "
                       "learned after it; drop the last turn or add the answer")


def parse_row(obj: Any, fmt: str = "auto") -> tuple[str, list[dict[str, Any]]]:
    """(format, messages) for one decoded JSON row; RowError otherwise."""
    kind, msgs, _ = parse_example(obj, fmt)
    return kind, msgs


def parse_example(obj: Any, fmt: str = "auto"
                  ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(format, messages, tools) for one decoded JSON row; RowError otherwise."""
    if not isinstance(obj, dict):
        raise RowError("bad_field", f"row must be a JSON object, got {type(obj).__name__}")
    kind = detect_format(obj) if fmt == "auto" else fmt
    if fmt != "auto" and kind == "alpaca" and "instruction" not in obj:
        raise RowError("bad_field", "not an Alpaca row (--format alpaca): missing `instruction`")
    msgs = PARSERS[kind](obj)
    tools = parse_tools(obj)
    check_conversation(msgs, tools)
    return kind, msgs, tools


def read_rows(sources: Sequence[DataSource | Path], fmt: str = "auto"
              ) -> tuple[list[Row], list[Rejected]]:
    """Every row of every source (a DataSource, or a file path), parsed; rejected rows keep
    their file:line (or name[index]) and reason."""
    if fmt != "auto" and fmt not in FORMATS:
        raise BadRequest(f"unknown format {fmt!r}; use auto, {', '.join(FORMATS)}", param="format")
    rows: list[Row] = []
    rejected: list[Rejected] = []
    for src in sources:
        if not isinstance(src, DataSource):
            src = DataSource.file(Path(src))
        for source, obj, error in src.iter_rows():
            if error is not None:
                rejected.append(Rejected(source, "bad_json", error))
                continue
            try:
                kind, msgs, tools = parse_example(obj, fmt)
            except RowError as exc:
                rejected.append(Rejected(source, exc.code, exc.detail))
                continue
            rows.append(Row(source, kind, msgs, tools))
    return rows, rejected
