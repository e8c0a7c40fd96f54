"""Verifiable instruction-following checks, in the style of IFEval (Zhou et al., 2023,
*Instruction-Following Evaluation for Large Language Models*, arXiv:2311.07911).

Each instruction in a prompt ("answer in fewer than 50 words", "do not use commas", "wrap the
whole answer in JSON") is verified by code, never by a model. A row passes when all its checks
pass (IFEval's prompt-level strict accuracy: `pass_rate`); `check_rate` is the share of single
instructions followed (instruction-level strict accuracy). IFEval's "loose" variants (retrying
after stripping the first/last line and markdown) are not computed.

Counting rules: a word is a run of letters/digits (with inner ' or -); a sentence ends with
., ! or ? followed by white space or the end; paragraphs are separated by blank lines (or by
`***` with `separator: "***"`); a bullet is a line starting with `* ` or `- `.
"""

from __future__ import annotations

import re

from loraplex.trainer.evals.checks import CheckSpecError, Spec, check, parse_json, short

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_BULLET = re.compile(r"^\s*[*-]\s+\S", re.M)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if _WORD.search(s)]


def paragraphs(text: str, separator: str = "blank") -> list[str]:
    parts = re.split(r"\n\s*\*\*\*\s*\n" if separator == "***" else r"\n\s*\n", text.strip())
    return [p for p in parts if p.strip()]


def _range(spec: Spec) -> None:
    lo, hi = spec.get("min"), spec.get("max")
    for k, v in (("min", lo), ("max", hi)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise CheckSpecError(f"`{k}` must be a non-negative integer")
    if lo is None and hi is None:
        raise CheckSpecError("give `min`, `max` or both")
    if lo is not None and hi is not None and lo > hi:
        raise CheckSpecError("`min` is above `max`")


def _within(count: int, spec: Spec, what: str) -> tuple[bool, str]:
    lo, hi = spec.get("min"), spec.get("max")
    ok = (lo is None or count >= lo) and (hi is None or count <= hi)
    want = (f"{lo}..{hi}" if lo is not None and hi is not None
            else f">= {lo}" if lo is not None else f"<= {hi}")
    return ok, "" if ok else f"{count} {what}, want {want}"


def _word_list(spec: Spec) -> None:
    w = spec.get("words")
    if not isinstance(w, list) or not w or not all(isinstance(x, str) and x.strip() for x in w):
        raise CheckSpecError("`words` must be a non-empty list of strings")


def _occurrences(word: str, text: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.I))


def _str_arg(key: str):
    def prepare(spec: Spec) -> None:
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise CheckSpecError(f"`{key}` must be a non-empty string")
    return prepare


def _at_least(n: int, spec: Spec, what: str) -> tuple[bool, str]:
    ok = n >= spec.get("min", 1)
    return ok, "" if ok else f"{n} {what}, want >= {spec.get('min', 1)}"


def _min_only(spec: Spec) -> None:
    v = spec.get("min", 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise CheckSpecError("`min` must be a positive integer")


@check("word_count", "ifeval", optional=("min", "max"), prepare=_range)
def _word_count(answer: str, spec: Spec) -> tuple[bool, str]:
    return _within(len(words(answer)), spec, "words")


@check("sentence_count", "ifeval", optional=("min", "max"), prepare=_range)
def _sentence_count(answer: str, spec: Spec) -> tuple[bool, str]:
    return _within(len(sentences(answer)), spec, "sentences")


def _paragraph_spec(spec: Spec) -> None:
    _range(spec)
    if spec.get("separator", "blank") not in ("blank", "***"):
        raise CheckSpecError('`separator` is "blank" or "***"')


@check("paragraph_count", "ifeval", optional=("min", "max", "separator"), prepare=_paragraph_spec)
def _paragraph_count(answer: str, spec: Spec) -> tuple[bool, str]:
    return _within(len(paragraphs(answer, spec.get("separator", "blank"))), spec, "paragraphs")


@check("keywords", "ifeval", required=("words",), prepare=_word_list)
def _keywords(answer: str, spec: Spec) -> tuple[bool, str]:
    missing = [w for w in spec["words"] if not _occurrences(w, answer)]
    return not missing, f"missing {missing}" if missing else ""


@check("forbidden_words", "ifeval", required=("words",), prepare=_word_list)
def _forbidden_words(answer: str, spec: Spec) -> tuple[bool, str]:
    found = [w for w in spec["words"] if _occurrences(w, answer)]
    return not found, f"uses {found}" if found else ""


def _frequency_spec(spec: Spec) -> None:
    _str_arg("word")(spec)
    _range(spec)


@check("keyword_frequency", "ifeval", required=("word",), optional=("min", "max"),
       prepare=_frequency_spec)
def _keyword_frequency(answer: str, spec: Spec) -> tuple[bool, str]:
    return _within(_occurrences(spec["word"], answer), spec, f"times {spec['word']!r}")


@check("forbidden_chars", "ifeval", required=("chars",), prepare=_str_arg("chars"))
def _forbidden_chars(answer: str, spec: Spec) -> tuple[bool, str]:
    found = sorted({c for c in answer if c in spec["chars"]})
    return not found, f"uses {''.join(found)!r}" if found else ""


def _case_spec(spec: Spec) -> None:
    if spec.get("case") not in ("upper", "lower"):
        raise CheckSpecError('`case` is "upper" or "lower"')


@check("case", "ifeval", required=("case",), prepare=_case_spec)
def _case(answer: str, spec: Spec) -> tuple[bool, str]:
    if not any(c.isalpha() for c in answer):
        return False, "no letters"
    want = answer.upper() if spec["case"] == "upper" else answer.lower()
    bad = [w for w in words(answer) if w != (w.upper() if spec["case"] == "upper" else w.lower())]
    return answer == want, "" if answer == want else f"not {spec['case']} case: {bad[:3]}"


@check("capital_words", "ifeval", optional=("min", "max"), prepare=_range)
def _capital_words(answer: str, spec: Spec) -> tuple[bool, str]:
    n = sum(1 for w in words(answer) if w.isupper() and len(w) > 1)
    return _within(n, spec, "all-capital words")


@check("json_format", "ifeval")
def _json_format(answer: str, spec: Spec) -> tuple[bool, str]:
    _, err = parse_json(answer)
    return err is None, err or ""


def _bullet_spec(spec: Spec) -> None:
    n = spec.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise CheckSpecError("`n` must be a non-negative integer")


@check("bullets", "ifeval", required=("n",), prepare=_bullet_spec)
def _bullets(answer: str, spec: Spec) -> tuple[bool, str]:
    n = len(_BULLET.findall(answer))
    return n == spec["n"], "" if n == spec["n"] else f"{n} bullets, want {spec['n']}"


@check("starts_with", "ifeval", required=("text",), prepare=_str_arg("text"))
def _starts_with(answer: str, spec: Spec) -> tuple[bool, str]:
    ok = answer.strip().lower().startswith(spec["text"].strip().lower())
    return ok, "" if ok else f"starts {short(answer, 30)!r}"


@check("ends_with", "ifeval", required=("text",), prepare=_str_arg("text"))
def _ends_with(answer: str, spec: Spec) -> tuple[bool, str]:
    ok = answer.strip().lower().endswith(spec["text"].strip().lower())
    return ok, "" if ok else f"ends {short(answer.strip()[-30:], 30)!r}"


@check("quotation", "ifeval")
def _quotation(answer: str, spec: Spec) -> tuple[bool, str]:
    t = answer.strip()
    ok = len(t) > 1 and t[0] == '"' and t[-1] == '"'
    return ok, "" if ok else "not wrapped in double quotes"


@check("title", "ifeval")
def _title(answer: str, spec: Spec) -> tuple[bool, str]:
    ok = re.search(r"<<[^\n<>]*\w[^\n<>]*>>", answer) is not None
    return ok, "" if ok else "no <<title>>"


@check("placeholders", "ifeval", optional=("min",), prepare=_min_only)
def _placeholders(answer: str, spec: Spec) -> tuple[bool, str]:
    n = len(re.findall(r"\[[^\[\]\n]*\w[^\[\]\n]*\]", answer))
    return _at_least(n, spec, "[placeholders]")


@check("highlights", "ifeval", optional=("min",), prepare=_min_only)
def _highlights(answer: str, spec: Spec) -> tuple[bool, str]:
    bold = re.findall(r"\*\*[^\n*]*\w[^\n*]*\*\*", answer)
    rest = re.sub(r"\*\*[^\n*]*\*\*", "", answer)
    n = len(bold) + len(re.findall(r"\*[^\n*]*\w[^\n*]*\*", rest))
    return _at_least(n, spec, "*highlights*")


@check("postscript", "ifeval", optional=("marker",),
       prepare=lambda s: _str_arg("marker")(s) if "marker" in s else None)
def _postscript(answer: str, spec: Spec) -> tuple[bool, str]:
    marker = spec.get("marker", "P.S.")
    ok = re.search(rf"(?im)^\s*{re.escape(marker)}", answer) is not None
    return ok, "" if ok else f"no line starting with {marker!r}"

