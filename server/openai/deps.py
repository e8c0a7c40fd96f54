"""FastAPI dependencies of the OpenAI routes, as `Annotated` types the routes declare.

    async def chat(req: Body[ChatCompletionRequest], s: Serving, request: Request): ...

`Body[M]` parses the JSON body by hand into pydantic model M (not FastAPI's 422 path), so every
failure is an OpenAI-shaped 400 naming the `param`; `Serving` is the app's surfaces, available
once the engine has started (the router's key check answers 503 before that).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from loraplex.adapters.chat import is_encodable
from loraplex.adapters.errors import BadRequest


@dataclass
class Surfaces:
    """The serving objects behind the routes (built in the app's lifespan)."""

    chat: Any  # ChatServing
    completion: Any  # CompletionServing
    tokens: Any  # TokenServing
    responses: Any  # ResponsesServing
    settings: Any
    manager: Any


def _surfaces(request: Request) -> Surfaces:
    return request.app.state.loraplex.serving


Serving = Annotated[Surfaces, Depends(_surfaces)]


class _BodyOf:
    """`Body[Model]`: the request body parsed and validated as Model."""

    def __class_getitem__(cls, model: type[BaseModel]):
        async def parse(request: Request) -> Any:
            return await parse_body(request, model)

        return Annotated[model, Depends(parse)]


Body = _BodyOf


# pydantic names the member of a union that failed (`prompt.str`, `prompt.list[int]`).
_UNION_MEMBER = re.compile(r"(str|int|float|bool|list\[.*\]|dict\[.*\]|literal\[.*\])")


def _param(loc: tuple) -> str:
    """pydantic's error location -> OpenAI's `param` (`messages[0].role`)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("body",) and not str(part).startswith(("function-", "constrained-")) \
                and not _UNION_MEMBER.fullmatch(str(part)):
            out += ("." if out else "") + str(part)
    return out or "body"


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    try:
        data = await request.json()
    except Exception:
        raise BadRequest("the request body is not valid JSON", param="body") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", param="body")
    bad = _first_lone_surrogate(data)
    if bad is not None:
        raise BadRequest(f"{bad} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                         "escape), which is not text: send valid Unicode", param=bad)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _param(tuple(err["loc"]))
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise BadRequest(f"invalid {param}: {msg}{got}", param=param) from None


def _first_lone_surrogate(data: Any) -> str | None:
    """The path (`messages[0].content`) of the first string, key or value, that cannot be
    UTF-8 encoded; iterative, so deep nesting cannot overflow the stack."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:
        path, x = todo.pop()
        if isinstance(x, str):
            if not is_encodable(x):
                return path or "body"
        elif isinstance(x, dict):
            for k, v in x.items():
                sub = f"{path}.{k}" if path else str(k)
                if not is_encodable(str(k)):
                    return path or "body"
                todo.append((sub, v))
        elif isinstance(x, list):
            todo.extend((f"{path}[{i}]", v) for i, v in enumerate(x))
    return None
