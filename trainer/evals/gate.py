"""Promotion gates: which eval sets are the evidence, and the rules a candidate must pass.

    # gate.yaml
    sets:                       # evaluated for the candidate and the alias's current version
      - golden.jsonl            # a path (relative to this file), NAME=path, or `ifeval`
      - ifeval
    rules:                      # "<set>.<figure>" (a figure of `loraplex eval`)
      golden.pass_rate: {min: 0.8, max_regression: 0.02}
      ifeval.pass_rate: {min: 0.3, max_regression: 0.05}
      golden.errors: {max: 0}
    max_tokens: 128             # optional sampling (flags win)
    judge: {model: judge-model, url: http://..., api_key_env: JUDGE_KEY}   # optional

Per rule: `min` (a floor: candidate >= min), `max` (a ceiling: candidate <= max) and
`max_regression` (candidate >= baseline - margin, or <= baseline + margin with
`lower_is_better: true`). A figure the candidate lacks fails its rules ("missing"); a
regression rule passes when there is no baseline (a new alias) or the baseline lacks the figure.
The gate passes when every rule does. A bare figure name (`pass_rate`) is allowed when one set
has it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loraplex.adapters.errors import ConfigError
from loraplex.adapters.records import RuleResult

EPS = 1e-9


class RuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min: float | None = None
    max: float | None = None
    max_regression: float | None = Field(default=None, ge=0)
    lower_is_better: bool = False

    @model_validator(mode="after")
    def _some(self) -> RuleSpec:
        if self.min is None and self.max is None and self.max_regression is None:
            raise ValueError("a rule needs min, max or max_regression")
        return self


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sets: list[str | dict[str, str]] = Field(min_length=1)
    rules: dict[str, RuleSpec] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    judge: dict[str, str] | None = None
    # filled by load_gate
    path: str | None = None
    sha256: str | None = None

    def set_args(self) -> list[str]:
        """The sets as `--set` values (NAME=FILE or FILE)."""
        out = []
        for s in self.sets:
            if isinstance(s, dict):
                if "path" not in s or set(s) - {"path", "name"}:
                    raise ConfigError(f"gate set {s!r}: use {{path: FILE, name: NAME}}",
                                      param="gate")
                out.append(f"{s['name']}={s['path']}" if s.get("name") else s["path"])
            else:
                out.append(s)
        return out

    def record(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def load_gate(path: Path) -> Gate:
    import yaml

    try:
        data = path.read_bytes()
        raw = yaml.safe_load(data)
    except OSError as exc:
        raise ConfigError(f"cannot read the gate {str(path)!r}: {exc.strerror or exc}",
                          param="gate") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"the gate {str(path)!r} is not YAML: {exc}", param="gate") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"the gate {str(path)!r} must be a mapping with sets and rules",
                          param="gate")
    try:
        gate = Gate.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(map(str, e["loc"])) or "(top)"
        raise ConfigError(f"the gate {str(path)!r}: {where}: {e['msg']}", param="gate") from None
    return gate.model_copy(update={"path": str(path),
                                   "sha256": hashlib.sha256(data).hexdigest()})


def check_rule_names(gate: Gate, set_names: list[str]) -> None:
    """Fail before evaluating when a rule names a set the gate does not evaluate."""
    for metric in gate.rules:
        prefix, dot, _ = metric.rpartition(".")
        if dot and prefix not in set_names:
            raise ConfigError(f"gate rule {metric!r} names set {prefix!r}, which the gate does "
                              f"not evaluate (sets: {', '.join(set_names)})", param="gate")


def lookup(figs: dict[str, Any], metric: str) -> tuple[str, Any]:
    """(key, value) of `metric` in flat figures; a bare name matches one set's figure."""
    if metric in figs:
        return metric, figs[metric]
    if "." not in metric:
        hits = [k for k in figs if k.rpartition(".")[2] == metric]
        if len(hits) == 1:
            return hits[0], figs[hits[0]]
    return metric, None


def judge(gate: Gate, candidate: dict[str, Any], baseline: dict[str, Any] | None
          ) -> list[RuleResult]:
    """Every rule on flat figures (`{"set.figure": value}`); baseline None: no baseline."""
    out: list[RuleResult] = []
    for metric, spec in gate.rules.items():
        key, value = lookup(candidate, metric)
        base = lookup(baseline, metric)[1] if baseline is not None else None
        out += _rules(key, spec, _num(value), _num(base), baseline is not None)
    return out


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _rules(key: str, spec: RuleSpec, value: float | None, base: float | None,
           has_baseline: bool) -> list[RuleResult]:
    out: list[RuleResult] = []

    def add(rule: str, threshold: float, passed: bool, detail: str) -> None:
        out.append(RuleResult(metric=key, rule=rule, threshold=threshold, candidate=value,
                              baseline=base, passed=passed, detail=detail))

    missing = "missing: the candidate has no such figure"
    for rule, threshold in (("min", spec.min), ("max", spec.max)):
        if threshold is None:
            continue
        if value is None:
            add(rule, threshold, False, missing)
            continue
        ok = value >= threshold - EPS if rule == "min" else value <= threshold + EPS
        add(rule, threshold, ok,
            "" if ok else f"{value:g} {'<' if rule == 'min' else '>'} {threshold:g}")
    if spec.max_regression is not None:
        margin = spec.max_regression
        if value is None:
            add("max_regression", margin, False, missing)
        elif base is None:
            add("max_regression", margin, True,
                "the baseline has no such figure" if has_baseline else "no baseline")
        else:
            delta = value - base
            ok = (delta <= margin + EPS) if spec.lower_is_better else (delta >= -margin - EPS)
            add("max_regression", margin, ok, "" if ok else
                f"{value:g} vs baseline {base:g} ({delta:+g}), beyond the margin {margin:g}")
    return out
