"""`loraplex data generate`: every method against the real `served` server (an adapter or the
toy base as teacher), resumption after a stop and after a SIGKILL, and, without a server, the
retry policy against a stub HTTP server and the generation logic with a scripted client.

The toy model writes nonsense words; the tests check structure, provenance, the trainer's
reading of the output, and that a resumed run neither repeats nor loses items.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from loraplex.trainer.datagen.cli import main
from loraplex.trainer.datagen.client import Teacher, TeacherError, TeacherUnavailable
from loraplex.trainer.datagen.generate import GenerateJob, GenParams, generate
from loraplex.trainer.datagen.journal import Journal
from loraplex.trainer.datagen.prompts import clean_rewrite, parse_tasks, read_prompts
from loraplex.trainer.datagen.settings import DataSettings
from loraplex.trainer.formats import read_rows
from tests.services import free_port

KEY_ENV = "LORAPLEX_TEST_DATA_KEY"
# Small requests: the toy's context is 512 tokens and each CPU step is shared.
FAST = ["--max-tokens", "12", "--instruction-max-tokens", "24", "--concurrency", "4",
        "--no-progress", "--api-key-env", KEY_ENV, "--min-instruction-words", "1",
        "--keep-truncated", "--near-dup-threshold", "off", "--rouge-threshold", "off"]


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "raw.jsonl").read_text().splitlines()]


def check_rows(out: Path, method: str, teacher: str) -> list[dict]:
    """Every row of raw.jsonl is read by the trainer's reader; provenance is complete."""
    recs = records(out)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "an item was written twice"
    rows = [r for r in recs if "messages" in r]
    for r in rows:
        p = r["provenance"]
        assert p["method"] == method and p["teacher"] == teacher
        assert p["parent"] and p["params"]["max_tokens"] == 12 and "seed" in p["params"]
        assert p["finish_reason"] in ("stop", "length") and "completion_tokens" in p["usage"]
        assert [m["role"] for m in r["messages"]][-2:] == ["user", "assistant"]
    raw_rows = out / "rows-only.jsonl"
    raw_rows.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parsed, rejected = read_rows([raw_rows])
    # the trainer takes every row but one with an empty answer (which the filter drops too)
    assert len(parsed) + len(rejected) == len(rows)
    assert all(r.code == "empty_output" for r in rejected), rejected
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == len(recs) and "requests" in report["generation"]["client"]
    kept, rejected = read_rows([out / "data.jsonl"])
    assert rejected == [] and len(kept) == report["kept"]
    return recs


@pytest.fixture
def prompts(tmp_path, task_prompts) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n"
                            for q, _ in task_prompts("upper", 6, seed=11)))
    return path


@pytest.mark.engine
def test_distill_from_an_adapter_stops_and_resumes(served, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    out = tmp_path / "distill"
    argv = ["data", "generate", "--method", "distill", "--input", str(prompts), "--output",
            str(out), "--url", served.v1, "--model", "upper", *FAST]
    assert main([*argv, "--stop-after", "2"]) == 1  # stopped as if killed: incomplete
    assert len(records(out)) == 2 and not (out / "data.jsonl").exists()
    assert main(argv) == 0
    recs = check_rows(out, "distill", "upper")
    assert len(recs) == 6
    assert {r["provenance"]["parent"] for r in recs} == {
        p.id for p in read_prompts([prompts])}
    assert main(argv) == 0 and len(records(out)) == 6  # nothing left to do
    # the same directory with another teacher is another run: refused
    assert main([*argv[:-len(FAST)], *FAST, "--model", "reverse"]) == 2


@pytest.mark.engine
def test_distill_resumes_after_sigkill(served, prompts, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    argv = ["data", "generate", "--method", "distill", "--input", str(prompts), "--output",
            str(out), "--url", served.v1, "--model", "reverse", *FAST, "--concurrency", "1"]
    env = {**served.env, KEY_ENV: "test-key"}
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.trainer.datagen.cli", *argv],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    raw = out / "raw.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if raw.exists() and raw.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done = raw.read_text().count("\n")
    assert 1 <= done < 6, proc.stderr.read().decode()[-2000:]
    monkeypatch.setenv(KEY_ENV, "test-key")
    assert main(argv) == 0
    recs = check_rows(out, "distill", "reverse")
    assert len(recs) == 6


@pytest.mark.engine
def test_evol_instruct_rounds_resume(served, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    out = tmp_path / "evol"
    argv = ["data", "generate", "--method", "evol-instruct", "--input", str(prompts), "-n", "3",
            "--rounds", "2", "--output", str(out), "--url", served.v1, "--model", "toy",
            "--instruction-temperature", "1.0", *FAST]
    main([*argv, "--stop-after", "2"])
    assert len(records(out)) == 2
    main(argv)  # rc 1 if a request failed; every item is then still written by a third run
    main(argv)
    recs = check_rows(out, "evol_instruct", "toy")
    assert len(recs) == 3 * 2  # rows, and rewrites eliminated as `skipped` records
    by_id = {r["id"]: r for r in recs}
    seeds = {p.id for p in read_prompts([prompts])[:3]}
    for r in recs:
        p = r["provenance"]
        assert p["op"] in ("constraints", "deepen", "concretize", "reasoning", "breadth")
        assert p["seed_prompt"] in seeds and p["instruction_request"]["params"]["temperature"] == 1.0
        if p["round"] == 1:
            assert p["parent"] == p["seed_prompt"]
        else:  # the round before, or the seed when every earlier rewrite was eliminated
            assert p["parent"] in by_id or p["parent"] == p["seed_prompt"]
        if "skipped" in r:
            assert r["skipped"] in ("empty_rewrite", "template_leak", "unchanged",
                                    "truncated_rewrite")


@pytest.mark.engine
def test_self_instruct_bootstraps_from_seed_tasks(served, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    out = tmp_path / "si"
    argv = ["data", "generate", "--method", "self-instruct", "-n", "4", "--examples", "3",
            "--output", str(out), "--url", served.v1, "--model", "toy",
            "--instruction-temperature", "1.0", *FAST]
    main([*argv, "--stop-after", "1"])
    assert len(records(out)) == 1
    assert main(argv) == 0
    recs = check_rows(out, "self_instruct", "toy")
    assert len(recs) == 4
    seed_ids = {p.id for p in read_prompts(
        [Path(__file__).parents[2] / "trainer/data/seed_tasks.alpaca.jsonl"])}
    for r in recs:
        parents = r["provenance"]["parent"]
        assert len(parents) == 3 and set(parents) <= seed_ids | {x["id"] for x in recs}
        assert r["id"].startswith("si-") and r["provenance"]["instruction_request"]


# -- without a server: retries against a stub, generation logic with a scripted client ---------

class Stub(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, headers = self.server.script.pop(0) if self.server.script else (200, {})
        body = json.dumps(completion("ok") if status == 200 else
                          {"error": {"message": f"status {status}", "type": "x"}}).encode()
        self.send_response(status)
        for k, v in {**headers, "Content-Type": "application/json",
                     "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.server.seen += 1

    def log_message(self, *args):
        pass


def completion(text: str, finish: str = "stop") -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.script, server.seen = [], 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def teacher_for(url: str, **kw) -> tuple[Teacher, list[float]]:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    settings = DataSettings(url=url, model="m", max_retries=kw.pop("max_retries", 3),
                            backoff_s=0.5, max_backoff_s=4, timeout_s=5, **kw)
    return Teacher(settings, sleep=sleep), slept


def ask(teacher: Teacher):
    async def go():
        try:
            return await teacher.chat([{"role": "user", "content": "hi"}], max_tokens=4,
                                      temperature=0)
        finally:
            await teacher.aclose()
    return asyncio.run(go())


def test_retries_429_with_retry_after_then_5xx_with_backoff(stub):
    stub.script = [(429, {"Retry-After": "2"}), (503, {}), (200, {})]
    teacher, slept = teacher_for(f"http://127.0.0.1:{stub.server_port}")  # /v1 is added
    assert ask(teacher).text == "ok" and stub.seen == 3
    assert slept[0] >= 2.0  # the server's Retry-After, longer than the backoff
    assert 0.5 <= slept[1] <= 1.0  # 0.5 * 2**1 with jitter in [50%, 100%]
    assert dict(teacher.stats.retries) == {"http_429": 1, "http_503": 1}


def test_retries_give_up_and_fatal_statuses_stop(stub):
    stub.script = [(500, {})] * 3
    teacher, slept = teacher_for(f"http://127.0.0.1:{stub.server_port}/v1", max_retries=2)
    with pytest.raises(TeacherError, match="after 3 tries"):
        ask(teacher)
    assert len(slept) == 2 and slept[1] <= 2.0
    stub.script = [(400, {})]
    teacher, slept = teacher_for(f"http://127.0.0.1:{stub.server_port}/v1")
    with pytest.raises(TeacherError, match="http_400"):
        ask(teacher)
    assert slept == []  # a bad request is not retried
    stub.script = [(401, {})]
    teacher, _ = teacher_for(f"http://127.0.0.1:{stub.server_port}/v1")
    with pytest.raises(TeacherUnavailable, match="refused the API key"):
        ask(teacher)


def test_connection_errors_are_retried():
    teacher, slept = teacher_for(f"http://127.0.0.1:{free_port()}/v1", max_retries=2)
    with pytest.raises(TeacherError, match="connection after 3 tries"):
        ask(teacher)
    assert len(slept) == 2 and dict(teacher.stats.retries) == {"connection": 2}


def test_api_key_comes_from_the_named_variable(monkeypatch):
    monkeypatch.setenv("SOME_KEY", "sk-1")
    monkeypatch.setenv("LORAPLEX_DATA_API_KEY", "sk-0")
    assert DataSettings().key() == "sk-0"
    assert DataSettings(api_key_env="SOME_KEY").key() == "sk-1"
    with pytest.raises(ValueError, match="MISSING_KEY is not set"):
        DataSettings(api_key_env="MISSING_KEY")
    assert main(["data", "generate", "--method", "distill", "--output", "x", "--api-key-env",
                 "MISSING_KEY"]) == 2


VOCAB = ("river mountain violin pepper orbit harbor lantern copper meadow puzzle glacier "
         "falcon garden ember quartz tunnel willow saddle comet marble thunder velvet anchor "
         "canyon").split()


class Scripted:
    """A stand-in for AsyncOpenAI: task lists with a fresh task, a near copy of it and a
    blocked one; answers echoing the question."""

    def __init__(self):
        self.calls = 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    async def create(self, model, messages, **kw):
        self.calls += 1
        text = messages[-1]["content"]
        if text.endswith("Task 4:"):  # a task list: one new task, a near copy, a blocked one
            task = "Explain " + " ".join(random.Random(self.calls).sample(VOCAB, 6))
            out = f" {task}\nTask 5: {task} quickly\nTask 6: Draw a map of {task}"
        else:
            out = "Answer to: " + text
        return SimpleNamespace(choices=[SimpleNamespace(
            message=SimpleNamespace(content=out), finish_reason="stop")],
            usage=SimpleNamespace(prompt_tokens=1, completion_tokens=1))


def test_self_instruct_pool_rouge_and_resume_with_a_scripted_teacher(tmp_path):
    def run(**kw):
        job = GenerateJob(method="self-instruct", output_dir=tmp_path, n=5, examples=3,
                          params=GenParams(seed=3), **kw)
        teacher = Teacher(DataSettings(model="m", concurrency=2), client=Scripted())
        return asyncio.run(generate(job, teacher))

    stats = run(stop_after=2)
    assert stats.written == 2 and stats.stopped == "stop_after=2"
    stats = run()
    assert stats.resumed == 2 and stats.written == 3
    assert stats.rejected["rouge_similar"] >= 3 and stats.rejected["keyword"] >= 3
    assert json.loads(json.dumps(stats.as_dict()))["rejected"]["keyword"] >= 3  # report-ready
    recs = [json.loads(x) for x in (tmp_path / "raw.jsonl").read_text().splitlines()]
    assert len(recs) == 5 and len({r["id"] for r in recs}) == 5
    assert all(r["messages"][1]["content"] == "Answer to: " + r["messages"][0]["content"]
               for r in recs)


def test_journal_drops_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "raw.jsonl"
    cut = '{"id": "b", "mess'
    path.write_text('{"id": "a", "messages": []}\n' + cut)
    j = Journal(path)
    assert [r["id"] for r in j.load()] == ["a"] and j.repaired_bytes == len(cut)
    j.append({"id": "c"})
    j.close()
    assert path.read_text().splitlines() == ['{"id": "a", "messages": []}', '{"id": "c"}']


def test_prompt_files_and_teacher_output_parsing(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(o) for o in [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "old answer"}]},
        {"conversations": [{"from": "human", "value": "Q2"}]},
        {"id": 7, "instruction": "Q3", "instances": [{"input": "in", "output": "o"}]},
        {"prompt": "Q4"}, {"prompt": "Q4"}, {"nothing": 1}]) + "\n")
    t = tmp_path / "p.txt"
    t.write_text("Q5\n\nQ6\n")
    ps = read_prompts([f, t])
    assert [p.text for p in ps] == ["Q1", "Q2", "Q3\n\nin", "Q4", "Q5", "Q6"]
    assert ps[0].messages[0] == {"role": "system", "content": "S"} and ps[2].id == "7"
    assert ps[2].instruction == "Q3"
    assert parse_tasks("Here are more:\nTask 4: A b c\nTask 5: D e", truncated=True) == ["A b c"]
    assert parse_tasks(" A b c\n\nTask 5: D e f", truncated=False) == ["A b c", "D e f"]
    assert clean_rewrite("#Rewritten Prompt#: Name a red fruit.", "Name a fruit.") == (
        "Name a red fruit.", None)
    assert clean_rewrite("Rewrite the given prompt", "x")[1] == "template_leak"
    assert clean_rewrite("name a FRUIT.", "Name a fruit.")[1] == "unchanged"
    assert clean_rewrite("  ", "x")[1] == "empty_rewrite"
