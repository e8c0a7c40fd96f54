"""Eval sets: JSON-lines files of prompts and the checks their answers must pass.

One row per line (blank lines and lines starting with `//` are skipped):

    {"id": "q1", "messages": [{"role": "user", "content": "..."}], "expected": "..."}
    {"prompt": "...", "checks": [{"type": "contains", "value": "..."}, {"type": "regex", ...}]}
    {"prompt": "Answer in capitals, under 20 words: ...", "checks": [{"type": "case",
      "case": "upper"}, {"type": "word_count", "max": 20}]}
    {"instruction": "...", "input": "", "output": "..."}          # Alpaca: exact match on output

The prompt is `messages` (OpenAI), `conversations` (ShareGPT), Alpaca's instruction/input or
`prompt` (a string; `system` adds a system turn). A final assistant turn (or Alpaca's `output`)
is the reference answer: the judge sees it, and without `expected`/`check`/`checks` it is an
exact-match check, so the trainer's held-out files evaluate as they are (the same whitespace-
trimmed exact match as the trainer's). `expected: "..."` is `{"type": "exact_match"}`;
`reference` gives the judge a reference without checking it. A row may also have no check at
all (judge only). The set's name is its file name without `.jsonl` (or NAME from NAME=FILE),
its identity the sha256 of the file's bytes; `ifeval` names the bundled IFEval-style set.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import BadRequest
from loraplex.trainer.evals import checks

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUNDLED = {"ifeval": DATA_DIR / "ifeval.prompts.jsonl"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class Item:
    id: str
    messages: list[dict[str, Any]]
    checks: list[dict[str, Any]] = field(default_factory=list)
    reference: str | None = None

    @property
    def question(self) -> str:
        return str(self.messages[-1].get("content") or "") if self.messages else ""


@dataclass
class EvalSet:
    name: str
    path: str
    sha256: str
    items: list[Item]

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "n": len(self.items)}


def parse_set_arg(value: str, base_dir: Path | None = None) -> tuple[str, Path]:
    """`FILE`, `NAME=FILE` or a bundled name -> (name, path); paths relative to `base_dir`."""
    name, sep, rest = value.partition("=")
    if not sep:
        name, rest = "", value
    if not sep and value in BUNDLED and not (base_dir or Path.cwd()).joinpath(value).is_file():
        return value, BUNDLED[value]
    path = Path(rest).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not name:
        name = path.name[:-6] if path.name.endswith(".jsonl") else path.stem
    if not _NAME.fullmatch(name):
        raise BadRequest(f"invalid eval set name {name!r}: letters, digits, '.', '_', '-' "
                         "(name it with NAME=FILE)", param="set")
    return name, path


def _prompt(obj: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """(prompt messages, reference answer or None) of one row."""
    from loraplex.trainer import formats

    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError("`prompt` must be a non-empty string")
        msgs = [{"role": "user", "content": obj["prompt"]}]
        system = obj.get("system")
        if isinstance(system, str) and system.strip():
            msgs.insert(0, {"role": "system", "content": system})
        return msgs, None
    kind = formats.detect_format(obj)
    if kind == "alpaca" and "output" not in obj:
        obj = {**obj, "output": ""}  # a prompt to be checked, not answered
        msgs = formats.from_alpaca(obj)[:-1]
    else:
        msgs = formats.PARSERS[kind](obj)
    if not msgs or msgs[-1]["role"] not in ("user", "assistant", "tool"):
        raise ValueError("the conversation must end with a user turn (or the reference answer)")
    if msgs[-1]["role"] == "assistant":
        return msgs[:-1], str(msgs[-1].get("content") or "")
    return msgs, None


def parse_item(obj: Any, index: int) -> Item:
    if not isinstance(obj, dict):
        raise ValueError(f"a row is a JSON object, got {type(obj).__name__}")
    msgs, reference = _prompt(obj)
    if not msgs:
        raise ValueError("no prompt")
    specs: list[Any] = []
    if "check" in obj:
        specs.append(obj["check"])
    if "checks" in obj:
        if not isinstance(obj["checks"], list):
            raise ValueError("`checks` must be a list of check objects")
        specs.extend(obj["checks"])
    if "expected" in obj:
        if not isinstance(obj["expected"], str):
            raise ValueError("`expected` must be a string")
        specs.append({"type": "exact_match", "value": obj["expected"]})
        reference = obj["expected"] if reference is None else reference
    if not specs and reference is not None and "reference" not in obj:
        specs.append({"type": "exact_match", "value": reference})
    if isinstance(obj.get("reference"), str):
        reference = obj["reference"]
    return Item(id=str(obj.get("id", index)), messages=msgs,
                checks=[checks.validate(s) for s in specs], reference=reference)


def load_set(name: str, path: Path, limit: int | None = None) -> EvalSet:
    """Read and validate a set (every check's arguments too); BadRequest naming file:line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadRequest(f"cannot read eval set {str(path)!r}: {exc.strerror or exc}",
                         param="set") from None
    items: list[Item] = []
    seen: set[str] = set()
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        try:
            item = parse_item(json.loads(line), len(items))
        except Exception as exc:  # ValueError, RowError, CheckSpecError
            msg = getattr(exc, "message", None) or str(exc)
            raise BadRequest(f"{path}:{lineno}: {msg}", param="set") from None
        if item.id in seen:
            raise BadRequest(f"{path}:{lineno}: id {item.id!r} appears twice", param="set")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise BadRequest(f"eval set {str(path)!r} has no rows", param="set")
    return EvalSet(name=name, path=str(path), sha256=hashlib.sha256(data).hexdigest(),
                   items=items[:limit] if limit else items)


def load_sets(values: list[str], base_dir: Path | None = None,
              limit: int | None = None) -> list[EvalSet]:
    out: list[EvalSet] = []
    for v in values:
        name, path = parse_set_arg(v, base_dir)
        if any(s.name == name for s in out):
            raise BadRequest(f"two eval sets are named {name!r}: name one NAME=FILE",
                             param="set")
        out.append(load_set(name, path, limit))
    if not out:
        raise BadRequest("no eval set: give --set FILE (or --set ifeval, the bundled prompts)",
                         param="set")
    return out
