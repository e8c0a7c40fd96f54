"""Reference grammar: name, name@N, name:alias, and the safe-name pattern."""

from __future__ import annotations

import pytest

from loraplex.adapters.errors import BadRequest
from loraplex.adapters.refs import Ref, check_alias, check_name, parse_ref


@pytest.mark.parametrize("text, ref", [
    ("support-bot", Ref("support-bot")),
    ("support-bot@3", Ref("support-bot", version=3)),
    ("support-bot:canary", Ref("support-bot", alias="canary")),
    ("llama-3.1_8b:prod", Ref("llama-3.1_8b", alias="prod")),
    ("a@12", Ref("a", version=12)),
    ("x:latest", Ref("x", alias="latest")),
])
def test_parse_valid(text: str, ref: Ref) -> None:
    assert parse_ref(text) == ref
    assert str(parse_ref(text)) == text


@pytest.mark.parametrize("text, fragment", [
    ("", "invalid adapter reference"),
    ("Bot", "invalid name 'Bot'"),
    ("../etc", "invalid name '../etc'"),
    ("a/b", "invalid name 'a/b'"),
    ("a..b", "invalid name 'a..b'"),
    ("has space", "invalid name 'has space'"),
    ("-dash", "invalid name '-dash'"),
    ("x" * 65, "invalid name"),
    ("bot@0", "invalid version '0'"),
    ("bot@v3", "invalid version 'v3'"),
    ("bot@", "invalid version ''"),
    ("bot:", "invalid alias ''"),
    ("bot:Prod", "invalid alias 'Prod'"),
    ("bot:a/b", "invalid alias 'a/b'"),
    ("@3", "invalid name ''"),
])
def test_parse_invalid(text: str, fragment: str) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_ref(text)
    assert fragment in exc.value.message
    if "version" not in fragment and "reference" not in fragment:
        assert "pattern [a-z0-9]" in exc.value.message  # the message shows the rule


def test_check_name_and_alias() -> None:
    assert check_name("x" * 64) == "x" * 64
    with pytest.raises(BadRequest, match="reserved"):
        check_alias("latest")
    assert check_alias("canary") == "canary"
