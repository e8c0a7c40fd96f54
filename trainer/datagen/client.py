"""The teacher: chat completions through the official `openai` AsyncOpenAI client.

At most `concurrency` requests are in flight (a semaphore; a request waiting to retry does not
hold a slot). The client's own retries are off (`max_retries=0`): this module retries, so the
policy is one place, counted and testable:

- retried: 429, 408, 409, 5xx, timeouts and connection errors, up to `max_retries` times, after
  `backoff_s * 2**attempt` seconds (capped at `max_backoff_s`, with jitter in [50%, 100%]),
  or after the server's `Retry-After` / `retry-after-ms` when that is longer (up to 10 min);
- fatal for the run (`TeacherUnavailable`, exit 2): 401, 403 (the key) and 404 (the model or
  the URL): every other request would fail the same way;
- failed for the item only (`TeacherError`): any other 4xx (e.g. a prompt over the context
  length) and retries exhausted. The item is not written, so a rerun tries it again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from loraplex.adapters.errors import ConfigError
from loraplex.trainer.datagen.settings import DataSettings

MAX_RETRY_AFTER_S = 600.0
RETRY_STATUS = {408, 409, 425, 429}
FATAL_STATUS = {401: "the endpoint refused the API key", 403: "the API key may not use it",
                404: "no such model (or URL)"}


class TeacherError(Exception):
    """One request failed for good; the item is left for a rerun."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class TeacherUnavailable(ConfigError):
    """The endpoint refuses every request (key, model, URL): the run stops."""


@dataclass
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ClientStats:
    requests: int = 0
    retries: Counter = field(default_factory=Counter)  # kind -> retries
    failures: Counter = field(default_factory=Counter)  # kind -> items failed
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "retries": dict(self.retries),
                "failures": dict(self.failures), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}


def retry_after_s(headers: Any) -> float | None:
    """Seconds a response asks to wait: `retry-after-ms`, else `Retry-After` (seconds or an
    HTTP date); None when absent or unreadable."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def classify(exc: BaseException) -> tuple[str, str, float | None]:
    """(action, kind, retry_after): action is "retry", "fatal" or "fail"."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        headers = getattr(exc.response, "headers", None)
        if status in FATAL_STATUS:
            return "fatal", f"http_{status}", None
        if status in RETRY_STATUS or status >= 500:
            return "retry", f"http_{status}", retry_after_s(headers)
        return "fail", f"http_{status}", None
    if isinstance(exc, openai.APITimeoutError):
        return "retry", "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        return "retry", "connection", None
    return "fail", type(exc).__name__, None


class Teacher:
    """`await teacher.chat(messages, ...)` -> Reply, with the retry policy above."""

    def __init__(self, settings: DataSettings, *, client: Any = None,
                 sleep: Callable[[float], Awaitable[None]] | None = None,
                 rng: random.Random | None = None):
        if client is None:
            from openai import AsyncOpenAI

            client = AsyncOpenAI(base_url=settings.url, api_key=settings.key(), max_retries=0,
                                 timeout=settings.timeout_s)
        self.settings = settings
        self.model = settings.model
        self._client = client
        self._sem = asyncio.Semaphore(settings.concurrency)
        self._sleep = sleep or asyncio.sleep
        self._rng = rng or random.Random()
        self.stats = ClientStats()
        self.delays: list[float] = []  # every retry delay, in order (tests, the report)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        s = self.settings
        backoff = min(s.max_backoff_s, s.backoff_s * 2 ** attempt) * (0.5 + 0.5 * self._rng.random())
        if retry_after is not None:
            return max(backoff, min(retry_after, MAX_RETRY_AFTER_S))
        return backoff

    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int,
                   temperature: float, top_p: float = 1.0, seed: int | None = None) -> Reply:
        params: dict[str, Any] = {"model": self.model, "messages": messages,
                                  "max_tokens": max_tokens, "temperature": temperature,
                                  "top_p": top_p}
        if seed is not None:
            params["seed"] = seed
        attempt = 0
        while True:
            try:
                async with self._sem:
                    self.stats.requests += 1
                    resp = await self._client.chat.completions.create(**params)
            except Exception as exc:
                action, kind, retry_after = classify(exc)
                detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                if action == "fatal":
                    raise TeacherUnavailable(
                        f"{self.settings.url} model {self.model!r}: {FATAL_STATUS[int(kind[5:])]}"
                        f" ({kind}: {detail})", param="model") from None
                if action == "fail" or attempt >= self.settings.max_retries:
                    self.stats.failures[kind] += 1
                    tries = f" after {attempt + 1} tries" if action == "retry" else ""
                    raise TeacherError(kind, f"{kind}{tries}: {detail}") from None
                wait = self.delay(attempt, retry_after)
                self.stats.retries[kind] += 1
                self.delays.append(wait)
                await self._sleep(wait)
                attempt += 1
                continue
            if not resp.choices:
                self.stats.failures["no_choices"] += 1
                raise TeacherError("no_choices", "the response has no choices")
            choice = resp.choices[0]
            usage = resp.usage
            reply = Reply(text=choice.message.content or "", finish_reason=choice.finish_reason,
                          prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                          completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
            self.stats.prompt_tokens += reply.prompt_tokens
            self.stats.completion_tokens += reply.completion_tokens
            return reply

    async def aclose(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            await close()
