"""The engine boundary: the only place in the server that imports vLLM.

`core` drives vLLM's AsyncLLM behind the small `Engine` interface (server/interface.py);
`tool_parsers` wraps vLLM's tool-call parsers behind the `ToolCallParser` interface. The rest of
the server imports these names from here and never vllm itself.
"""

from loraplex.server.engine.core import (  # noqa: F401 - the boundary's public names
    _RESERVED,
    VllmEngine,
    apply_vllm_fixes,
    build_engine_args,
    check_engine_args,
    engine_arg_names,
    engine_kwargs,
)
