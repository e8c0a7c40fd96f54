"""From data sources to token ids with label masks: validation, curation, tokenization, batching.

    data = prepare_data(cfg, tokenizer, template)   # Examples + a DataReport; raises on --strict
    for batch_idx in batch_order(lengths, cfg.batch_size, seed, epoch): collate(...)

Sources are files (JSON lines, JSON, Parquet), `datasets` save_to_disk directories and hub
datasets from the local cache (sources.data_sources; `--split`/`--eval-split` pick a split).
Order of checks, each rejection keeping its file:line (Arrow rows: name[index]) and reason
(formats.py does the first three): bad JSON -> unknown format/role, bad fields -> conversation structure (empty output, no
assistant turn, ...) -> special tokens written in the text -> rendering through the chat template
-> too long for --max-seq-len -> length filters -> duplicates (exact or normalized; the first
occurrence wins, and eval rows that duplicate a training row are dropped so the held-out score is
honest) -> eval split by fraction when no eval file is given.

Batching. Examples are short and unequal, so padding wastes compute. Two padding-aware modes:
- default: length-grouped batches (shuffle, sort within chunks of 64 batches, shuffle the batches),
  right-padded with an attention mask: almost no pad tokens, no change to the attention math;
- `--packing`: a micro-batch's examples are concatenated into ONE row without any padding, with
  position ids restarting at 0 for each example. transformers (masking_utils) turns restarting
  position ids into a block-diagonal causal mask when no 2-D attention mask is passed, so no token
  attends across an example boundary (tests/trainer check logits against unpacked runs). Labels of
  each example's first token are masked so no loss crosses a boundary either.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplex.adapters.chat import IGNORE_INDEX, render_for_training, template_label
from loraplex.adapters.errors import BadRequest
from loraplex.trainer.formats import Rejected, Row, read_rows
from loraplex.trainer.sources import DataSource, data_sources

if TYPE_CHECKING:
    from loraplex.adapters.chat import ChatTokenizer
    from loraplex.trainer.config import TrainConfig

MAX_LISTED = 50  # rejected rows printed on the console; all of them go to rejected.jsonl


@dataclass
class Example:
    source: str
    messages: list[dict[str, Any]]
    input_ids: list[int]
    labels: list[int]
    cuts: int = 0  # label starts where the boundary rule cut a merged token (docs/rendering.md)
    dropped: int = 0  # messages the template did not write into the text
    tools: list[dict[str, Any]] | None = None  # the row's tool definitions (in the prompt)

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class DataReport:
    files: list[str]
    eval_files: list[str]
    rows: int = 0
    formats: Counter = field(default_factory=Counter)
    rejected: list[Rejected] = field(default_factory=list)
    train: int = 0
    eval: int = 0
    train_tokens: int = 0
    label_tokens: int = 0
    boundary_rows: int = 0  # training rows where the boundary rule applied
    dropped_message_rows: int = 0  # rows where the template did not write every message
    files_sha256: dict[str, str] = field(default_factory=dict)
    data_sha256: str = ""

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(Counter(r.code for r in self.rejected).most_common())

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files, "eval_files": self.eval_files, "rows": self.rows,
            "formats": dict(self.formats), "kept": self.train + self.eval,
            "dropped": len(self.rejected), "dropped_by_reason": self.by_reason,
            "train": self.train, "eval": self.eval, "train_tokens": self.train_tokens,
            "label_tokens": self.label_tokens, "boundary_rows": self.boundary_rows,
            "dropped_message_rows": self.dropped_message_rows,
            "files_sha256": self.files_sha256,
            "data_sha256": self.data_sha256,
        }

    def summary(self) -> list[str]:
        reasons = ", ".join(f"{k} {v}" for k, v in self.by_reason.items()) or "none"
        lines = [f"data: {self.rows} rows from {len(self.files) + len(self.eval_files)} file(s) "
                 f"({', '.join(f'{k} {v}' for k, v in self.formats.items()) or 'none parsed'}); "
                 f"kept {self.train + self.eval} (train {self.train}, eval {self.eval}), "
                 f"dropped {len(self.rejected)} ({reasons})"]
        if self.boundary_rows:
            lines.append(f"  boundary rule applied in {self.boundary_rows} training row(s): a "
                         "token merged across the prompt/answer boundary was cut so the prompt "
                         "ids are the served ones (--inspect shows them; docs/rendering.md)")
        if self.dropped_message_rows:
            lines.append(f"  warning: in {self.dropped_message_rows} training row(s) the chat "
                         "template did not write every message (e.g. Mistral v0.3 drops the "
                         "system prompt when a conversation ends with an assistant turn): the "
                         "model is not trained with them")
        lines += [f"  dropped {r}" for r in self.rejected[:MAX_LISTED]]
        if len(self.rejected) > MAX_LISTED:
            lines.append(f"  ... and {len(self.rejected) - MAX_LISTED} more (all listed in "
                         "rejected.jsonl next to the adapter)")
        return lines


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    report: DataReport


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_source(source: DataSource) -> str:
    """A file's sha256; for a source of several files (a `datasets` directory, a hub dataset's
    cached Arrow files) the sha256 of their `sha256  name` lines, in name order."""
    files = source.files()
    if source.kind == "file":
        return sha256_file(files[0][1])
    lines = "".join(f"{sha256_file(path)}  {name}\n" for name, path in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _identity(msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Any:
    """What makes a row: its messages, and its tools when it has any (rows without tools hash
    as they always did)."""
    return {"messages": msgs, "tools": tools} if tools else msgs


def _dedup_key(msgs: list[dict[str, Any]], mode: str,
               tools: list[dict[str, Any]] | None = None) -> str:
    if mode == "normalized":  # case, whitespace and punctuation do not make a new example
        msgs = [{**m, "content": " ".join(re.sub(r"[^\w\s]", " ", m["content"].casefold())
                                          .split())} for m in msgs]
    key = json.dumps(_identity(msgs, tools), sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _row_texts(row: Row) -> list[str]:
    """Every text of a row the template writes: contents, tool calls, tool definitions."""
    texts = [m["content"] for m in row.messages]
    texts += [json.dumps(m["tool_calls"], ensure_ascii=False)
              for m in row.messages if m.get("tool_calls")]
    if row.tools:
        texts.append(json.dumps(row.tools, ensure_ascii=False))
    return texts


def _tokenize(rows: list[Row], cfg: TrainConfig, tokenizer: ChatTokenizer, template: str,
              rejected: list[Rejected]) -> list[Example]:
    specials = tokenizer.added_tokens
    out: list[Example] = []
    for row in rows:
        hit = next((t for x in _row_texts(row) for t in specials if t in x), None)
        if hit is not None:
            rejected.append(Rejected(row.source, "special_token", f"the text contains the special "
                                     f"token {hit!r}, which would break the turn structure"))
            continue
        try:
            r = render_for_training(template, row.messages, tokenizer,
                                    train_on_inputs=cfg.train_on_inputs, tools=row.tools)
        except BadRequest as exc:
            rejected.append(Rejected(row.source, "template_error", exc.message))
            continue
        ids = r.token_ids
        if len(ids) > cfg.max_seq_len:
            rejected.append(Rejected(row.source, "too_long", f"too long: {len(ids)} tokens after "
                                     f"rendering with {template_label(template)} > --max-seq-len "
                                     f"{cfg.max_seq_len}"))
            continue
        if len(ids) < cfg.min_tokens:
            rejected.append(Rejected(row.source, "too_short", f"filtered: {len(ids)} tokens < "
                                     f"--min-tokens {cfg.min_tokens}"))
            continue
        if cfg.max_tokens is not None and len(ids) > cfg.max_tokens:
            rejected.append(Rejected(row.source, "too_long_filter", f"filtered: {len(ids)} tokens "
                                     f"> --max-tokens {cfg.max_tokens}"))
            continue
        out.append(Example(row.source, row.messages, ids, r.labels, r.cuts, len(r.dropped),
                           row.tools))
    return out


def _dedup(examples: list[Example], mode: str, seen: dict[str, str],
           rejected: list[Rejected]) -> list[Example]:
    if mode == "none":
        return examples
    kept = []
    for ex in examples:
        key = _dedup_key(ex.messages, mode, ex.tools)
        if key in seen:
            rejected.append(Rejected(ex.source, "duplicate",
                                     f"{mode} duplicate of {seen[key]}"))
            continue
        seen[key] = ex.source
        kept.append(ex)
    return kept


def prepare_data(cfg: TrainConfig, tokenizer: ChatTokenizer, template: str) -> PreparedData:
    """Read, validate, curate, tokenize, split. BadRequest on --strict drops or no data left."""
    sources = data_sources(cfg.data, cfg.split, "--split")
    eval_sources = (data_sources(cfg.eval_data, cfg.eval_split, "--eval-split")
                    if cfg.eval_data else [])
    report = DataReport([s.label for s in sources], [s.label for s in eval_sources])
    report.files_sha256 = {s.label: sha256_source(s) for s in sources + eval_sources}

    rows, rejected = read_rows(sources, cfg.format)
    eval_rows, eval_rejected = read_rows(eval_sources, cfg.format) if eval_sources else ([], [])
    rejected += eval_rejected
    report.rows = len(rows) + len(eval_rows) + len(rejected)
    report.formats = Counter(r.format for r in rows + eval_rows)

    train = _tokenize(rows, cfg, tokenizer, template, rejected)
    held = _tokenize(eval_rows, cfg, tokenizer, template, rejected)
    seen: dict[str, str] = {}
    train = _dedup(train, cfg.dedup, seen, rejected)
    held = _dedup(held, cfg.dedup, seen, rejected)

    if not held and cfg.eval_fraction > 0 and train:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, round(cfg.eval_fraction * len(train)))
        if n_eval >= len(train):
            raise BadRequest(f"--eval-fraction {cfg.eval_fraction} leaves no training examples "
                             f"out of {len(train)}", param="eval_fraction")
        picked = set(order[:n_eval])
        held = [ex for i, ex in enumerate(train) if i in picked]
        train = [ex for i, ex in enumerate(train) if i not in picked]

    report.rejected = rejected
    report.train, report.eval = len(train), len(held)
    report.train_tokens = sum(len(ex.input_ids) for ex in train)
    report.label_tokens = sum(ex.n_labels for ex in train)
    report.boundary_rows = sum(1 for ex in train if ex.cuts)
    report.dropped_message_rows = sum(1 for ex in train if ex.dropped)
    h = hashlib.sha256()
    for part, exs in (("train", train), ("eval", held)):
        h.update(part.encode())
        for ex in exs:
            h.update(json.dumps(_identity(ex.messages, ex.tools), sort_keys=True).encode()
                     + b"\n")
    report.data_sha256 = "sha256:" + h.hexdigest()

    if cfg.strict and rejected:
        listed = "\n".join(f"  {r}" for r in rejected[:MAX_LISTED])
        extra = len(rejected) - MAX_LISTED
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        raise BadRequest(f"--strict: {len(rejected)} row(s) rejected:\n{listed}{more}",
                         param="data")
    if not train:
        reasons = ", ".join(f"{k} {v}" for k, v in report.by_reason.items()) or "no rows"
        first = f"; first: {rejected[0]}" if rejected else ""
        raise BadRequest(f"no training examples left: {report.rows} row(s) read from "
                         f"{', '.join(report.files)}, {len(rejected)} rejected ({reasons}){first}",
                         param="data")
    return PreparedData(train, held, report)


def inspect_lines(ex: Example, decode: Any) -> list[str]:
    """Token-by-token view of one example: position, id, token text, label (or '-')."""
    cut = f", boundary rule applied at {ex.cuts} turn(s)" if ex.cuts else ""
    lines = [f"== {ex.source}  ({len(ex.input_ids)} tokens, {ex.n_labels} labelled{cut})"]
    for pos, (tid, lab) in enumerate(zip(ex.input_ids, ex.labels)):
        mark = "-" if lab == IGNORE_INDEX else str(lab)
        token = json.dumps(decode([tid]), ensure_ascii=False)
        lines.append(f"{pos:5d} {tid:7d} {token:<24} {mark}")
    trained = decode([t for t in ex.labels if t != IGNORE_INDEX])
    lines.append(f"   trained text: {json.dumps(trained, ensure_ascii=False)}")
    return lines


# -- batching ------------------------------------------------------------------------------------

def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int,
                group_by_length: bool = True) -> list[list[int]]:
    """Deterministic batches of example indices for one epoch (resume replays the same order)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group_by_length:
        chunk = batch_size * 64
        idx = [i for s in range(0, len(idx), chunk)
               for i in sorted(idx[s:s + chunk], key=lambda i: -lengths[i])]
    batches = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int, packing: bool = False) -> dict[str, Any]:
    """Tensors for one micro-batch: padded rows with a mask, or one packed row with position ids."""
    import torch

    if packing:
        ids, labels, pos = [], [], []
        for ex in examples:
            ids += ex.input_ids
            # The first token is never a target within its own example; masking it keeps the
            # previous example's last position from learning to predict the next example.
            labels += [IGNORE_INDEX] + ex.labels[1:]
            pos += list(range(len(ex.input_ids)))
        # use_cache=False: with a KV cache transformers skips the packed-sequence detection.
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([pos]), "use_cache": False}
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
