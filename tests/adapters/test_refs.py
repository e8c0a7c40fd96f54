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


# -- versions are ASCII digits only (str.isdigit()/int() take any Unicode digit) ---------------

@pytest.mark.parametrize("ver", [
    "³",            # superscript three: isdigit() is True, int() raises (was a 500)
    "¹²",
    "١",            # Arabic-Indic one: int() == 1 (resolved to version 1)
    "٣",
    "۳",            # Extended Arabic-Indic (Persian) three
    "３",           # fullwidth three
    "१",            # Devanagari one
    "𝟑",           # mathematical bold digit three
    "+3",
    "-3",
    " 3",
    "3 ",
    "\t3",
    "3\n",
    "\u00a03",      # no-break space
    "1_0",
    "3.0",
    "0x3",
    "1e3",
    "0",
    "000",
    "1234567890",   # 10 digits
    "9" * 5000,     # int() of it alone raises ValueError past sys.int_info.str_digits_check
    "3" * 100_000,
])
def test_version_must_be_ascii_digits(ver: str) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_ref(f"words@{ver}")
    msg = exc.value.message
    assert exc.value.param == "model" and exc.value.http_status == 400
    assert "invalid version" in msg and "ASCII digits 0-9" in msg and "words@3" in msg, msg
    assert len(msg) < 400  # a huge value is shortened, not echoed whole


@pytest.mark.parametrize("text, version", [
    ("words@1", 1), ("words@007", 7), ("words@999999999", 999_999_999),
])
def test_version_ascii_forms(text: str, version: int) -> None:
    assert parse_ref(text) == Ref("words", version=version)


def test_ascii_int() -> None:
    from loraplex.adapters.refs import ascii_int

    assert ascii_int("42") == 42
    for bad in ("", "٤٢", "４２", "²", "+4", " 4", "4\n", "4_2", "9" * 10, None, 4):
        assert ascii_int(bad) is None, bad  # type: ignore[arg-type]


def test_huge_name_is_not_echoed_whole() -> None:
    with pytest.raises(BadRequest) as exc:
        parse_ref("A" * 100_000)
    assert "invalid name 'AAAA" in exc.value.message and len(exc.value.message) < 400
