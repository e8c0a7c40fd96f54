"""`loraplex data filter`: drop what should not be trained on, and say why.

Rows are read as the trainer reads them (any format it takes) and checked in input order; the
first rule a row breaks drops it, and only kept rows count as "earlier" for the duplicate rules
(the first occurrence wins). The rules, in order (reason codes as in the report):

1. `unreadable` (not JSON), `invalid` (the trainer's parser rejects it; its code in the detail),
   `empty_answer` (the last assistant turn is blank), or the reason a generation run recorded
   for an item it eliminated (`template_leak`, `empty_rewrite`, `unchanged`, `truncated_rewrite`).
2. `truncated`: the teacher stopped at max_tokens (`provenance.finish_reason == "length"`).
3. `too_short` / `too_long`: words (split on whitespace) of the instruction (the user turns)
   or of the answer (the last assistant turn) outside the limits.
4. `refusal`: the answer is refusal boilerplate ("As an AI language model", "I'm sorry, but I
   can't"...); `template_leak`: a row still holds an Evol-Instruct template marker.
5. `eval_overlap`: a user or assistant turn shares a word n-gram (default 13, as GPT-3's
   contamination analysis) with a user or assistant turn of an eval file; an eval text shorter
   than n words but at least `min_ngram` words long counts when it appears whole.
6. `duplicate`: the same conversation (system, turns, tools) as a kept row, up to case and
   whitespace.
7. `near_duplicate`: a MinHash LSH candidate (datasketch; word 3-shingles of the user and
   assistant turns) whose exact Jaccard similarity with a kept row is >= the threshold (0.8).
   LSH may miss a pair close to the threshold; it never drops a pair below it.
8. `rouge_similar`: the instruction's ROUGE-L F1 with a kept instruction is >= 0.7 (Self-Instruct).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraplex.trainer.datagen.prompts import LEAK_MARKERS, data_sources
from loraplex.trainer.datagen.textsim import RougeIndex, jaccard, ngrams, shingles, words

REASONS = ("unreadable", "invalid", "empty_answer", "template_leak", "empty_rewrite", "unchanged",
           "truncated_rewrite", "truncated", "too_short", "too_long", "refusal", "eval_overlap",
           "duplicate", "near_duplicate", "rouge_similar")
REFUSAL = re.compile(
    r"\b(as an ai( language)? model|as a (large )?language model|i'?m sorry,? but (i|as)|"
    r"i apologi[sz]e,? but|i (cannot|can'?t|can not|am unable to|am not able to|won'?t) "
    r"(help|assist|provide|fulfil|fulfill|comply|do that|answer))", re.IGNORECASE)


@dataclass
class FilterConfig:
    min_instruction_words: int = 3
    max_instruction_words: int = 150
    min_answer_words: int = 1
    max_answer_words: int | None = 2000
    drop_refusals: bool = True
    drop_truncated: bool = True
    near_dup_threshold: float | None = 0.8
    shingle: int = 3
    num_perm: int = 128
    rouge_threshold: float | None = 0.7
    eval_files: list[Path] = field(default_factory=list)
    ngram: int = 13
    min_ngram: int = 8
    examples: int = 3  # per reason, in the report


@dataclass
class Drop:
    source: str
    reason: str
    detail: str
    row: Any


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _turns(msgs: list[dict[str, Any]]) -> list[str]:
    """User and assistant texts (tool calls as JSON), system turns left out."""
    out = []
    for m in msgs:
        if m["role"] in ("user", "assistant"):
            text = m.get("content") or ""
            if m.get("tool_calls"):
                text += " " + json.dumps(m["tool_calls"], sort_keys=True, ensure_ascii=False)
            out.append(text)
    return out


class EvalIndex:
    """Word n-grams of every user and assistant turn of the eval files."""

    def __init__(self, files: list[Path], n: int, min_n: int):
        from loraplex.trainer.formats import RowError, parse_example

        self.n, self.min_n = n, min_n
        self.grams: dict[tuple[str, ...], str] = {}
        self.short: dict[int, dict[tuple[str, ...], str]] = {}  # whole texts under n words
        self.texts = self.unchecked = 0
        for src in data_sources(files, "--eval") if files else []:
            for where, obj, error in src.iter_rows():
                if error is not None:
                    continue
                try:
                    texts = _turns(parse_example(obj)[1])
                except RowError:  # prompts without answers, other shapes: every string
                    texts = list(_strings(obj))
                for text in texts:
                    self._add(words(text), where)

    def _add(self, toks: list[str], where: str) -> None:
        if not toks:
            return
        self.texts += 1
        if len(toks) >= self.n:
            for g in ngrams(toks, self.n):
                self.grams.setdefault(g, where)
        elif len(toks) >= self.min_n:
            self.short.setdefault(len(toks), {}).setdefault(tuple(toks), where)
        else:
            self.unchecked += 1

    def match(self, texts: list[str]) -> tuple[str, str] | None:
        """(the shared n-gram, the eval row it comes from), or None."""
        for text in texts:
            toks = words(text)
            for g in ngrams(toks, self.n):
                if g in self.grams:
                    return " ".join(g), self.grams[g]
            for k, table in self.short.items():
                for g in ngrams(toks, k):
                    if g in table:
                        return " ".join(g), table[g]
        return None


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k != "id":
                yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


class RowFilter:
    """The rules above, with the state of the rows kept so far."""

    def __init__(self, cfg: FilterConfig):
        from loraplex.adapters.errors import BadRequest

        if not 1 <= cfg.min_ngram <= cfg.ngram:
            raise BadRequest(f"need 1 <= --min-ngram ({cfg.min_ngram}) <= --ngram "
                             f"({cfg.ngram})", param="min_ngram")
        self.cfg = cfg
        self.eval = EvalIndex(cfg.eval_files, cfg.ngram, cfg.min_ngram) if cfg.eval_files else None
        self.exact: dict[str, str] = {}
        self.rouge = RougeIndex()
        self.lsh: Any = None
        self.shingle_sets: list[tuple[set[str], str]] = []
        if cfg.near_dup_threshold is not None:
            from datasketch import MinHash, MinHashLSH

            self.lsh = MinHashLSH(threshold=cfg.near_dup_threshold, num_perm=cfg.num_perm)
            self.blank = MinHash(num_perm=cfg.num_perm, seed=1)  # copies share its permutations

    def check(self, source: str, obj: Any, error: str | None) -> tuple[str, str] | None:
        """None when the row is kept (and remembered), else (reason, detail)."""
        from loraplex.trainer.formats import RowError, parse_example

        cfg = self.cfg
        if error is not None:
            return "unreadable", error
        if isinstance(obj, dict) and isinstance(obj.get("skipped"), str) and "messages" not in obj:
            reason = obj["skipped"]
            return (reason if reason in REASONS else "invalid"), f"eliminated at generation: {reason}"
        try:
            _, msgs, tools = parse_example(obj)
        except RowError as exc:
            if exc.code == "empty_output":
                return "empty_answer", exc.detail
            return "invalid", f"{exc.code}: {exc.detail}"
        prov = obj.get("provenance") if isinstance(obj.get("provenance"), dict) else {}
        if cfg.drop_truncated and prov.get("finish_reason") == "length":
            return "truncated", "the teacher stopped at max_tokens"
        instruction = "\n".join(m["content"] for m in msgs if m["role"] == "user")
        answer = _turns([m for m in msgs if m["role"] == "assistant"][-1:])[0]
        for what, text, lo, hi in (
                ("instruction", instruction, cfg.min_instruction_words, cfg.max_instruction_words),
                ("answer", answer, cfg.min_answer_words, cfg.max_answer_words)):
            n = len(text.split())
            if n < lo:
                return "too_short", f"{what}: {n} words < {lo}"
            if hi is not None and n > hi:
                return "too_long", f"{what}: {n} words > {hi}"
        if cfg.drop_refusals and (m := REFUSAL.search(answer)):
            return "refusal", f"answer says {m.group(0)!r}"
        if (m := LEAK_MARKERS.search(instruction) or LEAK_MARKERS.search(answer)):
            return "template_leak", f"holds {m.group(0)!r}"
        turns = _turns(msgs)
        if self.eval is not None and (hit := self.eval.match(turns)):
            return "eval_overlap", f"shares {hit[0]!r} with {hit[1]}"
        key = json.dumps([[m["role"], _norm(m.get("content") or ""), m.get("tool_calls")]
                          for m in msgs] + [tools], sort_keys=True, ensure_ascii=False)
        if key in self.exact:
            return "duplicate", f"same as {self.exact[key]}"
        sh = shingles(words("\n".join(turns)), cfg.shingle)
        mh = None
        if self.lsh is not None and sh:
            mh = self.blank.copy()
            mh.update_batch([s.encode("utf-8") for s in sh])
            best = None
            for i in self.lsh.query(mh):
                score = jaccard(sh, self.shingle_sets[i][0])
                if score >= cfg.near_dup_threshold and (best is None or i < best[0]):
                    best = (i, score)
            if best is not None:
                return "near_duplicate", (f"Jaccard {best[1]:.2f} with "
                                          f"{self.shingle_sets[best[0]][1]}")
        itoks = words(instruction)
        if cfg.rouge_threshold is not None:
            hit = self.rouge.most_similar(itoks, cfg.rouge_threshold)
            if hit is not None:
                return "rouge_similar", f"ROUGE-L {hit[0]:.2f} with {hit[1]}"
        # kept: remember it
        self.exact[key] = source
        if mh is not None:
            self.lsh.insert(len(self.shingle_sets), mh)
            self.shingle_sets.append((sh, source))
        self.rouge.add(itoks, source)
        return None


@dataclass
class FilterResult:
    kept: list[Any]
    dropped: list[Drop]
    report: dict[str, Any]


def _example(d: Drop) -> dict[str, Any]:
    row = d.row if isinstance(d.row, dict) else {}
    msgs = row.get("messages") if isinstance(row.get("messages"), list) else []
    first = next((m.get("content") for m in msgs if isinstance(m, dict)
                  and m.get("role") == "user"), row.get("instruction"))
    ex = {"source": d.source, "detail": d.detail}
    if isinstance(row.get("id"), str):
        ex["id"] = row["id"]
    if isinstance(first, str):
        ex["instruction"] = first[:200]
    return ex


def filter_rows(rows: Iterable[tuple[str, Any, str | None]], cfg: FilterConfig) -> FilterResult:
    """Check (source, object, error) rows in order; the report counts and shows the drops."""
    rf = RowFilter(cfg)
    kept: list[Any] = []
    dropped: list[Drop] = []
    total = 0
    for source, obj, error in rows:
        total += 1
        verdict = rf.check(source, obj, error)
        if verdict is None:
            kept.append(obj)
        else:
            dropped.append(Drop(source, verdict[0], verdict[1], obj))
    counts = Counter(d.reason for d in dropped)
    examples: dict[str, list[dict[str, Any]]] = {}
    for d in dropped:
        if len(examples.setdefault(d.reason, [])) < cfg.examples:
            examples[d.reason].append(_example(d))
    order = {r: i for i, r in enumerate(REASONS)}
    cfg_out = {k: (list(map(str, v)) if k == "eval_files" else v) for k, v in asdict(cfg).items()}
    report: dict[str, Any] = {
        "rows": total, "kept": len(kept), "dropped": len(dropped),
        "reasons": dict(sorted(counts.items(), key=lambda kv: order.get(kv[0], 99))),
        "examples": examples, "config": cfg_out}
    if rf.eval is not None:
        report["eval"] = {"texts": rf.eval.texts, "ngrams": len(rf.eval.grams),
                          "whole_short_texts": sum(map(len, rf.eval.short.values())),
                          "unchecked_short_texts": rf.eval.unchecked}
    return FilterResult(kept, dropped, report)


def _write_jsonl(path: Path, objs: Iterable[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for obj in objs:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    tmp.replace(path)


def filter_files(inputs: list[Path], output: Path, cfg: FilterConfig, *,
                 report_path: Path | None = None, dropped_path: Path | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Filter the inputs into `output` (kept rows, unchanged), `dropped_path` (each dropped row
    with its reason) and `report_path` (the report, plus `extra`); returns the report."""
    def rows() -> Iterator[tuple[str, Any, str | None]]:
        for src in data_sources(inputs, "--input"):
            yield from src.iter_rows()

    result = filter_rows(rows(), cfg)
    _write_jsonl(output, result.kept)
    if dropped_path is not None:
        _write_jsonl(dropped_path, ({"source": d.source, "reason": d.reason, "detail": d.detail,
                                     "row": d.row} for d in result.dropped))
    report = {"inputs": [str(p) for p in inputs], "output": str(output), **result.report,
              **(extra or {})}
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                               encoding="utf-8")
    return report


def summary(report: dict[str, Any]) -> str:
    """The report in a few lines: counts per reason with one example each."""
    lines = [f"filter: {report['rows']} rows -> {report['kept']} kept, "
             f"{report['dropped']} dropped"]
    for reason, count in report["reasons"].items():
        ex = (report["examples"].get(reason) or [{}])[0]
        lines.append(f"  {reason:<17} {count:>6}  e.g. {ex.get('source', '?')}: "
                     f"{ex.get('detail', '')}"[:160])
    if "eval" in report:
        e = report["eval"]
        lines.append(f"  eval set: {e['texts']} texts, {e['ngrams']} {report['config']['ngram']}"
                     f"-grams, {e['whole_short_texts']} short texts matched whole, "
                     f"{e['unchecked_short_texts']} too short to check")
    return "\n".join(lines)
