"""Adapter references: the strings users write to name an adapter.

Three forms, one grammar shared by the CLI, the trainer and the server (`model` field):

    name            -> `name:prod` if that alias exists, else the newest active version
    name@3          -> version 3 of `name`
    name:canary     -> whatever the alias `canary` of `name` points to (`latest` is virtual)

Names and aliases end up in file paths, URLs and SQL, so they are restricted to a safe pattern:
lowercase letters, digits, `.`, `_`, `-`, starting with a letter or digit, at most 64 chars, and
never `..` (so no path traversal is expressible at all).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraplex.adapters.errors import BadRequest

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME_RE = re.compile(NAME_PATTERN)
# ASCII digits only: str.isdigit()/int() also accept '³', '١', fullwidth '３', ' 3', '+3'...
_VERSION_RE = re.compile(r"[0-9]+")  # with re.fullmatch: nothing else, no "\n"
MAX_VERSION_DIGITS = 9
# `latest` is computed, never stored; `prod` is what a bare name means when it exists.
LATEST = "latest"
DEFAULT_ALIAS = "prod"


@dataclass(frozen=True)
class Ref:
    """A parsed reference. At most one of `version` / `alias` is set."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}:{self.alias}"
        return self.name


def ascii_int(text: str, max_digits: int = MAX_VERSION_DIGITS) -> int | None:
    """`text` as an int if it is 1..max_digits ASCII digits 0-9 (nothing else), else None.

    For every number a user writes in a reference or alias target: int() alone accepts
    '١' (Arabic-Indic), '３' (fullwidth), ' 3', '+3' and '1_0', and fails on '³'.
    """
    if not isinstance(text, str) or not 0 < len(text) <= max_digits:
        return None
    return int(text) if _VERSION_RE.fullmatch(text) else None


def _show(value: object, limit: int = 80) -> str:
    """repr(value), shortened: a message must not echo a megabyte a client sent."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_name(value: object, what: str = "name") -> str:
    """Return `value` if it is a safe adapter/alias/base name, else raise BadRequest naming it."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or ".." in value:
        raise BadRequest(
            f"invalid {what} {_show(value)}: use 1-64 characters from lowercase letters, digits, "
            f"'.', '_' and '-', starting with a letter or digit, without '..' "
            f"(pattern {NAME_PATTERN})",
            param=what,
        )
    return value


def check_alias(value: object) -> str:
    """An alias a user may set: a safe name that is not the virtual `latest`."""
    alias = check_name(value, "alias")
    if alias == LATEST:
        raise BadRequest(
            "alias 'latest' is reserved: it always means the newest active version; "
            "pick another alias name (e.g. 'prod' or 'canary')",
            param="alias",
        )
    return alias


def ref_name(model: str) -> str:
    """The adapter name a reference names (`words` of `words@3` / `words:prod`), without
    checking it: for visibility checks, which must answer the same for valid and invalid refs."""
    return re.split(r"[@:]", model, maxsplit=1)[0]


def parse_ref(s: str | Ref) -> Ref:
    """Parse `name`, `name@3` or `name:alias` into a `Ref`; BadRequest on anything else."""
    if isinstance(s, Ref):
        return s
    if not isinstance(s, str) or not s:
        raise BadRequest(f"invalid adapter reference {_show(s)}: expected name, name@VERSION or "
                         "name:ALIAS", param="model")
    if "@" in s:
        name, _, ver = s.partition("@")
        version = ascii_int(ver)
        if version is None or version < 1:
            raise BadRequest(
                f"invalid version {_show(ver)} in reference {_show(s)}: a version is a positive "
                f"integer of 1-{MAX_VERSION_DIGITS} ASCII digits 0-9, e.g. "
                f"{name if _NAME_RE.fullmatch(name) else 'name'}@3",
                param="model",
            )
        return Ref(check_name(name), version=version)
    if ":" in s:
        name, _, alias = s.partition(":")
        return Ref(check_name(name), alias=check_name(alias, "alias"))
    return Ref(check_name(s))
