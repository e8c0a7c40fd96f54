"""The app's OpenAPI document: every `$ref` resolvable, every error OpenAI-shaped.

The /v1 routes parse their bodies by hand (deps.parse_body: every failure an OpenAI 400, not
FastAPI's 422), so their request schemas come in through `openapi_extra` with pydantic's
`$defs`; here those are hoisted into `components/schemas` and any `#/$defs/X` left is pointed
there. Each operation gets its error responses in the one shape the server sends
(`{"error": {"message", "type", "param", "code"}}`), FastAPI's 422 (never sent: validation
errors are 400s) is dropped, and the bearer-key scheme is declared.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}

_WHY = {
    400: "Invalid request (bad JSON, a field out of range, an unusable model or adapter)",
    401: "Missing or unknown API key",
    403: "The key lacks the scope, or may not use this model or adapter",
    404: "Unknown model, adapter, version or alias",
    409: "Conflicts with the registry's state",
    413: "Request body over the size limit",
    429: "Over capacity or the key's rate limit (see Retry-After)",
    500: "Internal error",
    503: "Not ready (starting, draining) or the registry store is unavailable",
}
# Statuses each kind of route can answer with the error shape.
V1_ERRORS = (400, 401, 403, 404, 413, 429, 500, 503)
ADMIN_ERRORS = (400, 401, 403, 404, 409, 413, 429, 500, 503)
OTHER_ERRORS = (413, 500)  # /health, /ready, /metrics: no auth, no body

_READY = {"type": "object", "required": ["ready"], "properties": {
    k: {"type": "boolean"} for k in ("ready", "engine", "registry", "registry_view", "draining")}}
# The probes' own shapes (they are not OpenAI routes).
_PROBES: dict[tuple[str, str], dict[str, Any]] = {
    ("/health", "get"): {
        "200": {"description": "Alive", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"status": {"const": "ok"}}}}}},
        "503": {"description": "The engine has died", "content": {"application/json": {
            "schema": {"type": "object", "properties": {
                "status": {"const": "engine_dead"}, "error": {"type": "string"}}}}}},
    },
    ("/ready", "get"): {
        "200": {"description": "Ready", "content": {"application/json": {"schema": _READY}}},
        "503": {"description": "Not ready (starting or draining)",
                "content": {"application/json": {"schema": _READY}}},
    },
    ("/metrics", "get"): {
        "200": {"description": "Prometheus metrics", "content": {
            "text/plain": {"schema": {"type": "string"}}}},
    },
}

_DEFS_REF = "#/$defs/"
_COMPONENTS_REF = "#/components/schemas/"


def _hoist(node: Any, into: dict[str, Any]) -> Any:
    """Move every `$defs` under `node` into `into` and point `#/$defs/X` refs at components."""
    if isinstance(node, list):
        return [_hoist(x, into) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "$defs" and isinstance(v, dict):
            for name, sub in v.items():
                sub = _hoist(sub, into)
                if name in into and into[name] != sub:
                    raise ValueError(f"two different OpenAPI schemas are both named {name!r}")
                into[name] = sub
        elif k == "$ref" and isinstance(v, str) and v.startswith(_DEFS_REF):
            out[k] = _COMPONENTS_REF + v[len(_DEFS_REF):]
        else:
            out[k] = _hoist(v, into)
    return out


def _error_response(status: int) -> dict[str, Any]:
    return {"description": _WHY[status],
            "content": {"application/json": {"schema": {"$ref": _COMPONENTS_REF + "ErrorResponse"}}}}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    spec = get_openapi(title=app.title, version=app.version, description=app.description,
                       routes=app.routes)
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    hoisted: dict[str, Any] = {}
    spec["paths"] = _hoist(spec.get("paths", {}), hoisted)
    for name, sub in hoisted.items():
        if name in schemas and schemas[name] != sub:
            raise ValueError(f"two different OpenAPI schemas are both named {name!r}")
        schemas[name] = sub
    schemas["ErrorResponse"] = ERROR_SCHEMA
    components["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer <key>`"}}

    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # validation errors are sent as OpenAI-shaped 400s
            if path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/tokenizer_info"):
                codes, op["security"] = V1_ERRORS, [{"bearer": []}, {}]  # {}: when no key is set
            elif path.startswith("/admin/"):
                codes, op["security"] = ADMIN_ERRORS, [{"bearer": []}]
            else:
                codes = OTHER_ERRORS
                responses.update(_PROBES.get((path, method), {}))
            for status in codes:
                responses.setdefault(str(status), _error_response(status))
    if path_op := spec["paths"].get("/admin/adapters", {}).get("post"):
        path_op.setdefault("requestBody", {"required": False, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "A .tar.gz or .zip of a PEFT LoRA directory (when no `uri` is given)"})
    # FastAPI's 422 models are unused once the 422s are gone.
    used = repr(spec["paths"])
    for name in ("HTTPValidationError", "ValidationError"):
        if name in schemas and _COMPONENTS_REF + name not in used:
            del schemas[name]
    return spec


def install_openapi(app: FastAPI) -> None:
    """`app.openapi()` (and /openapi.json) returns `build_openapi(app)`, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
