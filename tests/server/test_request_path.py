"""A request's life in its natural order, over a fake engine (rendering, registry and HTTP real).

parse -> resolve (no weights) -> render and validate -> admit and count -> load -> generate:
a malformed request for a cold adapter never loads it; `max_queue` bounds cold loads; the
in-flight count covers the streamed body and comes back to 0 however a request ends; a failure
inside a stream ends it with an error event and [DONE], counted once under its real status.
The same paths against the real engine are in test_serve.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from loraplex.adapters.registry import Registry
from loraplex.server.app import create_app
from loraplex.server.settings import ServerSettings

from .test_app_unit import FakeEngine


def make_app(tmp_path, toy_model_dir, lora, engine, **settings):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    registry.register_base("toy", toy_model_dir)
    registry.push(lora, "upper", base="toy")
    s = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                       max_lora_rank=8, **settings)
    return create_app(s, engine, registry=registry)


def metric(client, status: str, adapter: str = "toy", version: str = "base") -> float:
    prefix = (f'loraplex_requests_total{{adapter="{adapter}",endpoint="chat",status="{status}",'
              f'version="{version}"}} ')
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def in_flight(client) -> float:
    line = next(ln for ln in client.get("/metrics").text.splitlines()
                if ln.startswith("loraplex_requests_in_flight "))
    return float(line.split()[1])


@pytest.mark.parametrize("body, param", [
    ({"stop": ["ok", ""]}, "stop"),  # the engine refuses an empty stop string
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "bad \ud800 text"}]}, "messages[0].content"),
    ({"stop": "\udfff"}, "stop"),
    ({"user": "x\ud800"}, "user"),
])
def test_malformed_request_for_a_cold_adapter_never_loads_it(tmp_path, toy_model_dir,
                                                             one_step_lora, body, param):
    engine = FakeEngine()
    app = make_app(tmp_path, toy_model_dir, one_step_lora, engine)
    with TestClient(app) as client:
        for stream in (False, True):
            # json.dumps escapes lone surrogates as "\ud800", as a client's JSON would
            r = client.post("/v1/chat/completions", content=json.dumps({
                "model": "upper", "messages": [{"role": "user", "content": "hi"}],
                "stream": stream, **body}), headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param
        assert engine.loras == {} and engine.requests == []  # nothing loaded, nothing generated
        assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True
        assert in_flight(client) == 0


def test_greedy_n_is_made_valid_and_an_empty_template_prompt_is_a_400(tmp_path, toy_model_dir,
                                                                      one_step_lora):
    engine = FakeEngine()
    app = make_app(tmp_path, toy_model_dir, one_step_lora, engine)
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "toy", "messages": [{"role": "user", "content": "hi"}], "n": 2,
            "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        s = engine.requests[-1].sampling
        assert (s.n, s.temperature, s.top_k) == (2, 1.0, 1)  # top-1 sampling: greedy, n times
        r = client.post("/v1/render", json={
            "model": "toy", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200


def test_max_queue_bounds_cold_loads(tmp_path, toy_model_dir, one_step_lora):
    """Admission is counted before the adapter loads: with max_queue 2 and a slow load, a third
    concurrent request is refused at once instead of queueing behind the load."""
    engine = FakeEngine()
    slow_add = engine.add_lora

    async def add_lora(lora):
        await asyncio.sleep(1.0)
        await slow_add(lora)

    engine.add_lora = add_lora
    app = make_app(tmp_path, toy_model_dir, one_step_lora, engine, max_queue=2)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t", timeout=30) as c:
            body = {"model": "upper", "messages": [{"role": "user", "content": "hi"}]}
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body)
                                          for _ in range(3)))

    with TestClient(app) as client:
        codes = sorted(r.status_code for r in asyncio.run(main()))
        assert codes == [200, 200, 429]
        assert in_flight(client) == 0


def test_client_gone_before_the_body_starts_does_not_leak_in_flight(tmp_path, toy_model_dir,
                                                                    one_step_lora):
    """The ASGI server fails the very first send (the client closed the connection): the
    streaming generator never runs, and the request must still leave the in-flight count."""
    engine = FakeEngine()
    app = make_app(tmp_path, toy_model_dir, one_step_lora, engine, max_queue=1)
    body = json.dumps({"model": "toy", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()

    async def call():
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
                 "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            raise OSError("client disconnected")

        with pytest.raises(OSError):
            await app(scope, receive, send)

    with TestClient(app) as client:
        for _ in range(3):  # max_queue is 1: a leak would turn the next ones into 429s
            asyncio.run(call())
        assert in_flight(client) == 0
        r = client.post("/v1/chat/completions", json={
            "model": "toy", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        assert metric(client, "499") == 3 and metric(client, "200") == 1


def test_a_failure_inside_a_stream_ends_it_with_an_error_event(tmp_path, toy_model_dir,
                                                               one_step_lora, caplog):
    engine = FakeEngine()
    real = engine.generate

    async def broken(req):
        n = 0
        async for chunk in real(req):
            yield chunk
            n += 1
            if n == 3:
                raise RuntimeError("engine exploded")

    engine.generate = broken
    app = make_app(tmp_path, toy_model_dir, one_step_lora, engine)
    with TestClient(app) as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "toy", "messages": [{"role": "user", "content": "hi"}],
                "stream": True}) as r:
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])
        assert err["error"]["type"] == "internal_error"
        assert metric(client, "500") == 1 and metric(client, "200") == 0  # counted once
        assert in_flight(client) == 0
        assert sum("engine exploded" in (rec.exc_text or str(rec.exc_info))
                   for rec in caplog.records) == 1  # logged once
