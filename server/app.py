"""The FastAPI app: lifespan (engine, registry view), auth, errors, health and metrics.

`create_app(settings, engine=...)` takes any `Engine`, so routes and errors are unit-tested
with a fake engine; `loraplex serve` passes the vLLM one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.adapters import chat
from loraplex.adapters.errors import (
    BadRequest,
    LoraplexError,
    NotReady,
    PermissionDenied,
)
from loraplex.adapters.records import not_found_name
from loraplex.adapters.refs import ref_name
from loraplex.adapters.registry import Registry
from loraplex.server.admin import build_admin_router
from loraplex.server.auth import KeyStore, Limiter, require
from loraplex.server.interface import Engine
from loraplex.server.lora_manager import AdapterManager
from loraplex.server.metrics import Metrics
from loraplex.server.openai.deps import Surfaces
from loraplex.server.openai.router import build_router
from loraplex.server.openai.serving import Admission
from loraplex.server.openai.serving_chat import ChatServing
from loraplex.server.openai.serving_completion import CompletionServing
from loraplex.server.openai.serving_responses import ResponsesServing
from loraplex.server.openai.serving_tokens import TokenServing
from loraplex.server.settings import ServerSettings

log = logging.getLogger("loraplex.server")


@dataclass
class State:
    settings: ServerSettings
    engine: Engine
    metrics: Metrics
    manager: AdapterManager | None = None
    serving: Surfaces | None = None
    draining: bool = False
    limiter: Limiter = field(default_factory=Limiter)


async def _reload_keys(keys: KeyStore, every_s: float) -> None:
    """A rotated keys file takes effect without a restart (a bad edit keeps the old keys)."""
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(keys.maybe_reload)


def _surfaces(settings: ServerSettings, engine: Engine, manager: AdapterManager,
              metrics: Metrics, limiter: Limiter) -> Surfaces:
    """The OpenAI surfaces over one engine: one admission count, one tokenizer, one base
    template, shared by all."""
    tokenizer = chat.load_tokenizer(settings.model)
    shared = (settings, engine, manager, metrics, Admission(settings, metrics, limiter),
              tokenizer, chat.resolve_template(None, settings.model))
    return Surfaces(chat=ChatServing(*shared), completion=CompletionServing(*shared),
                    tokens=TokenServing(*shared), responses=ResponsesServing(*shared),
                    settings=settings, manager=manager)


def freeze_startup_heap() -> None:
    """Move everything the start allocated (vLLM, torch, transformers, the tokenizer: millions
    of objects) out of the garbage collector's sight, as vLLM's own server does after start.

    Otherwise a burst of requests, which allocates enough to trigger a full collection, stops
    the event loop while that collection walks the whole heap: 1-2 s on a busy 2-CPU machine,
    every stream paused and every token of the requests that arrived meanwhile delivered at
    once (docs/benchmarks.md, issue 15). Only for a process that serves until it exits: frozen
    objects are never collected (`gc.unfreeze()` on shutdown gives them back)."""
    gc.collect()
    gc.freeze()


def create_app(settings: ServerSettings, engine: Engine, registry: Registry | None = None,
               freeze_gc: bool = False) -> FastAPI:
    """`freeze_gc`: `freeze_startup_heap()` once started (`loraplex serve`; not for tests that
    start many apps in one process)."""
    state = State(settings=settings, engine=engine, metrics=Metrics())
    keys = KeyStore.from_settings(settings)  # a bad keys file stops the start, named

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        reg = registry or Registry.open(settings)
        state.manager = AdapterManager(settings, reg, engine, state.metrics)
        state.serving = _surfaces(settings, engine, state.manager, state.metrics, state.limiter)
        await state.manager.start()
        log.info("serving %s (%s) on registry revision %s", settings.served_model_name,
                 settings.model, state.manager.snapshot.revision)
        reload = (asyncio.create_task(_reload_keys(keys, settings.poll_interval_s))
                  if settings.keys_file else None)
        if freeze_gc:
            freeze_startup_heap()
        yield
        if freeze_gc:
            gc.unfreeze()
        if reload is not None:
            reload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reload
        state.draining = True
        await state.manager.stop()
        await engine.stop()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.loraplex = state
    from loraplex.server.openapi import install_openapi

    install_openapi(app)  # /openapi.json: refs resolvable, OpenAI-shaped errors (server/openapi.py)
    # Body size limits (server/limits.py): a 413 before a body is read (Content-Length) or
    # once a chunked one crosses the limit, before any route or dependency reads it.
    from loraplex.server.limits import BodyLimitMiddleware

    app.add_middleware(BodyLimitMiddleware, max_request_bytes=settings.max_request_bytes,
                       max_upload_bytes=settings.max_upload_bytes)

    async def require_key(request: Request) -> None:
        """The /v1 routes: a key with the `infer` scope (any request when no key is
        configured); its principal rides on the request for visibility and limits."""
        principal = keys.authenticate(request.headers.get("authorization"))
        require(principal, "infer")
        request.state.principal = principal
        if state.serving is None:
            raise NotReady("the engine is still starting; retry shortly")

    async def require_admin(request: Request) -> None:
        """The /admin routes, always with a key (also when /v1 is open): registering a version
        (POST /admin/adapters) needs `push`, everything else `admin`; either way only for the
        adapters the key may see."""
        register = request.method == "POST" and request.url.path.rstrip("/") == "/admin/adapters"
        scope = "push" if register else "admin"
        if not keys.any_with(scope):
            raise PermissionDenied(f"admin routes that need the {scope!r} scope are off: set "
                                   f"LORAPLEX_ADMIN_KEY (or give a key the {scope} scope in "
                                   "LORAPLEX_KEYS_FILE) to enable them")
        principal = keys.authenticate(request.headers.get("authorization"), anonymous=False)
        require(principal, scope)
        name = request.query_params.get("name") if register else (
            request.path_params.get("ref") or request.path_params.get("name"))
        if name and not principal.can_see(name):
            if register:  # a new name has nothing to hide
                raise PermissionDenied(f"key {principal.name!r} may not push adapter {name!r}: "
                                       "it is outside the adapters this key may use")
            raise not_found_name(ref_name(name))
        request.state.principal = principal
        if state.manager is None:
            raise NotReady("the engine is still starting; retry shortly")

    app.include_router(build_router(require_key))
    app.include_router(build_admin_router(state, require_admin))

    @app.get("/health")
    async def health():
        """The process and its engine are alive (liveness): 503 once the engine has died, so
        the orchestrator restarts the pod (vLLM does not restart a dead engine core)."""
        try:
            await asyncio.wait_for(engine.check_health(), timeout=5.0)
        except Exception as exc:
            log.error("health check failed: the engine is dead: %r", exc)
            return JSONResponse({"status": "engine_dead", "error": repr(exc)}, status_code=503)
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
        endpoint = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                    "/v1/responses": "responses"}.get(
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
