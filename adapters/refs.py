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


def check_name(value: object, what: str = "name") -> str:
    """Return `value` if it is a safe adapter/alias/base name, else raise BadRequest naming it."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or ".." in value:
        raise BadRequest(
            f"invalid {what} {value!r}: use 1-64 characters from lowercase letters, digits, "
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


def parse_ref(s: str | Ref) -> Ref:
    """Parse `name`, `name@3` or `name:alias` into a `Ref`; BadRequest on anything else."""
    if isinstance(s, Ref):
        return s
    if not isinstance(s, str) or not s:
        raise BadRequest(f"invalid adapter reference {s!r}: expected name, name@VERSION or "
                         "name:ALIAS", param="model")
    if "@" in s:
        name, _, ver = s.partition("@")
        if not ver.isdigit() or int(ver) < 1 or len(ver) > 9:
            raise BadRequest(
                f"invalid version {ver!r} in reference {s!r}: a version is a positive integer, "
                f"e.g. {name or 'name'}@3",
                param="model",
            )
        return Ref(check_name(name), version=int(ver))
    if ":" in s:
        name, _, alias = s.partition(":")
        return Ref(check_name(name), alias=check_name(alias, "alias"))
    return Ref(check_name(s))
