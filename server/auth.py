"""Access control: API keys -> principals with scopes, visible adapters and rate limits.

Who may do what is decided here; the routes only ask. The API, for the code that wires it in:

    store = KeyStore.from_settings(settings)      # once, at app start (ConfigError on bad config)
    store.maybe_reload()                          # periodically (a small blocking read; e.g.
                                                  # beside the registry poll): a changed keys file
    store.any_with("admin")                       # False: admin routes are off (today's 403)
    limiter = Limiter()                           # once, at app start

    principal = store.authenticate(request.headers.get("authorization"))   # 401 AuthenticationError
    principal = store.authenticate(header, anonymous=False)                # admin routes: 401 on
                                                                           # no/unknown key even
                                                                           # when /v1 is open
    require(principal, "infer")                   # 403 PermissionDenied without the scope
    if not principal.can_see(request.model):      # `name`, `name@3`, `name:prod` or the base
        raise AdapterNotFound(...)                # invisible: the same 404 as an unknown name
    models = [m for m in models if principal.can_see(m["id"])]             # /v1/models

    async with limiter.acquire(principal):        # 429 CapacityExceeded with retry_after set
        ...                                       # a non-streamed request
    permit = limiter.acquire(principal)           # a stream: release when the stream ends
    try: ... finally: permit.release()            # (release is idempotent)

Scopes: `infer` (the /v1 routes), `push` (register / upload adapter versions), `admin` (load,
unload, pin, aliases). A scope implies no other; `admin_key` gets all three. Adapter patterns
(fnmatch globs on adapter *names*: `support`, `team-a-*`, `*`) apply to every scope; the served
base model is visible to every key with `infer`.

Where keys come from (`KeyStore.from_settings`):
- `api_keys` (existing): each key is a principal `api_keys[i]` with `infer` on all adapters and
  no limits, as before;
- `admin_key` (existing): principal `admin` with `admin`, `push`, `infer`, all adapters;
- `keys_file` (new, `LORAPLEX_KEYS_FILE`) and/or `keys_inline` (new, `LORAPLEX_KEYS_INLINE`, the
  same document as a string): YAML or JSON holding `sha256:` hashes of keys, never keys:

      keys:
        - name: support-team                  # [A-Za-z0-9._-], 1-64; unique; shown in logs
          hash: sha256:9f86d081...            # or `hashes: [...]`: several during a rotation
          scopes: [infer]                     # default [infer]
          adapters: ["support-*", faq]        # default ["*"]
          requests_per_minute: 600            # default: no rate limit
          burst: 50                           # default: requests_per_minute
          max_concurrent: 8                   # default: no concurrency limit

With none of `api_keys`, `keys_file`, `keys_inline` set, the /v1 routes need no key (as before):
any request is the `anonymous` principal (`infer`, all adapters, no limits) unless it presents a
configured key (e.g. the admin key), which then counts as that key.

Keys are hashed (SHA-256) as soon as they are read; only hashes are kept. A presented key is
hashed and compared with every stored hash by `hmac.compare_digest`, all of them every time.
Nothing here logs a key or a hash; `Principal` holds neither. `hash_key` and `generate_key` use
only the standard library (docs/security.md has the one-line equivalents).

Limits are per principal and per server process (each replica enforces its own).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loraplex.adapters.errors import (
    AuthenticationError,
    CapacityExceeded,
    ConfigError,
    PermissionDenied,
)
from loraplex.adapters.refs import ref_name

log = logging.getLogger("loraplex.server.auth")

SCOPES = frozenset({"infer", "push", "admin"})
HASH_PREFIX = "sha256:"
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Adapter names (adapters/refs.py: lowercase, digits, . _ -) plus fnmatch's * ? [ ] !
_PATTERN_RE = re.compile(r"[a-z0-9._\-*?\[\]!]{1,64}")
_ENTRY_FIELDS = {"name", "hash", "hashes", "scopes", "adapters", "requests_per_minute", "burst",
                 "max_concurrent"}
ANONYMOUS_NAME = "anonymous"
_UNAUTHENTICATED = "missing or wrong API key: send `Authorization: Bearer <key>`"


# -- keys ---------------------------------------------------------------------------------------

def hash_key(key: str) -> str:
    """The stored form of a key: `sha256:` + the hex SHA-256 of its UTF-8 bytes."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key(prefix: str = "lpx-") -> tuple[str, str]:
    """A new random key (256 bits) and its hash: `(key, "sha256:...")`."""
    key = prefix + secrets.token_urlsafe(32)
    return key, hash_key(key)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header value, else None."""
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return rest.strip() or None


# -- principals ---------------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class Principal:
    """Who a key is, what it may do and see, and its limits. Holds no key and no hash."""

    name: str
    scopes: frozenset[str]
    adapters: tuple[str, ...] = ("*",)
    requests_per_minute: float | None = None
    max_concurrent: int | None = None
    burst: int | None = None
    # the served base model's names (served_model_name, base_name): visible with `infer`
    base_names: frozenset[str] = field(default_factory=frozenset)
    # where it was configured, for messages: "api_keys[0]", "admin_key", "keys_file entry 3"
    source: str = ""

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    def can_see(self, model: str) -> bool:
        """May this key see `model`: an adapter name or reference (`name@3`, `name:prod`), or
        the base model? False means: treat it as nonexistent (404, absent from /v1/models)."""
        if model in self.base_names:
            return "infer" in self.scopes
        name = ref_name(model)
        return bool(name) and any(fnmatch.fnmatchcase(name, p) for p in self.adapters)

    @property
    def limited(self) -> bool:
        return self.requests_per_minute is not None or self.max_concurrent is not None

    def __repr__(self) -> str:
        return (f"Principal({self.name!r}, scopes={sorted(self.scopes)}, "
                f"adapters={list(self.adapters)}, requests_per_minute={self.requests_per_minute}, "
                f"burst={self.burst}, max_concurrent={self.max_concurrent})")

    __str__ = __repr__


def require(principal: Principal, scope: str) -> None:
    """PermissionDenied (403) unless `principal` has `scope`."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    if scope not in principal.scopes:
        if principal.name == ANONYMOUS_NAME:
            raise PermissionDenied(f"this route needs a key with scope {scope!r}: send "
                                   "`Authorization: Bearer <key>`")
        raise PermissionDenied(f"key {principal.name!r} lacks scope {scope!r} (it has: "
                               f"{', '.join(sorted(principal.scopes)) or 'none'})")


# -- the key store ------------------------------------------------------------------------------

def _parse_document(text: str, where: str) -> list[Any]:
    import yaml

    doc = None
    if text.strip():
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            try:
                doc = yaml.safe_load(text)  # YAML (JSON with tabs or comments also lands here)
            except yaml.YAMLError as exc:
                # the position only: the parser's message quotes the text, which could hold a key
                mark = getattr(exc, "problem_mark", None)
                at = f" (line {mark.line + 1})" if mark is not None else ""
                raise ConfigError(f"{where}: not valid YAML or JSON{at}") from None
    if doc is None:
        return []
    if isinstance(doc, dict):
        unknown = set(doc) - {"keys"}
        if unknown:
            raise ConfigError(f"{where}: unknown top-level field(s) {sorted(unknown)}; expected "
                              "`keys: [...]`")
        doc = doc.get("keys") or []
    if not isinstance(doc, list):
        raise ConfigError(f"{where}: expected `keys:` with a list of entries")
    return doc


def _positive(entry: Mapping, key: str, where: str, kind: type) -> Any:
    v = entry.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or \
            (kind is int and v != int(v)) or not math.isfinite(v):
        raise ConfigError(f"{where}: `{key}` must be a positive {'integer' if kind is int else 'number'}"
                          f" or null (got {v!r})")
    return kind(v)


def _str_list(entry: Mapping, key: str, where: str) -> list[str]:
    v = entry[key]
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{where}: `{key}` must be a list of strings")
    return v


def _parse_entry(entry: Any, where: str) -> tuple[Principal, list[str]]:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an entry is a mapping with name, hash, scopes, adapters")
    if "key" in entry:
        # never echo it
        raise ConfigError(f"{where}: holds a plaintext `key`; store its hash instead "
                          "(`hash: sha256:...`, see docs/security.md)")
    unknown = set(entry) - _ENTRY_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: "
                          f"{', '.join(sorted(_ENTRY_FIELDS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: `name` must be 1-64 characters from letters, digits, '.', "
                          f"'_' and '-' (got {name!r})")
    where = f"{where} ({name})"
    if name == ANONYMOUS_NAME or name == "admin" or name.startswith("api_keys["):
        raise ConfigError(f"{where}: the name {name!r} is reserved")
    hashes = []
    for key in ("hash", "hashes"):
        if key in entry:
            hashes += _str_list(entry, key, where)
    if not hashes:
        raise ConfigError(f"{where}: no `hash` (give `hash: sha256:<hex>`)")
    for i, h in enumerate(hashes):
        if not _HASH_RE.fullmatch(h.strip().lower()):
            # a wrong value might be a pasted key: say where, never what
            raise ConfigError(f"{where}: hash #{i + 1} is not `sha256:` + 64 hex digits")
    hashes = [h.strip().lower() for h in hashes]
    scopes = _str_list(entry, "scopes", where) if "scopes" in entry else ["infer"]
    bad = set(scopes) - SCOPES
    if bad or not scopes:
        raise ConfigError(f"{where}: scopes must be a non-empty subset of "
                          f"{sorted(SCOPES)} (got {scopes!r})")
    adapters = _str_list(entry, "adapters", where) if "adapters" in entry else ["*"]
    for p in adapters:
        if not _PATTERN_RE.fullmatch(p):
            raise ConfigError(f"{where}: adapter pattern {p!r} is not an adapter name or glob "
                              "(lowercase letters, digits, '.', '_', '-', and * ? [ ]; names "
                              "only, no @version or :alias)")
    rpm = _positive(entry, "requests_per_minute", where, float)
    burst = _positive(entry, "burst", where, int)
    if burst is not None and rpm is None:
        raise ConfigError(f"{where}: `burst` needs `requests_per_minute`")
    principal = Principal(
        name=name, scopes=frozenset(scopes), adapters=tuple(adapters), requests_per_minute=rpm,
        max_concurrent=_positive(entry, "max_concurrent", where, int), burst=burst, source=where)
    return principal, hashes


def _secret(v: Any) -> str:
    return v.get_secret_value() if hasattr(v, "get_secret_value") else str(v)


class KeyStore:
    """The configured keys (as hashes) and their principals; see the module docstring."""

    def __init__(self, entries: Iterable[tuple[str, Principal]] = (), *, open: bool = False,
                 base_names: Iterable[str] = (), keys_file: Path | None = None,
                 file_digest: str | None = None, static: Iterable[tuple[str, Principal]] = ()):
        self.base_names = frozenset(n for n in base_names if n)
        self.open = open
        self.keys_file = keys_file
        self._file_digest = file_digest
        # entries that do not come from keys_file (api_keys, admin_key, keys_inline)
        self._static = self._bind(static)
        self._entries: list[tuple[str, Principal]] = []
        self._set(self._static + self._bind(entries))
        self.anonymous = Principal(ANONYMOUS_NAME, frozenset({"infer"}), ("*",),
                                   base_names=self.base_names, source="no keys configured")

    def _bind(self, entries: Iterable[tuple[str, Principal]]) -> list[tuple[str, Principal]]:
        """Give each principal the base names (one object per principal, however many hashes)."""
        bound: dict[int, Principal] = {}
        out = []
        for h, p in entries:
            if id(p) not in bound:
                bound[id(p)] = replace(p, base_names=self.base_names)
            out.append((h, bound[id(p)]))
        return out

    def _set(self, entries: list[tuple[str, Principal]]) -> None:
        seen_hash: dict[str, str] = {}
        seen_name: dict[str, str] = {}
        for h, p in entries:
            if h in seen_hash and seen_hash[h] != p.name:
                raise ConfigError(f"the same key is configured twice: in {seen_hash[h]} and in "
                                  f"{p.source or p.name}; give each key one entry")
            seen_hash[h] = p.name
            first = seen_name.setdefault(p.name, p.source)
            if first != p.source:
                raise ConfigError(f"two entries are named {p.name!r} ({first}; {p.source}); "
                                  "names must be unique (a rotation lists both hashes in one entry)")
        self._entries = [(h, p) for h, p in entries]

    # -- construction --

    @classmethod
    def from_settings(cls, settings: Any) -> KeyStore:
        """From ServerSettings: `api_keys`, `admin_key`, and (when the fields exist)
        `keys_file`, `keys_inline`. ConfigError (naming the setting) on anything invalid."""
        base_names = [getattr(settings, "served_model_name", None), getattr(settings, "base_name", None)]
        static: list[tuple[str, Principal]] = []
        admin = getattr(settings, "admin_key", None)
        admin_hash = None
        if admin is not None and _secret(admin):
            admin_hash = hash_key(_secret(admin))
            static.append((admin_hash, Principal("admin", SCOPES, ("*",), source="admin_key")))
        api_keys = list(getattr(settings, "api_keys", None) or [])
        for i, k in enumerate(api_keys):
            h = hash_key(_secret(k))
            if h == admin_hash or any(h == s for s, _ in static):
                continue  # the admin key (or a repeat) listed among api_keys: keep the superset
            static.append((h, Principal(f"api_keys[{i}]", frozenset({"infer"}), ("*",),
                                        source=f"api_keys[{i}]")))
        inline = getattr(settings, "keys_inline", None)
        inline_text = _secret(inline) if inline is not None else ""
        if inline_text.strip():
            static += cls._parse(inline_text, "keys_inline")
        keys_file = getattr(settings, "keys_file", None)
        keys_file = Path(keys_file).expanduser() if keys_file else None
        entries, digest = [], None
        if keys_file is not None:
            entries, digest = cls._read_file(keys_file)
        store = cls(entries, static=static, base_names=base_names, keys_file=keys_file,
                    file_digest=digest,
                    open=not api_keys and keys_file is None and not inline_text.strip())
        log.info("auth: %s; %d principal(s): %s",
                 "open (/v1 needs no key)" if store.open else "keys required",
                 len(store.principals()), ", ".join(p.name for p in store.principals()) or "-")
        return store

    @staticmethod
    def _parse(text: str, where: str) -> list[tuple[str, Principal]]:
        out = []
        for i, entry in enumerate(_parse_document(text, where)):
            p, hashes = _parse_entry(entry, f"{where} entry {i + 1}")
            out += [(h, p) for h in hashes]
        return out

    @classmethod
    def _read_file(cls, path: Path) -> tuple[list[tuple[str, Principal]], str]:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"keys_file {str(path)!r} cannot be read ({exc.strerror}); set "
                              "LORAPLEX_KEYS_FILE to a readable YAML or JSON file") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"keys_file {str(path)!r} is not UTF-8 text") from None
        return cls._parse(text, f"keys_file {str(path)!r}"), hashlib.sha256(raw).hexdigest()

    def maybe_reload(self) -> bool:
        """Re-read `keys_file` if its content changed (a rotated Kubernetes Secret volume is
        updated in place). True if the keys changed. A file that no longer parses keeps the
        previous keys and logs why (the error names the entry, never a key)."""
        if self.keys_file is None:
            return False
        try:
            raw = self.keys_file.read_bytes()
        except OSError as exc:
            log.error("auth: keys_file %s cannot be read (%s); keeping the previous keys",
                      self.keys_file, exc.strerror)
            return False
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._file_digest:
            return False
        try:
            entries, digest = self._read_file(self.keys_file)
            self._set(self._static + self._bind(entries))
        except ConfigError as exc:
            log.error("auth: keys_file changed but is invalid; keeping the previous keys: %s",
                      exc.message)
            self._file_digest = digest  # do not log the same error every poll
            return False
        self._file_digest = digest
        log.info("auth: keys_file reloaded; %d principal(s): %s", len(self.principals()),
                 ", ".join(p.name for p in self.principals()))
        return True

    # -- lookup --

    def principals(self) -> list[Principal]:
        seen: dict[str, Principal] = {}
        for _, p in self._entries:
            seen.setdefault(p.name, p)
        return list(seen.values())

    def any_with(self, scope: str) -> bool:
        """Does any configured key have `scope`? (False for `admin`: the admin routes are off.)"""
        return any(scope in p.scopes for p in self.principals())

    def lookup(self, key: str | None) -> Principal | None:
        """The principal of `key`, or None. Hashes `key` and compares it with every stored
        hash in constant time per comparison, without stopping at a match."""
        if not key:
            return None
        presented = hash_key(key).encode("ascii")
        found = None
        for stored, principal in self._entries:
            match = hmac.compare_digest(stored.encode("ascii"), presented)
            found = principal if match else found
        return found

    def authenticate(self, authorization: str | None, *, anonymous: bool = True) -> Principal:
        """The principal of an `Authorization` header value; AuthenticationError (401) if the
        key is missing or unknown, unless the store is open and `anonymous` is true."""
        principal = self.lookup(bearer_key(authorization))
        if principal is not None:
            return principal
        if self.open and anonymous:
            return self.anonymous
        log.debug("auth: request refused: missing or unknown key")
        raise AuthenticationError(_UNAUTHENTICATED)

    def __repr__(self) -> str:
        return (f"KeyStore(open={self.open}, principals={[p.name for p in self.principals()]}, "
                f"keys_file={str(self.keys_file) if self.keys_file else None!r})")

    __str__ = __repr__


# -- limits -------------------------------------------------------------------------------------

class TokenBucket:
    """`rate_per_minute` tokens a minute, at most `burst` stored; starts full."""

    def __init__(self, rate_per_minute: float, burst: int, now: float):
        self.rate = rate_per_minute / 60.0
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0 if one is now)."""
        self._refill(now)
        # the epsilon: refills summed from float time steps land a hair under a whole token
        return 0.0 if self.tokens >= 1 - 1e-9 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1

    def configure(self, rate_per_minute: float, burst: int, now: float) -> None:
        self._refill(now)
        self.rate, self.burst = rate_per_minute / 60.0, burst
        self.tokens = min(self.tokens, burst)


class Permit:
    """One admitted request; `release()` (idempotent) or use as a (async) context manager."""

    def __init__(self, release: Callable[[], None] | None):
        self._release = release

    def release(self) -> None:
        r, self._release = self._release, None
        if r is not None:
            r()

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


@dataclass
class _State:
    bucket: TokenBucket | None = None
    in_flight: int = 0


class Limiter:
    """Per-principal request rate (token bucket) and concurrency, keyed by principal name.

    `acquire` never waits: it admits (returning a Permit) or raises CapacityExceeded (429)
    with `retry_after` = whole seconds until a token is free (rate), or 1 (concurrency). A
    refused request takes neither a token nor a slot. Thread-safe; `clock` is monotonic seconds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _State] = {}

    def in_flight(self, principal: Principal) -> int:
        s = self._states.get(principal.name)
        return s.in_flight if s else 0

    def acquire(self, principal: Principal) -> Permit:
        if not principal.limited:
            return Permit(None)
        with self._lock:
            now = self.clock()
            s = self._states.setdefault(principal.name, _State())
            rpm = principal.requests_per_minute
            if rpm is None:
                s.bucket = None
            else:
                burst = principal.burst or max(1, math.ceil(rpm))
                if s.bucket is None:
                    s.bucket = TokenBucket(rpm, burst, now)
                elif (s.bucket.rate, s.bucket.burst) != (rpm / 60.0, burst):
                    s.bucket.configure(rpm, burst, now)  # limits changed by a keys_file reload
            cap = principal.max_concurrent
            if cap is not None and s.in_flight >= cap:
                raise CapacityExceeded(
                    f"key {principal.name!r} has {s.in_flight} requests in flight, its limit "
                    f"(max_concurrent {cap}); retry when one finishes",
                    code="concurrency_limit_exceeded", retry_after=1.0)
            if s.bucket is not None:
                wait = s.bucket.wait(now)
                if wait > 0:
                    raise CapacityExceeded(
                        f"key {principal.name!r} is over its rate limit ({rpm:g} requests per "
                        f"minute); retry in {math.ceil(wait)} s",
                        code="rate_limit_exceeded", retry_after=float(max(1, math.ceil(wait))))
                s.bucket.take()
            s.in_flight += 1
        return Permit(lambda: self._release(principal.name))

    def _release(self, name: str) -> None:
        with self._lock:
            s = self._states.get(name)
            if s is not None and s.in_flight > 0:
                s.in_flight -= 1


__all__ = [
    "ANONYMOUS_NAME", "SCOPES", "KeyStore", "Limiter", "Permit", "Principal", "TokenBucket",
    "bearer_key", "generate_key", "hash_key", "require",
]

