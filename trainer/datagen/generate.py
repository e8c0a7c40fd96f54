"""`loraplex data generate`: Self-Instruct, Evol-Instruct and distillation through a teacher.

Each method turns work items into journal records (journal.py) with bounded concurrency:

- distill: one item per prompt (id `distill-<digest of the prompt id>`): the teacher's answer.
- evol-instruct: one item per (seed prompt, round) (id `evol-<digest of seed id, round>`): the
  rewrite of the chain's latest accepted instruction with an operation drawn from `--ops`
  (seeded per item), then the teacher's answer to it. A rewrite that fails (empty, leaking the
  template's words, unchanged, cut off) is written as a `skipped` record, and the next round
  rewrites the instruction before it again, as WizardLM puts failed evolutions back in the pool.
- self-instruct: bootstrap requests show `--examples` tasks sampled from the seeds and the
  instructions generated so far (a quarter of them generated, as Self-Instruct's 6 + 2), the
  teacher continues the list, each new instruction passing Self-Instruct's checks and a ROUGE-L
  below the threshold against every instruction in the pool joins it (id `si-<digest of the
  text>`) and is answered. The pool is rebuilt from the journal on a rerun.

Rows carry `provenance`: method, teacher model, endpoint, parent id(s), the operation and round
(evol), the sampling parameters and request seed of each request, finish reasons, token usage.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loraplex.trainer.datagen.client import Reply, Teacher, TeacherError
from loraplex.trainer.datagen.journal import RAW, Journal, check_run
from loraplex.trainer.datagen.prompts import (
    EVOL_OPS,
    METHODS,
    Prompt,
    clean_rewrite,
    digest,
    evol_prompt,
    instruction_problem,
    one_line,
    parse_tasks,
    read_prompts,
    self_instruct_prompt,
)
from loraplex.trainer.datagen.textsim import RougeIndex, words

SEED_TASKS = Path(__file__).resolve().parent.parent / "data" / "seed_tasks.alpaca.jsonl"


@dataclass
class GenParams:
    """Sampling of the answers, and of the instruction requests (Self-Instruct's task lists,
    Evol-Instruct's rewrites)."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    instruction_max_tokens: int = 256
    instruction_temperature: float = 0.7
    seed: int = 0
    system: str | None = None


@dataclass
class GenerateJob:
    method: str
    output_dir: Path
    inputs: list[Path] = field(default_factory=list)
    n: int | None = None
    rounds: int = 1
    ops: list[str] = field(default_factory=lambda: list(EVOL_OPS))
    examples: int = 8
    min_instruction_words: int = 3
    max_instruction_words: int = 150
    rouge_threshold: float | None = 0.7
    params: GenParams = field(default_factory=GenParams)
    stop_after: int | None = None  # stop as if killed after this many new records (tests)
    progress: bool = False

    def run_config(self, teacher: Teacher) -> dict[str, Any]:
        """What makes a run itself (journal.check_run compares it on a rerun)."""
        cfg: dict[str, Any] = {
            "method": self.method, "model": teacher.model, "url": teacher.settings.url,
            "inputs": [str(p.resolve()) for p in self.inputs], "n": self.n,
            "params": asdict(self.params)}
        if self.method == "evol-instruct":
            cfg.update(rounds=self.rounds, ops=self.ops)
        if self.method == "self-instruct":
            cfg.update(examples=self.examples, rouge_threshold=self.rouge_threshold,
                       instruction_words=[self.min_instruction_words, self.max_instruction_words])
        return cfg


@dataclass
class GenStats:
    resumed: int = 0  # records already in the journal
    written: int = 0  # rows written by this run
    skipped: Counter = field(default_factory=Counter)  # eliminated at generation
    failed: Counter = field(default_factory=Counter)  # items whose request failed
    proposed: int = 0  # self-instruct: instructions parsed from the teacher
    rejected: Counter = field(default_factory=Counter)  # self-instruct: why not pooled
    blocked: int = 0  # evol: items waiting on a failed earlier round
    stopped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it rebuilds a Counter from its (key, count) pairs
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = dict(v) if isinstance(v, Counter) else v
        return out


class StopRun(Exception):
    pass


def request_seed(seed: int, key: str) -> int:
    """A per-request sampling seed derived from the run's seed and the item: reproducible."""
    return int(digest(seed, key, size=8), 16) & 0x7FFFFFFF


async def supervise(coros: Iterable[Awaitable[None]]) -> None:
    """Run the coroutines together; the first exception (StopRun, a fatal teacher error)
    cancels the others and is raised once they are done."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_pool(items: Iterable[Any], fn: Callable[[Any], Awaitable[None]], limit: int) -> None:
    """`fn(item)` for every item, `limit` at a time."""
    it = iter(items)

    async def worker() -> None:
        for item in it:  # one shared iterator: each item is taken once
            await fn(item)

    await supervise(worker() for _ in range(limit))


class Generator:
    def __init__(self, job: GenerateJob, teacher: Teacher, journal: Journal):
        self.job, self.teacher, self.journal = job, teacher, journal
        self.p = job.params
        self.stats = GenStats()
        self.bar: Any = None

    # -- records -----------------------------------------------------------------------------

    def _write(self, record: dict[str, Any]) -> None:
        if self.stats.stopped:  # stopping: work still in flight is lost, as in a kill
            raise StopRun
        self.journal.append(record)
        if "skipped" in record:
            self.stats.skipped[record["skipped"]] += 1
        else:
            self.stats.written += 1
        if self.bar is not None:
            self.bar.update(1)
        new = self.stats.written + sum(self.stats.skipped.values())
        if self.job.stop_after is not None and new >= self.job.stop_after:
            self.stats.stopped = f"stop_after={self.job.stop_after}"
            raise StopRun

    def _fail(self, item_id: str, exc: TeacherError) -> None:
        self.stats.failed[exc.kind] += 1
        if sum(self.stats.failed.values()) <= 3:
            self._log(f"data: {item_id} failed: {exc.message}")

    def _log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def _provenance(self, method: str, parent: Any, reply: Reply, req_seed: int,
                    **extra: Any) -> dict[str, Any]:
        p = self.p
        return {"method": method, "teacher": self.teacher.model,
                "endpoint": self.teacher.settings.url, "parent": parent, **extra,
                "params": {"temperature": p.temperature, "top_p": p.top_p,
                           "max_tokens": p.max_tokens, "seed": req_seed},
                "finish_reason": reply.finish_reason,
                "usage": {"prompt_tokens": reply.prompt_tokens,
                          "completion_tokens": reply.completion_tokens},
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "generator": "loraplex data generate"}

    def _instruction_request(self, reply: Reply, req_seed: int, **extra: Any) -> dict[str, Any]:
        p = self.p
        return {**extra, "params": {"temperature": p.instruction_temperature, "top_p": p.top_p,
                                    "max_tokens": p.instruction_max_tokens, "seed": req_seed},
                "finish_reason": reply.finish_reason,
                "usage": {"prompt_tokens": reply.prompt_tokens,
                          "completion_tokens": reply.completion_tokens}}

    def _prompt_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.p.system and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.p.system}, *messages]
        return list(messages)

    async def _answer(self, item_id: str, messages: list[dict[str, Any]]) -> tuple[Reply, int]:
        seed = request_seed(self.p.seed, item_id)
        reply = await self.teacher.chat(messages, max_tokens=self.p.max_tokens,
                                        temperature=self.p.temperature, top_p=self.p.top_p,
                                        seed=seed)
        return reply, seed

    async def _instruct(self, key: str, prompt: str) -> tuple[Reply, int]:
        seed = request_seed(self.p.seed, key)
        reply = await self.teacher.chat([{"role": "user", "content": prompt}],
                                        max_tokens=self.p.instruction_max_tokens,
                                        temperature=self.p.instruction_temperature,
                                        top_p=self.p.top_p, seed=seed)
        return reply, seed

    # -- methods -----------------------------------------------------------------------------

    async def run(self, total: int, initial: int, body: Callable[[], Awaitable[None]]) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=min(initial, total), desc=self.job.method,
                        unit="row", file=sys.stderr, disable=not self.job.progress,
                        dynamic_ncols=True)
        try:
            await body()
        except StopRun:
            pass
        finally:
            self.bar.close()

    async def distill(self, prompts: list[Prompt]) -> None:
        todo = [p for p in prompts if f"distill-{digest(p.id)}" not in self.journal]
        self.stats.resumed = len(prompts) - len(todo)

        async def one(p: Prompt) -> None:
            item_id = f"distill-{digest(p.id)}"
            messages = self._prompt_messages(p.messages)
            try:
                reply, seed = await self._answer(item_id, messages)
            except TeacherError as exc:
                return self._fail(item_id, exc)
            self._write({"id": item_id,
                         "messages": [*messages, {"role": "assistant", "content": reply.text}],
                         "provenance": self._provenance("distill", p.id, reply, seed)})

        await self.run(len(prompts), self.stats.resumed,
                       lambda: run_pool(todo, one, self.teacher.settings.concurrency))

    async def evol(self, seeds: list[Prompt]) -> None:
        def rid(seed_id: str, r: int) -> str:
            return f"evol-{digest(seed_id, r)}"

        self.stats.resumed = sum(rid(s.id, r) in self.journal for s in seeds
                                 for r in range(1, self.job.rounds + 1))

        def parent_of(s: Prompt, r: int) -> tuple[str, str] | None:
            for q in range(r - 1, 0, -1):  # the chain's latest accepted instruction
                rec = self.journal.get(rid(s.id, q))
                if rec is None:
                    return None  # round q failed: wait for a rerun
                if "messages" in rec:
                    return rec["id"], next(m["content"] for m in reversed(rec["messages"])
                                           if m["role"] == "user")
            return s.id, s.text

        async def one(item: tuple[Prompt, int, tuple[str, str]]) -> None:
            s, r, (parent_id, parent_text) = item
            item_id = rid(s.id, r)
            op = random.Random(digest(self.p.seed, item_id)).choice(self.job.ops)
            try:
                rw, rw_seed = await self._instruct(item_id + ":rewrite", evol_prompt(op, parent_text))
                new, reason = clean_rewrite(rw.text, parent_text)
                if reason is None and rw.finish_reason == "length":
                    reason = "truncated_rewrite"
                request = self._instruction_request(rw, rw_seed, op=op)
                extra = {"op": op, "round": r, "seed_prompt": s.id, "instruction_request": request}
                if reason is not None:
                    prov = self._provenance("evol_instruct", parent_id, rw, rw_seed, **extra)
                    prov["rewrite"] = new[:2000]
                    return self._write({"id": item_id, "skipped": reason, "provenance": prov})
                messages = self._prompt_messages([{"role": "user", "content": new}])
                reply, seed = await self._answer(item_id, messages)
            except TeacherError as exc:
                return self._fail(item_id, exc)
            self._write({"id": item_id,
                         "messages": [*messages, {"role": "assistant", "content": reply.text}],
                         "provenance": self._provenance("evol_instruct", parent_id, reply, seed,
                                                        **extra)})

        async def body() -> None:
            for r in range(1, self.job.rounds + 1):  # a round needs the one before it
                items = []
                for s in seeds:
                    if rid(s.id, r) in self.journal:
                        continue
                    parent = parent_of(s, r)
                    if parent is None:
                        self.stats.blocked += 1
                        continue
                    items.append((s, r, parent))
                await run_pool(items, one, self.teacher.settings.concurrency)

        await self.run(len(seeds) * self.job.rounds, self.stats.resumed, body)

    async def self_instruct(self, seeds: list[Prompt], n: int) -> None:
        job = self.job
        pool: list[tuple[str, str]] = []  # generated (id, instruction), journal order
        for rec in self.journal.records.values():
            if rec.get("provenance", {}).get("method") == "self_instruct" and "messages" in rec:
                pool.append((rec["id"], next(m["content"] for m in reversed(rec["messages"])
                                             if m["role"] == "user")))
        self.stats.resumed = len(pool)
        index = RougeIndex()
        known = set()
        for pid, text in [(s.id, s.instruction) for s in seeds] + pool:
            index.add(words(text), pid)
            known.add(one_line(text).lower())
        state = {"reserved": len(pool), "stall": 0, "requests": 0}
        max_stall = 10 + 5 * self.teacher.settings.concurrency

        def sample(rng: random.Random) -> list[tuple[str, str]]:
            n_gen = min(len(pool), job.examples // 4)
            n_seed = min(len(seeds), job.examples - n_gen)
            ex = [(s.id, s.instruction) for s in rng.sample(seeds, n_seed)]
            ex += rng.sample(pool, n_gen)
            rng.shuffle(ex)
            return ex

        async def worker() -> None:
            while state["reserved"] < n and state["stall"] < max_stall:
                k = state["requests"]
                state["requests"] += 1
                key = f"si-request:{len(pool)}:{k}"
                ex = sample(random.Random(digest(self.p.seed, key)))
                try:
                    reply, req_seed = await self._instruct(key, self_instruct_prompt(
                        [t for _, t in ex]))
                except TeacherError as exc:
                    state["stall"] += 1
                    self._fail(key, exc)
                    continue
                accepted: list[tuple[str, str]] = []
                for task in parse_tasks(reply.text, reply.finish_reason == "length"):
                    self.stats.proposed += 1
                    reason = instruction_problem(task, job.min_instruction_words,
                                                 job.max_instruction_words)
                    if reason is None and one_line(task).lower() in known:
                        reason = "duplicate"
                    if reason is None and job.rouge_threshold is not None:
                        if index.most_similar(words(task), job.rouge_threshold) is not None:
                            reason = "rouge_similar"
                    if reason is not None:
                        self.stats.rejected[reason] += 1
                        continue
                    if state["reserved"] >= n:
                        break
                    iid = f"si-{digest(one_line(task).lower())}"
                    known.add(one_line(task).lower())
                    index.add(words(task), iid)
                    pool.append((iid, task))
                    state["reserved"] += 1
                    accepted.append((iid, task))
                state["stall"] = 0 if accepted else state["stall"] + 1
                request = self._instruction_request(reply, req_seed, examples=len(ex))
                for iid, task in accepted:
                    messages = self._prompt_messages([{"role": "user", "content": task}])
                    try:
                        ans, seed = await self._answer(iid, messages)
                    except TeacherError as exc:
                        state["reserved"] -= 1  # not written: a later request makes another
                        self._fail(iid, exc)
                        continue
                    self._write({"id": iid, "messages": [
                        *messages, {"role": "assistant", "content": ans.text}],
                        "provenance": self._provenance("self_instruct", [i for i, _ in ex], ans,
                                                       seed, instruction_request=request)})

        async def body() -> None:
            await supervise(worker() for _ in range(self.teacher.settings.concurrency))
            if state["stall"] >= max_stall and state["reserved"] < n:
                self.stats.stopped = (f"stalled: {max_stall} task-list requests in a row gave "
                                      "no new instruction")

        await self.run(n, len(pool), body)


async def generate(job: GenerateJob, teacher: Teacher) -> GenStats:
    """Run (or continue) a generation into job.output_dir/raw.jsonl; the teacher is closed."""
    journal: Journal | None = None
    try:
        prompts = _check(job)
        journal = Journal(job.output_dir / RAW)
        check_run(job.output_dir, job.run_config(teacher))
        journal.load()
        gen = Generator(job, teacher, journal)
        if journal.repaired_bytes:
            gen._log(f"data: removed a partial last line ({journal.repaired_bytes} bytes) of "
                     f"{journal.path}: a run was killed while writing it")
        if job.method == "distill":
            await gen.distill(prompts[:job.n] if job.n else prompts)
        elif job.method == "evol-instruct":
            await gen.evol(prompts[:job.n] if job.n else prompts)
        else:
            await gen.self_instruct(prompts, job.n or 100)
        return gen.stats
    finally:
        if journal is not None:
            journal.close()
        await teacher.aclose()


def _check(job: GenerateJob) -> list[Prompt]:
    """Validate the job (BadRequest naming the option); its prompts."""
    from loraplex.adapters.errors import BadRequest

    if job.method not in METHODS:
        raise BadRequest(f"unknown method {job.method!r}; use {', '.join(METHODS)}",
                         param="method")
    for name, value in (("-n", job.n), ("--rounds", job.rounds), ("--examples", job.examples),
                        ("--max-tokens", job.params.max_tokens),
                        ("--instruction-max-tokens", job.params.instruction_max_tokens)):
        if value is not None and value < 1:
            raise BadRequest(f"{name} must be at least 1 (got {value})", param=name.lstrip("-"))
    bad_ops = [op for op in job.ops if op not in EVOL_OPS]
    if bad_ops or not job.ops:
        raise BadRequest(f"--ops: unknown {', '.join(bad_ops) or '(none given)'}; use "
                         f"{', '.join(EVOL_OPS)}", param="ops")
    if not job.inputs:
        if job.method != "self-instruct":
            raise BadRequest(f"{job.method} needs prompts: --input FILE", param="input")
        job.inputs = [SEED_TASKS]
    return read_prompts(job.inputs)
