"""An optional judge model: each answer rated 1-10 with one fixed rubric.

The rubric and the prompt are constants (their sha256 is stored with the figures, so scores
from different rubrics are never compared by accident). The judge is any OpenAI-compatible
endpoint and model (`--judge-model`, `--judge-url`, `--judge-api-key-env`), asked at
temperature 0. Its reply is parsed leniently (`Score: 7`, `[[7]]`, `7/10`, `{"score": 7}`, a
lone number); a reply without a score in 1..10, or a judge request that fails for good, counts
in `judge_failures` and the answer is left unscored: it never stops the evaluation.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

RUBRIC = """\
Rate how well the ANSWER responds to the USER'S REQUEST, on a scale of 1 to 10:
10: fully correct, complete and follows every instruction in the request.
7-9: correct and helpful, with small omissions or style problems.
4-6: partly correct or partly follows the instructions.
2-3: mostly wrong, irrelevant or ignores the instructions.
1: empty, nonsense, or harmful.
If a REFERENCE ANSWER is given, an answer that agrees with it in substance is correct, even if
worded differently. Judge the answer only; do not answer the request yourself."""

SYSTEM = "You are a strict, impartial grader of AI assistant answers."

TEMPLATE = """\
{rubric}

[USER'S REQUEST]
{question}

{reference}[ANSWER]
{answer}

Give a one-sentence justification, then the score on the last line as: Score: N"""

RUBRIC_SHA256 = hashlib.sha256((SYSTEM + "\n" + TEMPLATE + "\n" + RUBRIC).encode()).hexdigest()

_PATTERNS = [
    re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"),  # MT-Bench's [[7]]
    re.compile(r"\bscore\b[^\d\n]{0,20}?(\d+(?:\.\d+)?)\s*(?:/\s*10\b|out of 10\b)?", re.I),
    re.compile(r'"score"\s*:\s*"?(\d+(?:\.\d+)?)'),
    re.compile(r"\b(\d+(?:\.\d+)?)\s*(?:/\s*10|out of 10)\b", re.I),
]


def parse_score(text: str | None) -> float | None:
    """The score in a judge's reply, or None when there is none in 1..10.

    The last match of the most explicit pattern wins (a justification may quote numbers
    before the verdict); a reply that is only a number is taken as the score."""
    if not text:
        return None
    for pat in _PATTERNS:
        found = pat.findall(text)
        if found:
            value = float(found[-1])
            return value if 1 <= value <= 10 else None
    lone = re.fullmatch(r"\s*\**\s*(\d+(?:\.\d+)?)\s*\**\.?\s*", text)
    if lone:
        value = float(lone.group(1))
        return value if 1 <= value <= 10 else None
    return None


def judge_messages(prompt: list[dict[str, Any]], answer: str,
                   reference: str | None) -> list[dict[str, str]]:
    """The judge's request: the conversation's turns as the request, the answer, the rubric."""
    turns = [f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in prompt]
    question = turns[-1].split(": ", 1)[1] if len(turns) == 1 else "\n".join(turns)
    ref = f"[REFERENCE ANSWER]\n{reference}\n\n" if reference else ""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": TEMPLATE.format(rubric=RUBRIC, question=question,
                                                        reference=ref, answer=answer)}]


async def judge_answer(teacher: Any, prompt: list[dict[str, Any]], answer: str,
                       reference: str | None, max_tokens: int = 256
                       ) -> tuple[float | None, str | None]:
    """(score, None) or (None, why it failed): never raises for a judge failure."""
    from loraplex.trainer.datagen.client import TeacherError, TeacherUnavailable

    try:
        reply = await teacher.chat(judge_messages(prompt, answer, reference),
                                   max_tokens=max_tokens, temperature=0.0)
    except TeacherUnavailable as exc:
        return None, f"judge unavailable: {exc.message}"
    except TeacherError as exc:
        return None, f"judge request failed: {exc.message}"
    score = parse_score(reply.text)
    if score is None:
        return None, f"no score in the judge's reply: {reply.text[-120:]!r}"
    return score, None
