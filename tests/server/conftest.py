"""A real `loraplex serve` (vLLM CPU engine, uvicorn, real HTTP) over a temp registry.

One server per test session (engine start-up costs tens of seconds): the toy base registered,
two quick PEFT adapters (`upper`, `reverse`) pushed before start. Tests that push more use
unique names, so they do not disturb each other's expectations.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
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


def toy_registry(home: Path, toy_model_dir: Path) -> Registry:
    """A fresh SQLite + directory registry under `home` with the toy base registered as `toy`."""
    registry = Registry(f"sqlite:///{home / 'registry.db'}", str(home / "artifacts"))
    registry.register_base("toy", toy_model_dir)
    return registry


@contextmanager
def serving(model: Path, home: Path, registry: Registry, **env: str) -> Iterator[Served]:
    """`loraplex serve` of `model` over `registry` (settings from `server_env`, plus `env`),
    ready; stopped and the registry closed on exit."""
    port = free_port()
    environ = server_env(home, port, **env)
    log = home / "server.log"
    proc = start_server(model, environ, log)
    try:
        yield Served(url=f"http://127.0.0.1:{port}", home=home, env=environ, registry=registry,
                     proc=proc, log=log)
    finally:
        stop_server(proc)
        registry.close()


@pytest.fixture(scope="session")
def served(toy_model_dir, test_loras, tmp_path_factory) -> Served:
    home = tmp_path_factory.mktemp("served-home")
    registry = toy_registry(home, toy_model_dir)
    for name, path in test_loras.items():
        registry.push(path, name, base="toy")
    # Automatic pins on, over a short window: every test on this server (the churn test among
    # them) also runs while pins are made and released under its traffic.
    with serving(toy_model_dir, home, registry, LORAPLEX_AUTO_PIN="2",
                 LORAPLEX_AUTO_PIN_WINDOW="40") as s:
        yield s


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
