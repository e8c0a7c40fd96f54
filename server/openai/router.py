"""The OpenAI routes: /v1/chat/completions, /v1/completions, /v1/models, /v1/render."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ValidationError

from loraplex.adapters.chat import is_encodable
from loraplex.adapters.errors import BadRequest
from loraplex.server.openai.protocol import ChatCompletionRequest, CompletionRequest, RenderRequest


def _param(loc: tuple) -> str:
    """pydantic's error location -> OpenAI's `param` (`messages[0].role`)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("body",) and not str(part).startswith(("function-", "constrained-")):
            out += ("." if out else "") + str(part)
    return out or "body"


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """Parse by hand (not FastAPI's 422 path) so every failure is an OpenAI-shaped 400."""
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


def _schema(model: type[BaseModel]) -> dict:
    """The request body (parsed by hand, so FastAPI does not see it) as `openapi_extra`: a
    `$ref` to the model in components/schemas, the model and its sub-models riding along in
    `$defs`, which server/openapi.py hoists into components/schemas."""
    ref = "#/components/schemas/{model}"
    schema = model.model_json_schema(by_alias=True, ref_template=ref)
    defs = {**schema.pop("$defs", {}), model.__name__: schema}
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": ref.format(model=model.__name__), "$defs": defs}}}}}


# The generation routes answer JSON, or server-sent events with `stream: true`.
_STREAMED = {200: {"description": "A JSON body, or with `stream: true` server-sent events "
                                  "(`data: {chunk}` lines, an error event if it fails, then "
                                  "`data: [DONE]`)",
                   "content": {"application/json": {},
                               "text/event-stream": {"schema": {"type": "string"}}}}}


def build_router(state, require_key) -> APIRouter:
    r = APIRouter(dependencies=[Depends(require_key)])

    @r.post("/v1/chat/completions", responses=_STREAMED,
            openapi_extra=_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        return await state.serving.chat(await parse_body(request, ChatCompletionRequest), request)

    @r.post("/v1/completions", responses=_STREAMED,
            openapi_extra=_schema(CompletionRequest))
    async def completions(request: Request):
        return await state.serving.completion(await parse_body(request, CompletionRequest), request)

    @r.post("/v1/render", openapi_extra=_schema(RenderRequest))
    async def render(request: Request):
        """The prompt and token ids a chat request would be sent to the engine with."""
        req = await parse_body(request, RenderRequest)
        state.serving.check_visible(req.model, request)
        version = await state.manager.resolve(req.model, None)
        return state.serving.render(req, version)

    @r.get("/v1/models")
    async def models(request: Request):
        principal = getattr(request.state, "principal", None)
        data = list_models(state)
        if principal is not None:  # a key sees only the adapters it may use
            data = [m for m in data if principal.can_see(m["id"])]
        return {"object": "list", "data": data}

    return r


def list_models(state) -> list[dict]:
    """The base, then per adapter name: the name, each version and each alias as a model id."""
    s = state.settings
    snap = state.manager.snapshot
    base_fp = state.manager.base.fingerprint
    now = int(time.time())
    data: list[dict] = [{"id": s.served_model_name, "object": "model", "created": now,
                         "owned_by": "loraplex", "root": str(s.model), "parent": None}]
    names = sorted({v.name for v in snap.versions
                    if v.state == "active" and v.base_fingerprint == base_fp})
    for name in names:
        versions = [v for v in snap.versions if v.name == name and v.state == "active"]
        aliases = {a.alias: a.target for a in snap.aliases if a.name == name}
        try:
            default = snap.resolve(name)
        except Exception:
            continue
        common = {"object": "model", "owned_by": "loraplex", "parent": s.served_model_name}
        data.append({"id": name, **common, "created": int(default.created_at.timestamp()),
                     "root": default.ref, "versions": [v.version for v in versions],
                     "aliases": aliases, "chat_template_sha256": default.chat_template_sha256})
        for v in versions:
            data.append({"id": v.ref, **common, "created": int(v.created_at.timestamp()),
                         "root": v.ref, "chat_template_sha256": v.chat_template_sha256})
        for alias, target in aliases.items():
            data.append({"id": f"{name}:{alias}", **common, "created": now,
                         "root": f"{name}:{alias}", "target": target})
    return data
