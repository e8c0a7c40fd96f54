"""`loraplex serve`: the OpenAI-compatible server over vLLM.

Flags are generated from `ServerSettings`, so every setting is both `--some-field` and
`LORAPLEX_SOME_FIELD` (a flag wins over the environment).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from loraplex.server.settings import ServerSettings

    p = sub.add_parser("serve", help="serve the base model and registered adapters (OpenAI API)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = (field.description or "") + f" [env LORAPLEX_{name.upper()}]"
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=help_)
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=serve)


def _exit_clean(signum: int, frame: object) -> None:
    sys.exit(0)


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from loraplex.adapters.errors import ConfigError
    from loraplex.server.app import create_app
    from loraplex.server.engine import EngineConfig, VllmEngine
    from loraplex.server.settings import ServerSettings

    given = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None}
    try:
        settings = ServerSettings(**given)
    except ValidationError as exc:
        e = exc.errors()[0]
        field = str(e["loc"][0]) if e["loc"] else "?"
        raise ConfigError(f"--{field.replace('_', '-')} / LORAPLEX_{field.upper()}: {e['msg']} "
                          f"(got {e.get('input')!r})") from None
    if not (settings.model / "config.json").exists():
        raise ConfigError(f"--model {str(settings.model)!r} is not a model directory (no "
                          "config.json); build one with `loraplex toy-model DIR`")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = VllmEngine(EngineConfig(
        model=str(settings.model), served_model_name=settings.served_model_name,
        max_model_len=settings.max_model_len, max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank, max_cpu_loras=settings.max_cpu_loras,
        max_num_seqs=settings.max_num_seqs, dtype=settings.dtype,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        cpu_kvcache_space_gib=settings.cpu_kvcache_space_gib,
        enforce_eager=settings.enforce_eager, seed=settings.seed,
    ))
    app = create_app(settings, engine)
    # Graceful shutdown: on SIGTERM uvicorn closes the listening socket (new work is refused,
    # so readiness fails), lets in-flight streams finish (up to drain_timeout_s), then runs the
    # lifespan shutdown. Afterwards it re-raises the captured SIGTERM under the handler that
    # was installed before it: with the default one a cleanly drained server would die with
    # status 143, so that handler exits 0 instead (also for a SIGTERM before uvicorn starts).
    signal.signal(signal.SIGTERM, _exit_clean)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=settings.drain_timeout_s)
    return 0
