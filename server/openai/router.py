"""The OpenAI routes, thin: each parses its body (deps.Body), hands it to its surface, answers.

/v1/chat/completions, /v1/completions, /v1/responses, /v1/models[/{id}], /v1/render,
/tokenize, /detokenize and /tokenizer_info (vLLM's), all behind the key check (`infer` scope).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from loraplex.server.openai.deps import Body, Serving
from loraplex.server.openai.models import get_model, list_models
from loraplex.server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RenderRequest,
    TokenizeRequest,
)
from loraplex.server.openai.protocol_responses import ResponsesRequest


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


def _principal(request: Request):
    return getattr(request.state, "principal", None)


def build_router(require_key) -> APIRouter:
    r = APIRouter(dependencies=[Depends(require_key)])

    @r.post("/v1/chat/completions", responses=_STREAMED,
            openapi_extra=_schema(ChatCompletionRequest))
    async def chat_completions(req: Body[ChatCompletionRequest], s: Serving, request: Request):
        return await s.chat.chat(req, request)

    @r.post("/v1/completions", responses=_STREAMED, openapi_extra=_schema(CompletionRequest))
    async def completions(req: Body[CompletionRequest], s: Serving, request: Request):
        return await s.completion.completion(req, request)

    @r.post("/v1/responses", responses=_STREAMED, openapi_extra=_schema(ResponsesRequest))
    async def responses(req: Body[ResponsesRequest], s: Serving, request: Request):
        return await s.responses.create(req, request)

    @r.post("/v1/render", openapi_extra=_schema(RenderRequest))
    async def render(req: Body[RenderRequest], s: Serving, request: Request):
        """The prompt and token ids a chat request would be sent to the engine with."""
        return await s.chat.render(req, request)

    @r.post("/tokenize", openapi_extra=_schema(TokenizeRequest))
    async def tokenize(req: Body[TokenizeRequest], s: Serving, request: Request):
        return await s.tokens.tokenize(req, request)

    @r.get("/tokenizer_info")
    async def tokenizer_info(s: Serving, request: Request, model: str | None = None):
        """vLLM's: the tokenizer's config and chat template (of `model`, else the base)."""
        return await s.tokens.tokenizer_info(model, request)

    @r.post("/detokenize", openapi_extra=_schema(DetokenizeRequest))
    async def detokenize(req: Body[DetokenizeRequest], s: Serving, request: Request):
        return await s.tokens.detokenize(req, request)

    @r.get("/v1/models")
    async def models(s: Serving, request: Request):
        data = list_models(s.settings, s.manager)
        principal = _principal(request)
        if principal is not None:  # a key sees only the adapters it may use
            data = [m for m in data if principal.can_see(m["id"])]
        return {"object": "list", "data": data}

    @r.get("/v1/models/{model_id:path}")
    async def model(model_id: str, s: Serving, request: Request):
        s.chat.check_visible(model_id, request)
        # As a request naming it would: an adapter pushed since the last poll is looked up now
        # (`loraplex eval NAME` right after a push), and an unknown one is the same 404.
        await s.manager.resolve(model_id, None)
        return get_model(s.settings, s.manager, model_id)

    return r
