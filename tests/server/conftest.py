"""A real `loraplex serve` (vLLM CPU engine, uvicorn, real HTTP) over a temp registry.

One server per test session (engine start-up costs tens of seconds): the toy base registered,
two quick PEFT adapters (`upper`, `reverse`) pushed before start. Tests that push more use
unique names, so they do not disturb each other's expectations.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loraplex.adapters.registry import Registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def server_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LORAPLEX_HOME=str(home), LORAPLEX_PORT=str(port), LORAPLEX_HOST="127.0.0.1",
        LORAPLEX_SERVED_MODEL_NAME="toy", LORAPLEX_BASE_NAME="toy",
        LORAPLEX_DTYPE="float32",  # vLLM's CPU default is bf16: fp32 keeps greedy ties away
        LORAPLEX_MAX_LORAS="2", LORAPLEX_MAX_LORA_RANK="8", LORAPLEX_MAX_CPU_LORAS="8",
        LORAPLEX_MAX_MODEL_LEN="512", LORAPLEX_GPU_MEMORY_UTILIZATION="0.1",
        LORAPLEX_CPU_KVCACHE_SPACE_GIB="1", LORAPLEX_ENFORCE_EAGER="true",
        LORAPLEX_POLL_INTERVAL_S="1.0", LORAPLEX_API_KEYS="test-key",
        LORAPLEX_ADMIN_KEY="admin-secret", VLLM_ENABLE_V1_MULTIPROCESSING="0",
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env


def start_server(model: Path, env: dict[str, str], log: Path, timeout: float = 240) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex.adapters.cli", "serve", "--model", str(model)],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{env['LORAPLEX_PORT']}/ready"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout}s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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
