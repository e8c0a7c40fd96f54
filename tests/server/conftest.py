"""A real `loraplex serve` (vLLM CPU engine, uvicorn, real HTTP) over a temp registry.

One server per test session (engine start-up costs tens of seconds): the toy base registered,
two quick PEFT adapters (`upper`, `reverse`) pushed before start. Tests that push more use
unique names, so they do not disturb each other's expectations.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraplex.adapters.registry import Registry
from tests.services import free_port, server_env, spawn_server, stop_server, wait_ready


@dataclass
class Served:
    url: str
    home: Path
    env: dict[str, str]
    registry: Registry
    proc: subprocess.Popen
    log: Path
    admin_key: str = "admin-secret"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.v1, api_key="test-key", max_retries=0, **kw)

    def async_client(self, **kw):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.v1, api_key="test-key", max_retries=0, **kw)


def start_server(model: Path, env: dict[str, str], log: Path, timeout: float = 240) -> subprocess.Popen:
    proc = spawn_server(model, env, log)
    try:
        wait_ready(proc, f"http://127.0.0.1:{env['LORAPLEX_PORT']}", log, timeout)
    except RuntimeError:
        proc.kill()
        raise
    return proc


@pytest.fixture(scope="session")
def served(toy_model_dir, test_loras, tmp_path_factory) -> Served:
    home = tmp_path_factory.mktemp("served-home")
    registry = Registry(f"sqlite:///{home / 'registry.db'}", str(home / "artifacts"))
    registry.register_base("toy", toy_model_dir)
    for name, path in test_loras.items():
        registry.push(path, name, base="toy")
    port = free_port()
    env = server_env(home, port)
    log = home / "server.log"
    proc = start_server(toy_model_dir, env, log)
    yield Served(url=f"http://127.0.0.1:{port}", home=home, env=env, registry=registry,
                 proc=proc, log=log)
    stop_server(proc)
    registry.close()


def run_manager(settings, registry: Registry, body, engine):
    """Start an `AdapterManager` over `engine` (a fake one, started here) and return
    `await body(manager, engine)`, stopping the manager after it."""
    from loraplex.server.lora_manager import AdapterManager
    from loraplex.server.metrics import Metrics

    async def main():
        await engine.start()
        m = AdapterManager(settings, registry, engine, Metrics())
        await m.start()
        try:
            return await body(m, engine)
        finally:
            await m.stop()
    return asyncio.run(main())
