"""`loraplex serve`: the OpenAI-compatible server over vLLM.

Flags are generated from `ServerSettings`, so every setting is both `--some-field` and
`LORAPLEX_SOME_FIELD` (a flag wins over the environment). `--model` is a directory or a hub id
`org/name[@revision]` (resolved from the HF cache, HF_HOME). Any other vLLM engine argument:
`--engine-arg KEY=VALUE` (repeatable; VALUE is parsed as JSON when it parses, else a string)
or `LORAPLEX_ENGINE_ARGS='{"KEY": VALUE}'`; flag keys are added to the env var's object.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import types
import typing
from typing import Any


def _is_bool(annotation: Any) -> bool:
    """bool or bool | None."""
    if annotation is bool:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {a for a in typing.get_args(annotation) if a is not type(None)} == {bool}
    return False


def register(sub: argparse._SubParsersAction) -> None:
    from loraplex.server.settings import ServerSettings

    p = sub.add_parser("serve", help="serve the base model and registered adapters (OpenAI API)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = (field.description or "") + f" [env LORAPLEX_{name.upper()}]"
        if name == "engine_args":
            p.add_argument("--engine-arg", dest=name, action="append", default=None,
                           metavar="KEY=VALUE", help=help_)
        elif _is_bool(field.annotation):
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=help_)
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=serve)


def parse_engine_arg_flags(items: list[str]) -> dict[str, Any]:
    """`["tensor_parallel_size=2", "kv-cache-dtype=fp8"]` -> {"tensor_parallel_size": 2, ...}.

    A value is JSON when it parses as JSON (numbers, true/false, null, objects), else a string.
    """
    from loraplex.adapters.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--engine-arg {item!r}: expected KEY=VALUE, e.g. --engine-arg "
                              "block_size=32", param="engine_args")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def load_settings(given: dict[str, Any]):
    """ServerSettings from flag values over the environment; ConfigError naming the option."""
    from pydantic import ValidationError

    from loraplex.adapters.errors import ConfigError
    from loraplex.server.settings import ServerSettings

    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        e = exc.errors()[0]
        field = str(e["loc"][0]) if e["loc"] else "?"
        flag = "--engine-arg" if field == "engine_args" else "--" + field.replace("_", "-")
        raise ConfigError(f"{flag} / LORAPLEX_{field.upper()}: {e['msg']} "
                          f"(got {e.get('input')!r})", param=field) from None


def settings_from_args(args: argparse.Namespace):
    """The one ServerSettings of this run: flags over LORAPLEX_* env; --engine-arg keys are
    merged into LORAPLEX_ENGINE_ARGS's object (a flag wins per key)."""
    from loraplex.server.settings import ServerSettings

    given = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None}
    flags = parse_engine_arg_flags(given.pop("engine_args", None) or [])
    settings = load_settings(given)
    if flags:
        settings = load_settings({**given, "engine_args": {**settings.engine_args, **flags}})
    return settings


def _exit_clean(signum: int, frame: object) -> None:
    sys.exit(0)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from loraplex.adapters.models import resolve_model
    from loraplex.server.app import create_app
    from loraplex.server.engine import VllmEngine, check_engine_args

    settings = settings_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Fail fast, before a download or an engine start: engine_args keys against vLLM's fields.
    check_engine_args(settings.engine_args)
    # Resolve the model once (a hub id -> its snapshot in the HF cache); everything after this
    # (engine, tokenizer, base fingerprint) reads that one directory.
    model = resolve_model(settings.model, revision=settings.revision)
    if str(model) != str(settings.model):
        logging.getLogger("loraplex.serve").info("model %s -> %s", settings.model, model)
    settings = settings.model_copy(update={"model": model})
    engine = VllmEngine(settings)
    app = create_app(settings, engine, freeze_gc=True)
    # Graceful shutdown: on SIGTERM uvicorn closes the listening socket (new work is refused,
    # so readiness fails), lets in-flight streams finish (up to drain_timeout_s), then runs the
    # lifespan shutdown. Afterwards it re-raises the captured SIGTERM under the handler that
    # was installed before it: with the default one a cleanly drained server would die with
    # status 143, so that handler exits 0 instead (also for a SIGTERM before uvicorn starts).
    signal.signal(signal.SIGTERM, _exit_clean)
    # Keep idle connections longer than clients and load balancers do (httpx 5 s, AWS ALB 60 s):
    # with uvicorn's default of 5 s, a client reusing a connection just as the server closes
    # it gets a reset (seen in the soak: benchmarks/soak.py, docs/soak.md).
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=settings.drain_timeout_s, timeout_keep_alive=75)
    return 0
