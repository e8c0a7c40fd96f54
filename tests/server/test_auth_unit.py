"""Fast tests of server/auth.py: keys -> principals, scopes, adapter visibility, limits, secrecy.

No server and no engine: the store, the principals and the limiter are plain objects, and time
is a fake monotonic clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from types import SimpleNamespace

import pytest
from pydantic import SecretStr

from loraplex.adapters.errors import (
    AuthenticationError,
    CapacityExceeded,
    ConfigError,
    PermissionDenied,
)
from loraplex.server import auth
from loraplex.server.auth import (
    KeyStore,
    Limiter,
    Principal,
    bearer_key,
    generate_key,
    hash_key,
    require,
)
from loraplex.server.settings import ServerSettings

TEAM_KEY = "lpx-team-a-0123456789abcdef-SECRET"
ROTATED_KEY = "lpx-team-a-new-fedcba9876543210-SECRET"
PUSH_KEY = "lpx-pusher-5555555555555555-SECRET"


def settings(**kw):
    """ServerSettings-like: the real fields plus the proposed keys_file / keys_inline."""
    base = dict(api_keys=[], admin_key=None, served_model_name="base", base_name=None,
                keys_file=None, keys_inline=None)
    base.update(kw)
    base["api_keys"] = [SecretStr(k) for k in base["api_keys"]]
    if isinstance(base["admin_key"], str):
        base["admin_key"] = SecretStr(base["admin_key"])
    if isinstance(base["keys_inline"], str):
        base["keys_inline"] = SecretStr(base["keys_inline"])
    return SimpleNamespace(**base)


def keys_doc():
    return {"keys": [
        {"name": "team-a", "hashes": [hash_key(TEAM_KEY), hash_key(ROTATED_KEY)],
         "scopes": ["infer"], "adapters": ["support-*", "faq"],
         "requests_per_minute": 60, "max_concurrent": 2},
        {"name": "pusher", "hash": hash_key(PUSH_KEY), "scopes": ["push"], "adapters": ["team-a-*"]},
    ]}


def write_yaml(path, doc):
    import yaml

    path.write_text(yaml.safe_dump(doc))
    return path


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


# -- keys ---------------------------------------------------------------------------------------

def test_hash_key_is_sha256_hex_and_generate_key_matches():
    assert hash_key("test") == "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    key, h = generate_key()
    assert key.startswith("lpx-") and len(key) >= 40 and h == hash_key(key)
    assert generate_key()[0] != key
    # the documented stdlib one-liner gives the same string
    assert "sha256:" + hashlib.sha256(key.encode()).hexdigest() == h


@pytest.mark.parametrize("header, key", [
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER abc", "abc"),
    (None, None), ("", None), ("Bearer", None), ("Bearer   ", None), ("Basic abc", None), ("abc", None),
])
def test_bearer_key(header, key):
    assert bearer_key(header) == key


# -- the existing settings (backwards compatible) -----------------------------------------------

def test_api_keys_and_admin_key_from_real_server_settings():
    store = KeyStore.from_settings(ServerSettings(api_keys="k1, k2", admin_key="adm",
                                                  served_model_name="toy"))
    assert not store.open
    k1 = store.authenticate("Bearer k1")
    assert k1.name == "api_keys[0]" and k1.scopes == {"infer"} and not k1.limited
    assert k1.can_see("anything") and k1.can_see("toy") and k1.can_see("x@3")
    assert store.authenticate("Bearer k2").name == "api_keys[1]"
    adm = store.authenticate("Bearer adm")
    assert adm.name == "admin" and adm.scopes == {"admin", "push", "infer"} and adm.can_see("x")
    with pytest.raises(AuthenticationError) as e:
        store.authenticate("Bearer nope")
    assert e.value.http_status == 401
    with pytest.raises(AuthenticationError):
        store.authenticate(None)
    assert store.any_with("admin") and store.any_with("push")


def test_open_when_no_client_keys_even_with_an_admin_key():
    store = KeyStore.from_settings(settings(admin_key="adm"))
    assert store.open
    anon = store.authenticate(None)
    assert anon.name == "anonymous" and anon.scopes == {"infer"} and anon.can_see("any")
    assert store.authenticate("Bearer whatever") is anon  # e.g. the openai client's "-"
    assert store.authenticate("Bearer adm").name == "admin"  # a configured key counts as itself
    with pytest.raises(PermissionDenied):
        require(anon, "admin")
    # admin routes do not take anonymous requests
    with pytest.raises(AuthenticationError):
        store.authenticate(None, anonymous=False)
    with pytest.raises(AuthenticationError):
        store.authenticate("Bearer whatever", anonymous=False)
    assert store.authenticate("Bearer adm", anonymous=False).name == "admin"


def test_nothing_configured_admin_is_off():
    store = KeyStore.from_settings(settings())
    assert store.open and not store.any_with("admin") and store.principals() == []


def test_admin_key_listed_among_api_keys_keeps_admin_scopes():
    store = KeyStore.from_settings(settings(api_keys=["adm", "k1", "k1"], admin_key="adm"))
    assert store.authenticate("Bearer adm").name == "admin"
    assert [p.name for p in store.principals()] == ["admin", "api_keys[1]"]


# -- scopes and visibility ----------------------------------------------------------------------

def test_require_scope():
    p = Principal("p", frozenset({"infer"}))
    require(p, "infer")
    for scope in ("push", "admin"):
        with pytest.raises(PermissionDenied) as e:
            require(p, scope)
        assert e.value.http_status == 403 and scope in e.value.message and "'p'" in e.value.message
    with pytest.raises(ValueError):
        require(p, "root")


def test_can_see_patterns_refs_and_base():
    p = Principal("p", frozenset({"infer"}), ("support-*", "faq", "v?", "r[0-9]"),
                  base_names=frozenset({"base", "llama"}))
    for ok in ("support-bot", "support-bot@3", "support-bot:prod", "faq", "faq@12", "v1", "r7",
               "base", "llama"):
        assert p.can_see(ok), ok
    for hidden in ("support", "faq2", "faqs:prod", "other", "v12", "rx", "", "@3", "Support-bot"):
        assert not p.can_see(hidden), hidden
    # the base needs infer; adapter patterns apply to every scope
    pusher = Principal("q", frozenset({"push"}), ("team-*",), base_names=frozenset({"base"}))
    assert not pusher.can_see("base") and pusher.can_see("team-x") and not pusher.can_see("x")
    assert not Principal("n", frozenset({"infer"}), ()).can_see("anything")


def test_store_gives_principals_the_base_names():
    store = KeyStore.from_settings(settings(served_model_name="toy", base_name="toy-base",
                                            keys_inline=json.dumps(keys_doc())))
    team = store.authenticate(f"Bearer {TEAM_KEY}")
    assert team.can_see("toy") and team.can_see("toy-base") and not team.can_see("base")
    assert not team.can_see("other-adapter") and team.can_see("support-x@2")


# -- keys file ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["yaml", "json", "list"])
def test_keys_file(tmp_path, fmt):
    doc = keys_doc()
    path = tmp_path / "keys"
    if fmt == "yaml":
        write_yaml(path, doc)
    elif fmt == "json":
        path.write_text(json.dumps(doc, indent="\t"))
    else:
        write_yaml(path, doc["keys"])  # a bare list is accepted too
    store = KeyStore.from_settings(settings(keys_file=str(path), api_keys=["legacy"]))
    assert not store.open
    team = store.authenticate(f"Bearer {TEAM_KEY}")
    assert store.authenticate(f"Bearer {ROTATED_KEY}") is team  # two hashes, one principal
    assert team.name == "team-a" and team.scopes == {"infer"} and team.adapters == ("support-*", "faq")
    assert team.requests_per_minute == 60 and team.max_concurrent == 2 and team.burst is None
    pusher = store.authenticate(f"Bearer {PUSH_KEY}")
    assert pusher.scopes == {"push"} and pusher.requests_per_minute is None
    assert store.authenticate("Bearer legacy").name == "api_keys[0]"
    with pytest.raises(AuthenticationError):
        store.authenticate("Bearer " + hash_key(TEAM_KEY))  # the hash is not the key


def test_keys_file_entry_defaults(tmp_path):
    path = write_yaml(tmp_path / "k.yaml", {"keys": [{"name": "x", "hash": hash_key("kx").upper()
                                                     .replace("SHA256:", "sha256:")}]})
    p = KeyStore.from_settings(settings(keys_file=path)).authenticate("Bearer kx")
    assert p.scopes == {"infer"} and p.adapters == ("*",) and not p.limited


def test_a_keys_file_without_entries_fails_closed(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("keys: []\n")
    store = KeyStore.from_settings(settings(keys_file=path))
    assert not store.open
    with pytest.raises(AuthenticationError):
        store.authenticate(None)


@pytest.mark.parametrize("entry, needle", [
    ({"name": "x", "key": TEAM_KEY}, "plaintext"),
    ({"name": "x", "hash": TEAM_KEY}, "not `sha256:`"),
    ({"name": "x", "hash": "sha256:abc"}, "not `sha256:`"),
    ({"name": "x"}, "no `hash`"),
    ({"name": "x", "hash": hash_key("a"), "scope": ["infer"]}, "unknown field"),
    ({"name": "x", "hash": hash_key("a"), "scopes": ["infer", "root"]}, "scopes"),
    ({"name": "x", "hash": hash_key("a"), "scopes": []}, "scopes"),
    ({"name": "x", "hash": hash_key("a"), "adapters": ["bot@3"]}, "adapter pattern"),
    ({"name": "x", "hash": hash_key("a"), "adapters": [""]}, "adapter pattern"),
    ({"name": "x", "hash": hash_key("a"), "adapters": "bot"}, None),  # a single string is fine
    ({"name": "x", "hash": hash_key("a"), "requests_per_minute": 0}, "requests_per_minute"),
    ({"name": "x", "hash": hash_key("a"), "requests_per_minute": True}, "requests_per_minute"),
    ({"name": "x", "hash": hash_key("a"), "max_concurrent": 1.5}, "max_concurrent"),
    ({"name": "x", "hash": hash_key("a"), "burst": 5}, "needs `requests_per_minute`"),
    ({"name": "has space", "hash": hash_key("a")}, "`name`"),
    ({"name": "admin", "hash": hash_key("a")}, "reserved"),
    ({"name": "anonymous", "hash": hash_key("a")}, "reserved"),
    ("just a string", "mapping"),
])
def test_keys_file_entry_errors_name_the_entry_never_the_key(tmp_path, entry, needle):
    path = write_yaml(tmp_path / "k.yaml", {"keys": [entry]})
    if needle is None:
        KeyStore.from_settings(settings(keys_file=path))
        return
    with pytest.raises(ConfigError) as e:
        KeyStore.from_settings(settings(keys_file=path))
    msg = e.value.message
    assert needle in msg and "entry 1" in msg and str(path) in msg
    assert TEAM_KEY not in msg


def test_keys_file_document_errors(tmp_path):
    cases = {
        "missing.yaml": None,
        "bad.yaml": f"keys:\n  - name: x\n    hash: [{TEAM_KEY}\n",
        "top.yaml": "users: []\n",
        "scalar.yaml": "42\n",
        "bin.yaml": b"\xff\xfe",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
        with pytest.raises(ConfigError) as e:
            KeyStore.from_settings(settings(keys_file=path))
        assert str(path) in e.value.message and TEAM_KEY not in e.value.message, name


def test_duplicates_are_config_errors(tmp_path):
    h = hash_key("same")
    with pytest.raises(ConfigError, match="configured twice"):
        KeyStore.from_settings(settings(keys_inline=json.dumps(
            [{"name": "a", "hash": h}, {"name": "b", "hash": h}])))
    with pytest.raises(ConfigError, match="configured twice"):
        KeyStore.from_settings(settings(api_keys=["same"], keys_inline=json.dumps([{"name": "a", "hash": h}])))
    with pytest.raises(ConfigError, match="named 'a'"):
        KeyStore.from_settings(settings(keys_inline=json.dumps(
            [{"name": "a", "hash": h}, {"name": "a", "hash": hash_key("other")}])))
    # keys_inline and keys_file together: one namespace
    path = write_yaml(tmp_path / "k.yaml", [{"name": "a", "hash": hash_key("third")}])
    with pytest.raises(ConfigError, match="named 'a'"):
        KeyStore.from_settings(settings(keys_file=path, keys_inline=json.dumps([{"name": "a", "hash": h}])))


def test_maybe_reload_rotates_keys_without_restart(tmp_path, caplog):
    path = write_yaml(tmp_path / "keys.yaml", {"keys": [{"name": "team-a", "hash": hash_key(TEAM_KEY)}]})
    store = KeyStore.from_settings(settings(keys_file=path))
    assert store.maybe_reload() is False  # unchanged
    # step 1 of a rotation: both hashes
    write_yaml(path, {"keys": [{"name": "team-a", "hashes": [hash_key(TEAM_KEY), hash_key(ROTATED_KEY)]}]})
    assert store.maybe_reload() is True
    assert store.authenticate(f"Bearer {TEAM_KEY}").name == store.authenticate(f"Bearer {ROTATED_KEY}").name
    # step 2: the old hash removed
    write_yaml(path, {"keys": [{"name": "team-a", "hash": hash_key(ROTATED_KEY)}]})
    assert store.maybe_reload() is True
    with pytest.raises(AuthenticationError):
        store.authenticate(f"Bearer {TEAM_KEY}")
    # a broken edit keeps the previous keys, and says so once
    caplog.set_level(logging.DEBUG, logger="loraplex")
    path.write_text(f"keys:\n  - name: team-a\n    key: {TEAM_KEY}\n")
    assert store.maybe_reload() is False and store.maybe_reload() is False
    assert store.authenticate(f"Bearer {ROTATED_KEY}").name == "team-a"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "keeping the previous keys" in errors[0].getMessage()
    assert all(TEAM_KEY not in r.getMessage() for r in caplog.records)
    # a vanished file (e.g. mid-update) keeps them too
    path.unlink()
    assert store.maybe_reload() is False
    assert store.authenticate(f"Bearer {ROTATED_KEY}").name == "team-a"
    assert KeyStore.from_settings(settings(api_keys=["k"])).maybe_reload() is False


def test_lookup_compares_every_stored_hash_in_constant_time(monkeypatch):
    store = KeyStore.from_settings(settings(api_keys=[f"k{i}" for i in range(5)], admin_key="adm",
                                            keys_inline=json.dumps(keys_doc())))
    n = len(store._entries)
    assert n == 9
    calls = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for key in ("adm", "k4", TEAM_KEY, "wrong"):  # first entry, a later one, none
        calls.clear()
        store.lookup(key)
        assert len(calls) == n, key
        # it compares hashes of the presented key, never the key itself
        assert all(key.encode() not in a + b for a, b in calls)
    calls.clear()
    assert store.lookup("") is None and store.lookup(None) is None


# -- limits -------------------------------------------------------------------------------------

def limited(name="p", rpm=None, burst=None, conc=None):
    return Principal(name, frozenset({"infer"}), requests_per_minute=rpm, burst=burst, max_concurrent=conc)


def test_rate_limit_token_bucket_and_retry_after():
    clock = Clock()
    lim = Limiter(clock=clock)
    p = limited(rpm=60, burst=3)  # one a second, three at once
    for _ in range(3):
        lim.acquire(p).release()
    with pytest.raises(CapacityExceeded) as e:
        lim.acquire(p)
    err = e.value
    assert err.http_status == 429 and err.code == "rate_limit_exceeded" and err.retry_after == 1.0
    assert err.headers() == {"Retry-After": "1"} and "'p'" in err.message
    clock.advance(0.5)
    with pytest.raises(CapacityExceeded):
        lim.acquire(p)
    clock.advance(0.5)
    lim.acquire(p).release()
    # slow rate: the wait is rounded up, never down
    slow = limited("slow", rpm=2, burst=1)  # one per 30 s
    lim.acquire(slow).release()
    clock.advance(0.4)
    with pytest.raises(CapacityExceeded) as e:
        lim.acquire(slow)
    assert e.value.retry_after == 30.0 and e.value.headers() == {"Retry-After": "30"}
    clock.advance(29.6)
    lim.acquire(slow).release()
    # refills cap at the burst
    clock.advance(3600)
    for _ in range(3):
        lim.acquire(p).release()
    with pytest.raises(CapacityExceeded):
        lim.acquire(p)


def test_burst_defaults_to_requests_per_minute():
    lim = Limiter(clock=Clock())
    p = limited(rpm=5)
    for _ in range(5):
        lim.acquire(p).release()
    with pytest.raises(CapacityExceeded) as e:
        lim.acquire(p)
    assert e.value.retry_after == 12.0


def test_concurrency_limit():
    lim = Limiter(clock=Clock())
    p = limited(conc=2)
    a, b = lim.acquire(p), lim.acquire(p)
    assert lim.in_flight(p) == 2
    with pytest.raises(CapacityExceeded) as e:
        lim.acquire(p)
    assert e.value.code == "concurrency_limit_exceeded" and e.value.headers() == {"Retry-After": "1"}
    a.release()
    a.release()  # idempotent: does not free b's slot
    assert lim.in_flight(p) == 1
    c = lim.acquire(p)
    with pytest.raises(CapacityExceeded):
        lim.acquire(p)
    b.release()
    c.release()
    assert lim.in_flight(p) == 0


def test_a_refused_request_takes_neither_token_nor_slot():
    clock = Clock()
    lim = Limiter(clock=clock)
    p = limited(rpm=60, burst=2, conc=1)
    held = lim.acquire(p)  # token 1 of 2, the only slot
    for _ in range(5):
        with pytest.raises(CapacityExceeded) as e:
            lim.acquire(p)
        assert e.value.code == "concurrency_limit_exceeded"
    held.release()
    lim.acquire(p).release()  # token 2 still there
    with pytest.raises(CapacityExceeded) as e:
        lim.acquire(p)
    assert e.value.code == "rate_limit_exceeded" and lim.in_flight(p) == 0


def test_async_context_manager_releases_on_error_and_principals_are_independent():
    lim = Limiter(clock=Clock())
    p, q = limited("p", conc=1), limited("q", conc=1)

    async def main():
        with pytest.raises(RuntimeError):
            async with lim.acquire(p):
                assert lim.in_flight(p) == 1
                async with lim.acquire(q):
                    raise RuntimeError("boom")
        assert lim.in_flight(p) == 0 and lim.in_flight(q) == 0
        with lim.acquire(p):
            with pytest.raises(CapacityExceeded):
                lim.acquire(p)

    asyncio.run(main())
    assert lim.in_flight(p) == 0


def test_unlimited_principals_are_never_refused_and_keep_no_state():
    lim = Limiter(clock=Clock())
    store = KeyStore.from_settings(settings(api_keys=["k"]))
    p = store.authenticate("Bearer k")
    permits = [lim.acquire(p) for _ in range(10_000)]
    assert lim._states == {} and lim.acquire(store.anonymous)
    for x in permits:
        x.release()


def test_limits_follow_a_reload():
    clock = Clock()
    lim = Limiter(clock=clock)
    lim.acquire(limited(rpm=60, burst=10)).release()
    # the same principal name with a lower burst: tokens are capped to it at once
    tight = limited(rpm=60, burst=1)
    lim.acquire(tight).release()
    with pytest.raises(CapacityExceeded):
        lim.acquire(tight)
    # a limit lifted: the bucket goes
    lim.acquire(limited(conc=5)).release()
    assert lim._states["p"].bucket is None


# -- secrecy ------------------------------------------------------------------------------------

def _strings(obj, seen=None, depth=0):
    """Every string reachable from obj's attributes (to check a plaintext key is kept nowhere)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, (str, bytes)):
        yield obj if isinstance(obj, str) else obj.decode("latin-1")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k, seen, depth + 1)
            yield from _strings(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _strings(v, seen, depth + 1)
    elif hasattr(obj, "__dict__") or hasattr(obj, "__dataclass_fields__"):
        for v in (vars(obj) if hasattr(obj, "__dict__") else {}).values():
            yield from _strings(v, seen, depth + 1)


def test_keys_never_kept_shown_or_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = write_yaml(tmp_path / "keys.yaml", keys_doc())
    secrets = ["legacy-SECRET-1", "admin-SECRET-2", TEAM_KEY, ROTATED_KEY, PUSH_KEY]
    inline = json.dumps([{"name": "inl", "hash": hash_key("inline-SECRET-3")}])
    secrets.append("inline-SECRET-3")
    store = KeyStore.from_settings(settings(api_keys=["legacy-SECRET-1"], admin_key="admin-SECRET-2",
                                            keys_file=path, keys_inline=inline))
    lim = Limiter(clock=Clock())
    shown = [repr(store), str(store)]
    errors = []
    for key in secrets + ["wrong-SECRET-4"]:
        for header in (f"Bearer {key}", f"Basic {key}", key):
            try:
                p = store.authenticate(header, anonymous=False)
                shown += [repr(p), str(p)]
                permit = lim.acquire(p)
                shown += [repr(permit), repr(lim)]
                for scope in ("infer", "push", "admin"):
                    try:
                        require(p, scope)
                    except PermissionDenied as exc:
                        errors.append(exc)
            except AuthenticationError as exc:
                errors.append(exc)
    team = store.authenticate(f"Bearer {TEAM_KEY}")
    for _ in range(3):
        try:
            lim.acquire(team)
        except CapacityExceeded as exc:
            errors.append(exc)
    assert any(isinstance(e, CapacityExceeded) for e in errors)
    assert sum(isinstance(e, AuthenticationError) for e in errors) >= 12
    shown += [repr(e) for e in errors] + [str(e) for e in errors]
    shown += [json.dumps(e.to_openai()) for e in errors] + [str(e.headers()) for e in errors]
    shown += [r.getMessage() for r in caplog.records] + [repr(r.args) for r in caplog.records]
    assert any("team-a" in r.getMessage() for r in caplog.records)  # names are logged
    kept = list(_strings(store)) + list(_strings(lim))
    for secret in secrets + ["wrong-SECRET-4"]:
        for text in shown:
            assert secret not in text, (secret, text)
        for text in kept:
            assert secret not in text, (secret, text)
    # not the hashes either, in anything shown
    for text in shown:
        assert "sha256:" not in text, text


def test_config_errors_never_echo_a_pasted_key(tmp_path):
    inline = f"keys:\n  - name: x\n    hash: {TEAM_KEY}\n"
    with pytest.raises(ConfigError) as e:
        KeyStore.from_settings(settings(keys_inline=inline))
    assert TEAM_KEY not in str(e.value) and "keys_inline entry 1 (x)" in e.value.message
    broken = f"keys: [{{name: x, hash: {TEAM_KEY}\n"
    with pytest.raises(ConfigError) as e:
        KeyStore.from_settings(settings(keys_inline=broken))
    assert TEAM_KEY not in str(e.value) and "line" in e.value.message
