"""Checks of one answer: the registry of check types and the golden-set checks.

A check is a JSON object `{"type": ..., ...args}` on an eval row; `validate` checks its
arguments when the set is read (a bad regex or schema fails before any request), `run` judges
an answer. Golden checks: `exact_match` (`value`; whitespace-trimmed as the trainer's held-out
exact match; `ignore_case`), `contains` / `not_contains` (`value` or `values`, all of them;
`ignore_case`), `regex` (`pattern`, `flags` of "ims", `full`: the whole answer must match) and
`json_schema` (`schema`: the answer, a JSON document, optionally in a ``` fence, validates).
The verifiable instruction checks are in `ifeval.py` and register here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Spec = dict[str, Any]


class CheckSpecError(ValueError):
    """A check object that cannot be run (unknown type, missing or bad argument)."""


@dataclass(frozen=True)
class CheckType:
    name: str
    family: str  # "golden" | "ifeval": names the per-type figure (`regex`, `if_word_count`)
    fn: Callable[[str, Spec], tuple[bool, str]]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    prepare: Callable[[Spec], None] | None = None  # extra validation of the arguments

    @property
    def figure(self) -> str:
        return self.name if self.family == "golden" else f"if_{self.name}"


@dataclass(frozen=True)
class CheckResult:
    type: str
    passed: bool
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "passed": self.passed, "detail": self.detail}


CHECKS: dict[str, CheckType] = {}


def check(name: str, family: str = "golden", required: tuple[str, ...] = (),
          optional: tuple[str, ...] = (), prepare: Callable[[Spec], None] | None = None):
    """Register `fn(answer, spec) -> (passed, detail)` as check type `name`."""
    def add(fn: Callable[[str, Spec], tuple[bool, str]]):
        CHECKS[name] = CheckType(name, family, fn, required, optional, prepare)
        return fn
    return add


def check_types() -> dict[str, CheckType]:
    from loraplex.trainer.evals import ifeval  # noqa: F401  (registers its checks)

    return CHECKS


def validate(spec: Any) -> Spec:
    """The spec if it can run; CheckSpecError naming what is wrong otherwise."""
    if not isinstance(spec, dict):
        raise CheckSpecError(f"a check is a JSON object with a `type`, got {spec!r}")
    kind = spec.get("type")
    types = check_types()
    if kind not in types:
        raise CheckSpecError(f"unknown check type {kind!r}; known: {', '.join(sorted(types))}")
    t = types[kind]
    missing = [k for k in t.required if k not in spec]
    if missing:
        raise CheckSpecError(f"check {kind!r} needs {', '.join(missing)}")
    unknown = sorted(set(spec) - {"type", *t.required, *t.optional})
    if unknown:
        allowed = ", ".join((*t.required, *t.optional)) or "none"
        raise CheckSpecError(f"check {kind!r}: unknown argument(s) {', '.join(unknown)} "
                             f"(arguments: {allowed})")
    if t.prepare is not None:
        try:
            t.prepare(spec)
        except CheckSpecError:
            raise
        except Exception as exc:  # re.error, a schema error, a bad number...
            raise CheckSpecError(f"check {kind!r}: {exc}") from None
    return spec


def run(spec: Spec, answer: str) -> CheckResult:
    t = check_types()[spec["type"]]
    passed, detail = t.fn(answer, spec)
    return CheckResult(t.name, bool(passed), detail)


def figure_name(kind: str) -> str:
    return check_types()[kind].figure


# -- helpers -------------------------------------------------------------------------------------

def short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?```$", re.S)


def strip_fence(answer: str) -> str:
    """The answer without a surrounding ``` fence (``` or ```json)."""
    text = answer.strip()
    m = _FENCE.match(text)
    return m.group(1).strip() if m else text


def parse_json(answer: str) -> tuple[Any, str | None]:
    try:
        return json.loads(strip_fence(answer)), None
    except ValueError as exc:
        return None, f"not JSON: {exc}"


def _values(spec: Spec) -> list[str]:
    vals = spec.get("values") if "values" in spec else [spec.get("value")]
    if not isinstance(vals, list) or not vals or not all(isinstance(v, str) for v in vals):
        raise CheckSpecError("give `value` (a string) or `values` (a list of strings)")
    return vals


def _need_str(spec: Spec, key: str) -> None:
    if not isinstance(spec.get(key), str):
        raise CheckSpecError(f"`{key}` must be a string")


# -- golden checks ---------------------------------------------------------------------------------

@check("exact_match", required=("value",), optional=("ignore_case",),
       prepare=lambda s: _need_str(s, "value"))
def _exact(answer: str, spec: Spec) -> tuple[bool, str]:
    a, v = answer.strip(), spec["value"].strip()
    if spec.get("ignore_case"):
        a, v = a.casefold(), v.casefold()
    return a == v, "" if a == v else f"got {short(answer)!r}"


@check("contains", optional=("value", "values", "ignore_case"), prepare=_values)
def _contains(answer: str, spec: Spec) -> tuple[bool, str]:
    fold = (lambda s: s.casefold()) if spec.get("ignore_case") else (lambda s: s)
    missing = [v for v in _values(spec) if fold(v) not in fold(answer)]
    return not missing, f"missing {missing}" if missing else ""


@check("not_contains", optional=("value", "values", "ignore_case"), prepare=_values)
def _not_contains(answer: str, spec: Spec) -> tuple[bool, str]:
    fold = (lambda s: s.casefold()) if spec.get("ignore_case") else (lambda s: s)
    found = [v for v in _values(spec) if fold(v) in fold(answer)]
    return not found, f"contains {found}" if found else ""


def _regex(spec: Spec) -> re.Pattern:
    _need_str(spec, "pattern")
    flags = spec.get("flags", "")
    if not isinstance(flags, str) or set(flags) - set("ims"):
        raise CheckSpecError("`flags` is a string of i, m, s")
    value = 0
    for f in flags:
        value |= {"i": re.I, "m": re.M, "s": re.S}[f]
    return re.compile(spec["pattern"], value)


@check("regex", required=("pattern",), optional=("flags", "full"), prepare=_regex)
def _regex_check(answer: str, spec: Spec) -> tuple[bool, str]:
    pat = _regex(spec)
    text = answer.strip()
    ok = (pat.fullmatch(text) if spec.get("full") else pat.search(text)) is not None
    return ok, "" if ok else f"no match in {short(answer)!r}"


def _schema(spec: Spec) -> None:
    if not isinstance(spec.get("schema"), dict):
        raise CheckSpecError("`schema` must be a JSON Schema object")
    _validator_class(spec["schema"]).check_schema(spec["schema"])


def _validator_class(schema: dict) -> Any:
    try:
        import jsonschema
    except ImportError:
        raise CheckSpecError("the json_schema check needs the `jsonschema` package "
                             "(pip install jsonschema)") from None
    return jsonschema.validators.validator_for(schema)


@check("json_schema", required=("schema",), prepare=_schema)
def _json_schema(answer: str, spec: Spec) -> tuple[bool, str]:
    doc, err = parse_json(answer)
    if err:
        return False, err
    v = _validator_class(spec["schema"])(spec["schema"])
    errors = sorted(v.iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        where = "/".join(map(str, errors[0].path)) or "(root)"
        return False, f"{where}: {errors[0].message}"[:200]
    return True, ""
