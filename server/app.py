"""The FastAPI app: lifespan (engine, registry view), auth, errors, health and metrics.

`create_app(settings, engine=...)` takes any `Engine`, so routes and errors are unit-tested
with a fake engine; `loraplex serve` passes the vLLM one.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.adapters.errors import (
    AuthenticationError,
    BadRequest,
    LoraplexError,
    NotReady,
    PermissionDenied,
)
from loraplex.adapters.registry import Registry
from loraplex.server.admin import build_admin_router
from loraplex.server.interface import Engine
from loraplex.server.lora_manager import AdapterManager
from loraplex.server.metrics import Metrics
from loraplex.server.openai.router import build_router
from loraplex.server.openai.serving import OpenAIServing
from loraplex.server.settings import ServerSettings

log = logging.getLogger("loraplex.server")


@dataclass
class State:
    settings: ServerSettings
    engine: Engine
    metrics: Metrics
    manager: AdapterManager | None = None
    serving: OpenAIServing | None = None
    draining: bool = False


def _key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def _matches(given: str | None, keys) -> bool:
    # Constant-time comparison: no key-guessing by timing.
    return given is not None and any(hmac.compare_digest(given, k.get_secret_value()) for k in keys)


def create_app(settings: ServerSettings, engine: Engine, registry: Registry | None = None) -> FastAPI:
    state = State(settings=settings, engine=engine, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        reg = registry or Registry.open(settings)
        state.manager = AdapterManager(settings, reg, engine, state.metrics)
        state.serving = OpenAIServing(settings, engine, state.manager, state.metrics)
        await state.manager.start()
        log.info("serving %s (%s) on registry revision %s", settings.served_model_name,
                 settings.model, state.manager.snapshot.revision)
        yield
        state.draining = True
        await state.manager.stop()
        await engine.stop()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.loraplex = state

    async def require_key(request: Request) -> None:
        if settings.api_keys and not _matches(_key(request), settings.api_keys):
            raise AuthenticationError("missing or wrong API key: send `Authorization: Bearer <key>`")
        if state.serving is None:
            raise NotReady("the engine is still starting; retry shortly")

    async def require_admin(request: Request) -> None:
        if settings.admin_key is None:
            raise PermissionDenied("admin routes are off: set LORAPLEX_ADMIN_KEY to enable them")
        given = _key(request)
        if given is None:
            raise AuthenticationError("admin routes need `Authorization: Bearer <admin key>`")
        if not _matches(given, [settings.admin_key]):
            raise PermissionDenied("this key is not the admin key")
        if state.manager is None:
            raise NotReady("the engine is still starting; retry shortly")

    app.include_router(build_router(state, require_key))
    app.include_router(build_admin_router(state, require_admin))

    @app.get("/health")
    async def health():
        """The process is alive (liveness)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Engine up and a registry view to serve from (readiness); 503 while draining."""
        m = state.manager
        checks = {"engine": engine.ready, "registry": bool(m and m.registry_ok),
                  "registry_view": bool(m and m.snapshot.revision >= 0), "draining": state.draining}
        ok = checks["engine"] and checks["registry_view"] and not state.draining
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        if state.manager is not None:
            await state.manager.update_residency()
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _count_error(request: Request, status: int) -> None:
        # Requests refused before (or instead of) generating: counted with empty adapter
        # labels, since an unknown `model` must not become a label value (cardinality).
        endpoint = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}.get(
            request.url.path)
        if endpoint:
            state.metrics.requests.labels("", "", endpoint, str(status)).inc()

    @app.exception_handler(LoraplexError)
    async def _loraplex_error(request: Request, exc: LoraplexError):
        _count_error(request, exc.http_status)
        return JSONResponse(exc.to_openai(), status_code=exc.http_status,
                            headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"][1:]) or None
        return await _loraplex_error(request, BadRequest(f"invalid {param}: {err['msg']}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": str(exc.detail), "type": kind, "param": None,
                                       "code": str(exc.status_code)}}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        _count_error(request, 500)
        return JSONResponse({"error": {"message": "internal error; see the server log",
                                       "type": "internal_error", "param": None, "code": None}},
                            status_code=500)

    @app.get("/", include_in_schema=False)
    async def root():
        return PlainTextResponse("loraplex: OpenAI-compatible API at /v1\n")

    return app
