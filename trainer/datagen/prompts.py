"""The fixed prompts of the generation methods, the reading of prompt files, and the parsing of
what the teacher writes back.

- Self-Instruct (Wang et al., 2023, "Self-Instruct: Aligning Language Models with
  Self-Generated Instructions"): a numbered list of sampled tasks ("Task 1: ..."), ending with
  the next number for the teacher to continue; its checks on a new instruction (length,
  blocked keywords that a text model cannot do, a leading punctuation mark).
- Evol-Instruct (Xu et al., 2023, "WizardLM: Empowering Large Language Models to Follow Complex
  Instructions"): the in-depth rewrites (add constraints, deepen, concretize, more reasoning
  steps) and the in-breadth one (a new, rarer prompt in the same domain), shortened from the
  paper's templates, and its elimination of rewrites that leak the template's own words.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import BadRequest

METHODS = ("self-instruct", "evol-instruct", "distill")
SELF_INSTRUCT_HEADER = ("Come up with a series of new and diverse tasks. Continue the list in "
                        "the same style, one task per line:")
_TASK_MARK = re.compile(r"(?:^|\n)[ \t]*Task[ \t]*\d+[ \t]*[:.][ \t]*", re.IGNORECASE)
# Self-Instruct's blocked keywords: tasks a text-only model cannot do.
_BLOCKED = re.compile(r"\b(images?|graphs?|pictures?|files?|maps?|draw|plot|go to|videos?|"
                      r"audio|music|flowchart|diagram)\b", re.IGNORECASE)

_DEPTH = ("Rewrite the prompt below into a more complex version that is harder for AI "
          "assistants to handle, yet reasonable: a person must understand and answer it. "
          "{method} Add only 10 to 20 words, keep any code, table or input it holds, and reply "
          "with the rewritten prompt alone, without the words 'given prompt' or 'rewritten "
          "prompt'.\n\n#The Given Prompt#:\n{prompt}\n\n#Rewritten Prompt#:\n")
_BREADTH = ("Draw inspiration from the prompt below to create a brand-new prompt in the same "
            "domain, but rarer. Keep its length and complexity similar; a person must "
            "understand and answer it. Reply with the new prompt alone, without the words "
            "'given prompt' or 'created prompt'.\n\n#Given Prompt#:\n{prompt}\n\n"
            "#Created Prompt#:\n")
EVOL_OPS: dict[str, str] = {
    "constraints": _DEPTH.replace("{method}", "Add one more constraint or requirement."),
    "deepen": _DEPTH.replace("{method}", "If it asks about an issue, increase the depth and "
                             "breadth of the inquiry."),
    "concretize": _DEPTH.replace("{method}", "Replace general concepts with more specific "
                                 "ones."),
    "reasoning": _DEPTH.replace("{method}", "If a few simple thoughts solve it, rewrite it to "
                                "ask explicitly for reasoning in several steps."),
    "breadth": _BREADTH,
}
_LABEL = re.compile(r"^\s*#?\s*(the\s+)?(rewritten|created|new)\s+prompt\s*#?\s*:?\s*",
                    re.IGNORECASE)
# WizardLM's elimination: a rewrite that copies the template's words failed to evolve.
_LEAK_WORDS = re.compile(r"\b(given|rewritten|created)\s+prompt\b", re.IGNORECASE)
# In any row (the filter): the template's markers themselves.
LEAK_MARKERS = re.compile(r"#\s*(the\s+)?(given|rewritten|created)\s+prompt\s*#", re.IGNORECASE)


@dataclass
class Prompt:
    """A prompt to answer or evolve, or a seed task: `messages` end with a user turn;
    `instruction` is the task text alone (Alpaca's `instruction` without its `input`)."""

    id: str
    messages: list[dict[str, Any]]
    instruction: str

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def digest(*parts: object, size: int = 16) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:size]


def one_line(text: str) -> str:
    return " ".join(text.split())


def self_instruct_prompt(instructions: list[str]) -> str:
    lines = [SELF_INSTRUCT_HEADER]
    lines += [f"Task {i}: {one_line(t)}" for i, t in enumerate(instructions, 1)]
    lines.append(f"Task {len(instructions) + 1}:")
    return "\n".join(lines)


def parse_tasks(text: str, truncated: bool) -> list[str]:
    """New instructions in the teacher's continuation of the list: the text before the first
    "Task N:" mark (the continued task), then one per mark. A truncated reply (finish_reason
    "length") loses its last, unfinished task; a preamble ending in ":" is not a task."""
    pieces = _TASK_MARK.split(text)
    if truncated:
        pieces = pieces[:-1]
    out = []
    for i, piece in enumerate(pieces):
        task = one_line(piece)
        if i == 0 and len(pieces) > 1 and task.endswith(":"):
            continue
        if task:
            out.append(task)
    return out


def instruction_problem(text: str, min_words: int, max_words: int) -> str | None:
    """Self-Instruct's checks on a new instruction: None, or the reason to discard it."""
    n = len(text.split())
    if n < min_words or n > max_words:
        return "length"
    if _BLOCKED.search(text):
        return "keyword"
    if not text[0].isalnum():
        return "format"
    return None


def evol_prompt(op: str, instruction: str) -> str:
    return EVOL_OPS[op].replace("{prompt}", instruction)


def clean_rewrite(text: str, parent: str) -> tuple[str, str | None]:
    """(rewritten instruction, None), or (text, reason) when the evolution failed."""
    out = _LABEL.sub("", text.strip(), count=1).strip()
    if not out:
        return out, "empty_rewrite"
    if _LEAK_WORDS.search(out) or LEAK_MARKERS.search(out):
        return out, "template_leak"
    if one_line(out).lower() == one_line(parent).lower():
        return out, "unchanged"
    return out, None


# -- prompt files ---------------------------------------------------------------------------------

def read_prompts(paths: list[Path]) -> list[Prompt]:
    """Prompts from .txt files (one per line) and trainer data files (JSON lines, JSON, Parquet,
    directories): OpenAI `messages` or ShareGPT rows without their final answer, Alpaca rows
    (and Self-Instruct's seed format: `instruction` + `instances`), or {"prompt": "..."}. A row's
    `id` is kept when it has one, else derived from its content; repeated ids are read once."""
    out: dict[str, Prompt] = {}
    bad: list[str] = []
    for path in paths:
        readers = ([_text_rows(path)] if path.suffix == ".txt" else
                   [src.iter_rows() for src in data_sources([path], "--input")])
        for rows in readers:
            for where, obj, error in rows:
                prompt, problem = (None, error) if error else _prompt_of(obj)
                if prompt is None:
                    bad.append(f"{where}: {problem}")
                elif prompt.id not in out:
                    out[prompt.id] = prompt
    if not out:
        detail = f"; e.g. {bad[0]}" if bad else ""
        raise BadRequest(f"no prompts in {', '.join(map(str, paths))}{detail}", param="input")
    if bad:
        import sys

        print(f"data: skipped {len(bad)} input rows that hold no prompt, e.g. {bad[0]}",
              file=sys.stderr)
    return list(out.values())


def data_sources(specs: list[Path], option: str) -> list[Any]:
    """The trainer's sources (trainer/sources.py): files, directories of shards, `datasets`
    directories and `hf:` hub datasets; `option` is named in their errors."""
    from loraplex.trainer.sources import data_sources as sources

    return sources(specs, split_option=option)


def _text_rows(path: Path):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read prompt file {str(path)!r}: {exc}", param="input") from None
    for n, line in enumerate(lines, start=1):
        if line.strip():
            yield f"{path}:{n}", line.strip(), None


def _prompt_of(obj: Any) -> tuple[Prompt | None, str | None]:
    from loraplex.trainer.formats import RowError, from_openai, from_sharegpt

    messages: list[dict[str, Any]]
    instruction = None
    try:
        if isinstance(obj, str):
            messages = [{"role": "user", "content": obj}]
        elif not isinstance(obj, dict):
            return None, "not a JSON object"
        elif "messages" in obj or "conversations" in obj:
            messages = from_openai(obj) if "messages" in obj else from_sharegpt(obj)
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
        elif isinstance(obj.get("instruction"), str):
            instruction = obj["instruction"].strip()
            extra = obj.get("input")
            if extra is None and isinstance(obj.get("instances"), list) and obj["instances"]:
                extra = (obj["instances"][0] or {}).get("input")
            user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() \
                else instruction
            messages = [{"role": "user", "content": user}]
            if isinstance(obj.get("system"), str) and obj["system"].strip():
                messages.insert(0, {"role": "system", "content": obj["system"]})
        elif isinstance(obj.get("prompt"), str):
            messages = [{"role": "user", "content": obj["prompt"]}]
        else:
            return None, "no messages, conversations, instruction or prompt"
    except RowError as exc:
        return None, exc.detail
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        return None, "does not end with a non-empty user turn"
    if any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return None, "tool calls are not supported here"
    rid = obj.get("id") if isinstance(obj, dict) else None
    pid = str(rid) if isinstance(rid, (str, int)) and str(rid) else \
        "p-" + digest(json.dumps(messages, sort_keys=True), size=12)
    return Prompt(pid, messages, instruction or messages[-1]["content"].strip()), None
