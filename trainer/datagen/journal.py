"""The append-only journal that makes `loraplex data generate` resumable.

A run directory holds:

- `run.json`: the run's settings. A rerun into the same directory must use the same method,
  teacher, inputs and generation parameters (it continues that run); `-n` may grow, the URL,
  concurrency and retry settings may change.
- `raw.jsonl`: one JSON line per finished item, flushed as it is written: a row
  (`{"id", "messages", "provenance"}`) or an item the method eliminated (`{"id", "skipped":
  reason, "provenance"}`). Items are identified by a stable id derived from what they are made
  from (the prompt, the seed and round, the instruction text), so a rerun skips every id already
  in the file and does only the rest. A line cut short by a kill is removed when the journal is
  opened (it was never a finished item).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import ConfigError

RAW = "raw.jsonl"
RUN = "run.json"
# run.json keys a rerun may change without starting a different run.
MUTABLE = {"n", "url", "created"}


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        self.bad_lines = 0
        self.repaired_bytes = 0
        self._f: Any = None

    def load(self) -> list[dict[str, Any]]:
        """Every finished record, first occurrence per id, in file order."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # killed mid-line: drop the partial tail
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            self.repaired_bytes = len(data) - keep
            data = data[:keep]
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                self.bad_lines += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                self.records.setdefault(rec["id"], rec)
            else:
                self.bad_lines += 1
        return list(self.records.values())

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.records

    def get(self, item_id: str) -> dict[str, Any] | None:
        return self.records.get(item_id)

    def append(self, record: dict[str, Any]) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        # One write per line, flushed: a kill loses at most the line being written.
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self.records[record["id"]] = record

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None


def check_run(out_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """Record the run's settings, or check a rerun's against them; returns the old ones."""
    path = out_dir / RUN
    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}", param="output") from None
        diffs = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}"
                 for k in sorted(set(old) | set(config))
                 if k not in MUTABLE and old.get(k) != config.get(k)]
        if diffs:
            raise ConfigError(f"{out_dir} holds a run with other settings ({'; '.join(diffs)}): "
                              "rerun with the same settings to continue it, or give another "
                              "--output", param="output")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return old
