"""Fixtures for the trainer tests: the toy base's tokenizer, data-file writers, quick configs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[2] / "trainer" / "data"


@pytest.fixture(scope="session")
def toy_tok(toy_model_dir: Path):
    from loraplex.adapters.chat import load_tokenizer

    return load_tokenizer(toy_model_dir)


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """write_jsonl("name.jsonl", rows) -> path; a str row is written verbatim (bad JSON)."""
    def write(name: str, rows: list[Any]) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path
    return write


def qa(q: str, a: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def qa_rows(n: int, start: int = 0) -> list[dict]:
    names = ["cat", "dog", "owl", "fox", "bee", "ant", "cow", "pig"]
    return [qa(f"Name animal {i}.", f"The {names[i % len(names)]} {i}.") for i in range(start, start + n)]


@pytest.fixture
def quick_cfg(toy_model_dir: Path, tmp_path: Path) -> Callable[..., Any]:
    """A TrainConfig for a seconds-long run on the bundled words data (overridable)."""
    from loraplex.trainer.config import load_config

    def make(**over: Any):
        values: dict[str, Any] = dict(
            base=str(toy_model_dir), data=[str(DATA / "words.alpaca.jsonl")],
            eval_data=[str(DATA / "words.alpaca.heldout.jsonl")], output=str(tmp_path / "adapter"),
            max_steps=4, batch_size=4, lora_r=4, lora_alpha=8, lr=1e-3, progress_bar=False,
            eval_exact_match=4, max_new_tokens=8, log_steps=2)
        values.update(over)
        return load_config(None, values)
    return make
