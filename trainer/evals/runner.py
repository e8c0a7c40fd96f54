"""Ask every model every prompt of every eval set through the server; score the answers.

A model is what a request's `model` names: the base's served name, `name`, `name@3`,
`name:alias`, or any model of another endpoint. Before asking, a reference is resolved through
the server (`/v1/models/{id}`, which a loraplex server answers from its registry snapshot): a
name or alias that points at one version is pinned to `name@N` for the whole run, so every
answer comes from the same version (an alias moved mid-run changes nothing) and the figures can
be stored on that version's record. A weighted split (`words:canary` at 90/10) is asked as it
is, so its figures are what its users get, and stored on no version; so is the base.

Requests go through the `loraplex data` client (trainer/datagen/client.py: concurrency, retries
with backoff on 429/5xx/timeouts). A request that fails for good fails that row's checks and
counts in `errors`; a 401/403/404 stops the run (exit 2).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from loraplex.adapters.refs import DEFAULT_ALIAS, Ref, parse_ref
from loraplex.trainer.evals import checks
from loraplex.trainer.evals.checks import CheckResult
from loraplex.trainer.evals.sets import EvalSet, Item


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    limit: int | None = None  # rows per set (None: all)
    judge_max_tokens: int | None = None  # the judge's reply (None: 256)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Target:
    ref: str  # as the user wrote it
    model: str  # what the requests name
    label: str  # the table's column
    kind: str  # "version" (pinned name@N), "split", "base", "model" (unknown to loraplex)
    name: str | None = None
    version: int | None = None
    note: str = ""

    @classmethod
    def pinned(cls, name: str, version: int, ref: str | None = None,
               label: str | None = None) -> Target:
        model = f"{name}@{version}"
        ref = ref or model
        return cls(ref, model, label or (ref if ref == model else f"{ref} (@{version})"),
                   "version", name, version)

    def describe(self) -> dict[str, Any]:
        return {"ref": self.ref, "served_as": self.model, "label": self.label, "kind": self.kind,
                "note": self.note}


@dataclass
class ItemResult:
    id: str
    answer: str | None
    error: str | None = None
    checks: list[CheckResult] = field(default_factory=list)
    finish_reason: str | None = None
    judge: float | None = None
    judge_error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "passed": self.passed, "answer": self.answer,
             "checks": [c.as_dict() for c in self.checks], "finish_reason": self.finish_reason}
        for k in ("error", "judge", "judge_error"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


def _rate(xs: list[bool]) -> float | None:
    # Unrounded: the table rounds once for display (rounding here too printed 14/27 as 0.518).
    return sum(xs) / len(xs) if xs else None


def figures(results: list[ItemResult], judged: bool = False) -> dict[str, Any]:
    """The figures of one model on one set (rates in [0, 1]; None: nothing to measure)."""
    out: dict[str, Any] = {"n": len(results), "errors": sum(r.error is not None for r in results)}
    checked = [r for r in results if r.checks]
    if checked:
        out["pass_rate"] = _rate([r.passed for r in checked])
        every = [c for r in checked for c in r.checks]
        out["check_rate"] = _rate([c.passed for c in every])
        by_type: dict[str, list[bool]] = {}
        for c in every:
            by_type.setdefault(checks.figure_name(c.type), []).append(c.passed)
        for name in sorted(by_type, key=lambda k: (k.startswith("if_"), k)):
            out[name] = _rate(by_type[name])
    if judged:
        scores = [r.judge for r in results if r.judge is not None]
        out["judge_mean"] = round(sum(scores) / len(scores), 3) if scores else None
        out["judge_n"] = len(scores)
        out["judge_failures"] = sum(r.judge_error is not None for r in results)
    return out


@dataclass
class EvalRun:
    server: str
    sets: list[EvalSet]
    targets: list[Target]
    sampling: Sampling
    results: dict[tuple[int, str], list[ItemResult]]
    judge: dict[str, Any] | None = None
    at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="seconds"))

    def figures(self, i: int, set_name: str) -> dict[str, Any]:
        return figures(self.results[(i, set_name)], judged=self.judge is not None)

    def flat(self, i: int) -> dict[str, Any]:
        """{"<set>.<figure>": value} of target i (what gate rules name)."""
        return {f"{s.name}.{k}": v for s in self.sets for k, v in self.figures(i, s.name).items()}

    def stored_result(self, i: int, s: EvalSet) -> dict[str, Any]:
        """What `Registry.record_eval` keeps for target i on set s."""
        t = self.targets[i]
        return {"figures": self.figures(i, s.name), "sha256": s.sha256, "path": s.path,
                "at": self.at, "server": self.server, "model": t.ref, "served_as": t.model,
                "sampling": self.sampling.as_dict(), "judge": self.judge}

    def to_json(self, items: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "server": self.server, "at": self.at, "sampling": self.sampling.as_dict(),
            "judge": self.judge, "sets": {s.name: s.describe() for s in self.sets},
            "models": [{**t.describe(), "figures": {s.name: self.figures(i, s.name)
                                                    for s in self.sets}}
                       for i, t in enumerate(self.targets)]}
        if items:
            for i, m in enumerate(out["models"]):
                m["items"] = {s.name: [r.as_dict() for r in self.results[(i, s.name)]]
                              for s in self.sets}
        return out


# -- resolving references ------------------------------------------------------------------------

async def resolve_target(client: Any, ref: str) -> Target:
    """What `ref` is on the server (see the module doc); AdapterNotFound-like errors raise."""
    import openai

    from loraplex.trainer.datagen.client import TeacherUnavailable

    try:
        r: Ref | None = parse_ref(ref)
    except Exception:
        r = None  # e.g. a hub id served as the base: not a loraplex reference
    if r is not None and r.version is not None:
        return Target.pinned(r.name, r.version, ref)
    try:
        info = (await client.models.retrieve(ref)).model_extra or {}
    except openai.NotFoundError as exc:
        raise TeacherUnavailable(f"the server has no model {ref!r}: {exc.message}",
                                 param="model") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise TeacherUnavailable(f"the server refused the key: {exc.message}",
                                 param="model") from None
    except openai.OpenAIError as exc:
        return Target(ref, ref, ref, "model", note=f"not resolved ({type(exc).__name__}): "
                      "asked as given, stored on no version")
    if r is None or info.get("parent") is None and "target" not in info and "versions" not in info:
        return Target(ref, ref, f"{ref} (base)" if "parent" in info else ref,
                      "base" if "parent" in info else "model")
    target = str(info.get("target") or "")
    if "versions" in info:  # a bare name: its `prod` alias, else the newest version
        target = str((info.get("aliases") or {}).get(DEFAULT_ALIAS) or "")
        if not target:
            m = re.fullmatch(r".+@(\d+)", str(info.get("root") or ""))
            target = m.group(1) if m else ""
    if target.isdigit():
        return Target.pinned(r.name, int(target), ref)
    if target:
        return Target(ref, ref, f"{ref} ({target})", "split", r.name,
                      note=f"a weighted split ({target}): asked as given, stored on no version")
    return Target(ref, ref, ref, "model", note="not resolved: asked as given")


# -- running -------------------------------------------------------------------------------------

def _client(settings: Any) -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=settings.url, api_key=settings.key(), max_retries=0,
                       timeout=settings.timeout_s)


async def evaluate_async(refs: list[str | Target], sets: list[EvalSet], settings: Any,
                         sampling: Sampling, judge_settings: Any = None, *, client: Any = None,
                         judge_client: Any = None) -> EvalRun:
    from loraplex.trainer.datagen.client import Teacher, TeacherError
    from loraplex.trainer.evals.judge import RUBRIC_SHA256, judge_answer

    made = []  # clients made here, closed here
    if client is None:
        client = _client(settings)
        made.append(client)
    if judge_settings is not None and judge_client is None:
        judge_client = _client(judge_settings)
        made.append(judge_client)
    try:
        targets = [t if isinstance(t, Target) else await resolve_target(client, t) for t in refs]
        teachers = [Teacher(settings.model_copy(update={"model": t.model}), client=client)
                    for t in targets]
        judge = (Teacher(judge_settings, client=judge_client)
                 if judge_settings is not None else None)

        async def one(i: int, item: Item) -> ItemResult:
            try:
                reply = await teachers[i].chat(item.messages, max_tokens=sampling.max_tokens,
                                               temperature=sampling.temperature,
                                               seed=sampling.seed)
            except TeacherError as exc:
                return ItemResult(item.id, None, exc.message, [
                    CheckResult(c["type"], False, "no answer") for c in item.checks])
            res = ItemResult(item.id, reply.text, None,
                             [checks.run(c, reply.text) for c in item.checks],
                             reply.finish_reason)
            if judge is not None:
                res.judge, res.judge_error = await judge_answer(
                    judge, item.messages, reply.text, item.reference,
                    max_tokens=sampling.judge_max_tokens or 256)
            return res

        first = next((item for s in sets for item in s.items), None)
        for t in targets:
            if t.kind != "base" and first is not None:
                await warm_up(client, t.model, first.messages)
        keys = [(i, s.name, item) for i in range(len(targets)) for s in sets for item in s.items]
        tasks = [asyncio.ensure_future(one(i, item)) for i, _, item in keys]
        try:
            outs = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        results: dict[tuple[int, str], list[ItemResult]] = {}
        for (i, name, _), res in zip(keys, outs):
            results.setdefault((i, name), []).append(res)
        judge_info = None
        if judge_settings is not None:
            judge_info = {"model": judge_settings.model, "url": judge_settings.url,
                          "rubric_sha256": RUBRIC_SHA256}
        return EvalRun(server=settings.url, sets=sets, targets=targets, sampling=sampling,
                       results=results, judge=judge_info)
    finally:
        for c in made:
            await c.close()


async def warm_up(client: Any, model: str, messages: list[dict[str, Any]], tries: int = 3,
                  wait_s: float = 1.0) -> None:
    """One 1-token request for `model` before the concurrent ones, retried on 404.

    A loraplex server looks up a name its registry view lacks (a version pushed since its last
    poll) on the first request for it, but concurrent first requests race: all but the one that
    refreshed the view get a 404 (server/lora_manager.py `resolve`: a waiter whose own refresh
    finds the revision already current does not look again), and so can a request arriving
    while the poller refreshes. One request first, retried a poll interval later, makes the
    server know the version before the run; any other failure is left to the run itself."""
    import openai

    for attempt in range(tries):
        try:
            await client.chat.completions.create(model=model, messages=messages, max_tokens=1,
                                                 temperature=0.0)
            return
        except openai.NotFoundError:
            if attempt + 1 < tries:
                await asyncio.sleep(wait_s)
        except Exception:
            return


def evaluate(refs: list[str | Target], sets: list[EvalSet], settings: Any, sampling: Sampling,
             judge_settings: Any = None, **kw: Any) -> EvalRun:
    return asyncio.run(evaluate_async(refs, sets, settings, sampling, judge_settings, **kw))


def store(run: EvalRun, registry: Any) -> list[str]:
    """Record each pinned version's figures on its record; one line per version, saying so."""
    from loraplex.adapters.errors import LoraplexError

    lines = []
    for i, t in enumerate(run.targets):
        if t.kind != "version":
            continue
        try:
            for s in run.sets:
                registry.record_eval(t.model, s.name, run.stored_result(i, s))
        except LoraplexError as exc:
            lines.append(f"not stored on {t.model}: {exc.message}")
            continue
        lines.append(f"stored on {t.model}: metrics.evals[{', '.join(s.name for s in run.sets)}]")
    return lines
