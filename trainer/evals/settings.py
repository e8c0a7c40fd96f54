"""Where `loraplex eval` and `loraplex adapters promote` send requests, and the judge's endpoint.

The same typed settings as `loraplex data` (DataSettings: URL, key from the environment only,
concurrency, retries with backoff, timeout), read from `LORAPLEX_EVAL_*` variables
(`LORAPLEX_EVAL_URL`, `LORAPLEX_EVAL_API_KEY`, ...) and from flags, which win. The judge's come
from `LORAPLEX_JUDGE_*` and the `--judge-*` flags; its URL and key default to the eval's.
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic_settings import SettingsConfigDict

from loraplex.trainer.datagen.settings import DataSettings


class EvalSettings(DataSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_EVAL_", extra="ignore")


class JudgeSettings(DataSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_JUDGE_", extra="ignore")


def _build(cls: type[DataSettings], given: dict[str, Any], prefix: str, flag: str) -> Any:
    from pydantic import ValidationError

    from loraplex.adapters.errors import ConfigError

    try:
        return cls(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        e = exc.errors()[0]
        name = str(e["loc"][0]) if e["loc"] else "api_key_env"
        opt = flag + ("timeout" if name == "timeout_s" else name.replace("_", "-"))
        raise ConfigError(f"{opt} / {prefix}{name.upper()}: {e['msg']}", param=name) from None


def eval_settings(args: argparse.Namespace) -> EvalSettings:
    given = {k: getattr(args, k, None) for k in ("url", "api_key_env", "concurrency",
                                                  "max_retries", "timeout_s")}
    return _build(EvalSettings, given, "LORAPLEX_EVAL_", "--")


def judge_settings(args: argparse.Namespace, base: EvalSettings,
                   gate_judge: dict[str, Any] | None = None) -> JudgeSettings | None:
    """The judge's settings, or None when no judge model is named. Flags win over the gate's
    `judge:` block, which wins over LORAPLEX_JUDGE_* variables."""
    import os

    gate_judge = gate_judge or {}
    model = (getattr(args, "judge_model", None) or gate_judge.get("model")
             or os.environ.get("LORAPLEX_JUDGE_MODEL"))
    if not model:
        return None
    given = {"model": model,
             "url": (getattr(args, "judge_url", None) or gate_judge.get("url")
                     or os.environ.get("LORAPLEX_JUDGE_URL") or base.url),
             "api_key_env": getattr(args, "judge_api_key_env", None) or gate_judge.get(
                 "api_key_env"),
             "concurrency": base.concurrency, "max_retries": base.max_retries,
             "timeout_s": base.timeout_s}
    settings = _build(JudgeSettings, given, "LORAPLEX_JUDGE_", "--judge-")
    if settings.api_key is None and settings.url == base.url:
        settings.api_key = base.api_key  # the same endpoint: the same key
    return settings


def add_endpoint_options(p: argparse.ArgumentParser) -> None:
    """The server, sampling and judge flags `eval` and `adapters promote` share."""
    g = p.add_argument_group("server (also LORAPLEX_EVAL_* variables; flags win)")
    g.add_argument("--url", help="OpenAI-compatible base URL of the loraplex server "
                   "(default http://127.0.0.1:8000/v1)")
    g.add_argument("--api-key-env", metavar="NAME",
                   help="read the API key from this variable (default: LORAPLEX_EVAL_API_KEY)")
    g.add_argument("--concurrency", type=int, help="requests in flight per model (default 8)")
    g.add_argument("--max-retries", type=int, help="per request (default 6)")
    g.add_argument("--timeout", type=float, dest="timeout_s", help="seconds per request")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, help="per answer (default 256)")
    s.add_argument("--temperature", type=float, help="default 0 (greedy)")
    s.add_argument("--seed", type=int, help="sent with every request when given")
    s.add_argument("--limit", type=int, help="only the first N rows of each set")
    j = p.add_argument_group("judge (optional; also LORAPLEX_JUDGE_* variables)")
    j.add_argument("--judge-model", help="rate every answer 1-10 with the fixed rubric")
    j.add_argument("--judge-url", help="the judge's endpoint (default: --url)")
    j.add_argument("--judge-max-tokens", type=int, help="the judge's reply (default 256)")
    j.add_argument("--judge-api-key-env", metavar="NAME",
                   help="the judge's key variable (default: LORAPLEX_JUDGE_API_KEY, or the "
                   "eval key for the same URL)")
