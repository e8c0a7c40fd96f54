"""Access control through the routes (server/auth.py wired into the app; fake engine, real
registry and HTTP): keys -> principals with scopes, visible adapters and limits.

- an adapter outside a key's set is invisible to it on every route: the unknown-name 404 on
  chat, completions and render, absent from /v1/models;
- no admin action without the admin scope (403), and no key at all is a 401;
- a key's rate limit answers 429 with Retry-After, its concurrency limit too.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from loraplex.adapters.registry import Registry
from loraplex.server.app import create_app
from loraplex.server.auth import hash_key
from loraplex.server.settings import ServerSettings

from .test_app_unit import FakeEngine

KEYS = {"team-a": "key-team-a", "team-b": "key-team-b", "slow": "key-slow",
        "narrow": "key-narrow"}


@pytest.fixture
def app_and_engine(tmp_path, toy_model_dir, one_step_lora):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    registry.register_base("toy", toy_model_dir)
    registry.push(one_step_lora, "team-a-bot", base="toy")
    registry.push(one_step_lora, "team-b-bot", base="toy")
    registry.set_alias("team-a-bot", "prod", 1)
    keys = {"keys": [
        {"name": "team-a", "hash": hash_key(KEYS["team-a"]), "adapters": ["team-a-*"]},
        {"name": "team-b", "hash": hash_key(KEYS["team-b"]), "adapters": ["team-b-*"],
         "scopes": ["infer", "push"]},
        {"name": "slow", "hash": hash_key(KEYS["slow"]), "requests_per_minute": 2, "burst": 2},
        {"name": "narrow", "hash": hash_key(KEYS["narrow"]), "max_concurrent": 1},
    ]}
    settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                              admin_key="adm", max_lora_rank=8, keys_inline=json.dumps(keys))
    engine = FakeEngine()
    app = create_app(settings, engine, registry=registry)
    with TestClient(app) as client:
        yield client, engine, app
    registry.close()


def as_key(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def test_an_adapter_outside_a_keys_set_is_invisible_on_every_route(app_and_engine):
    client, engine, _ = app_and_engine
    msgs = [{"role": "user", "content": "hi"}]
    for model in ("team-a-bot", "team-a-bot@1", "team-a-bot:prod"):
        ok = client.post("/v1/chat/completions", headers=as_key("team-a"),
                         json={"model": model, "messages": msgs})
        assert ok.status_code == 200, ok.text
        for path, body in (("/v1/chat/completions", {"messages": msgs}),
                           ("/v1/completions", {"prompt": "hi"}),
                           ("/v1/render", {"messages": msgs})):
            r = client.post(path, headers=as_key("team-b"), json={"model": model, **body})
            assert r.status_code == 404, (path, model, r.text)
            err = r.json()["error"]
            assert err["code"] == "model_not_found" and err["param"] == "model"
            # the same answer as for a name that does not exist at all
            unknown = client.post(path, headers=as_key("team-b"),
                                  json={"model": "no-such-bot", **body}).json()["error"]
            assert err["message"] == unknown["message"].replace("no-such-bot", "team-a-bot")
    ids_b = {m["id"] for m in client.get("/v1/models", headers=as_key("team-b")).json()["data"]}
    assert "toy" in ids_b and "team-b-bot" in ids_b
    assert not {i for i in ids_b if i.startswith("team-a")}
    ids_a = {m["id"] for m in client.get("/v1/models", headers=as_key("team-a")).json()["data"]}
    assert {"team-a-bot", "team-a-bot@1", "team-a-bot:prod"} <= ids_a
    assert not {i for i in ids_a if i.startswith("team-b")}
    # the base model is visible to every key that may infer
    r = client.post("/v1/chat/completions", headers=as_key("team-b"),
                    json={"model": "toy", "messages": msgs})
    assert r.status_code == 200


def test_no_admin_action_without_the_admin_scope(app_and_engine):
    client, _, _ = app_and_engine
    calls = [("post", "/admin/adapters/team-a-bot/load"), ("post", "/admin/adapters/team-a-bot/pin"),
             ("post", "/admin/adapters/team-a-bot/unpin"),
             ("post", "/admin/adapters/team-a-bot/unload"),
             ("put", "/admin/aliases/team-a-bot/prod?target=1"),
             ("delete", "/admin/aliases/team-a-bot/prod")]
    for method, path in calls:
        for key in ("team-a", "team-b"):  # infer (team-b also push): neither is admin
            r = client.request(method, path, headers=as_key(key))
            assert r.status_code == 403, (method, path, key, r.text)
        r = client.request(method, path, headers={"Authorization": ""})
        assert r.status_code == 401, (method, path, r.text)
        r = client.request(method, path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, (method, path, r.text)
    r = client.post("/admin/adapters/team-a-bot/load", headers={"Authorization": "Bearer adm"})
    assert r.status_code == 200, r.text
    # a client key without the infer scope? every configured key here has it; no key at all:
    r = client.post("/v1/chat/completions", headers={"Authorization": ""},
                    json={"model": "toy", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401


def test_push_scope_registers_only_its_own_adapters(app_and_engine, one_step_lora):
    client, _, _ = app_and_engine
    uri = str(one_step_lora)
    r = client.post(f"/admin/adapters?name=team-b-new&uri={uri}", headers=as_key("team-b"))
    assert r.status_code == 200, r.text
    r = client.post(f"/admin/adapters?name=team-a-new&uri={uri}", headers=as_key("team-b"))
    assert r.status_code == 403 and "outside the adapters" in r.json()["error"]["message"]
    r = client.post(f"/admin/adapters?name=team-a-new&uri={uri}", headers=as_key("team-a"))
    assert r.status_code == 403  # infer only: no push
    # push is not admin: team-b cannot load even its own adapter
    assert client.post("/admin/adapters/team-b-bot/load",
                       headers=as_key("team-b")).status_code == 403


def test_rate_limit_answers_429_with_retry_after(app_and_engine):
    client, _, _ = app_and_engine
    body = {"model": "toy", "messages": [{"role": "user", "content": "hi"}]}
    codes = [client.post("/v1/chat/completions", headers=as_key("slow"), json=body)
             for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert int(codes[-1].headers["Retry-After"]) >= 1
    assert codes[-1].json()["error"]["type"] == "rate_limit_error"
    # another key is not limited by this one's bucket
    assert client.post("/v1/chat/completions", headers=as_key("team-a"),
                       json=body).status_code == 200


def test_concurrency_limit_answers_429_and_frees_its_slot(app_and_engine):
    client, engine, app = app_and_engine
    engine.delay = 0.05  # each answer streams for about a second

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t", timeout=30) as c:
            body = {"model": "toy", "messages": [{"role": "user", "content": "hi"}]}
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body,
                                                 headers=as_key("narrow")) for _ in range(2)))

    rs = asyncio.run(main())
    assert sorted(r.status_code for r in rs) == [200, 429]
    limited = next(r for r in rs if r.status_code == 429)
    assert limited.headers["Retry-After"] == "1"
    engine.delay = 0.0
    # the slot came back when the first request finished
    r = client.post("/v1/chat/completions", headers=as_key("narrow"), json={
        "model": "toy", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert r.status_code == 200
    r = client.post("/v1/chat/completions", headers=as_key("narrow"), json={
        "model": "toy", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
