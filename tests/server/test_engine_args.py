"""`loraplex serve` settings -> vLLM's AsyncEngineArgs, without starting an engine.

The typed engine settings and `--engine-arg KEY=VALUE` / LORAPLEX_ENGINE_ARGS reach the real
AsyncEngineArgs dataclass of the installed vLLM; an unknown key fails at start, naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from loraplex.adapters.errors import ConfigError
from loraplex.server.settings import ENGINE_FIELDS, ServerSettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith("LORAPLEX_")]:
        monkeypatch.delenv(k)


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("vllm")
    from loraplex.server import engine

    return engine


def parse(argv: list[str]) -> ServerSettings:
    """What `loraplex serve ARGV` builds as its settings (the real parser, no server)."""
    from loraplex.server import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return cli.settings_from_args(parser.parse_args(["serve", *argv]))


def test_engine_fields_are_vllm_engine_args(engine):
    names = engine.engine_arg_names()
    assert set(ENGINE_FIELDS) <= names, set(ENGINE_FIELDS) - names
    assert set(ENGINE_FIELDS) <= set(ServerSettings.model_fields)


def test_typed_flags_and_engine_arg_reach_async_engine_args(engine, toy_model_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs

    s = parse([
        "--model", str(toy_model_dir), "--served-model-name", "toy",
        "--pipeline-parallel-size", "2", "--quantization", "fp8", "--kv-cache-dtype", "fp8",
        "--max-num-batched-tokens", "4096", "--enable-chunked-prefill",
        "--no-enable-prefix-caching", "--distributed-executor-backend", "mp",
        "--trust-remote-code", "--max-loras", "3",
        "--engine-arg", "block_size=32", "--engine-arg", "lora-dtype=bfloat16",
        "--engine-arg", 'hf_overrides={"rope_theta": 20000}', "--engine-arg", "async_scheduling=false",
    ])
    args = engine.build_engine_args(s)
    assert isinstance(args, AsyncEngineArgs)
    assert args.model == str(toy_model_dir) and args.served_model_name == ["toy"]
    assert (args.pipeline_parallel_size, args.quantization, args.kv_cache_dtype) == (2, "fp8", "fp8")
    assert args.max_num_batched_tokens == 4096 and args.enable_chunked_prefill is True
    assert args.enable_prefix_caching is False
    assert args.distributed_executor_backend == "mp" and args.trust_remote_code is True
    assert args.max_loras == 3 and args.enable_lora is True and args.disable_log_stats is False
    # --engine-arg values: JSON when they parse (numbers, booleans, objects), else strings
    assert args.block_size == 32 and args.lora_dtype == "bfloat16"
    assert args.hf_overrides == {"rope_theta": 20000} and args.async_scheduling is False


def test_engine_arg_tensor_parallel_size(engine, toy_model_dir):
    s = parse(["--model", str(toy_model_dir), "--engine-arg", "data_parallel_size=2",
               "--tensor-parallel-size", "2"])
    args = engine.build_engine_args(s)
    assert args.tensor_parallel_size == 2 and args.data_parallel_size == 2
    # a typed setting cannot also be given as an engine arg: one place per option
    with pytest.raises(ConfigError, match="--tensor-parallel-size"):
        engine.build_engine_args(parse(["--model", str(toy_model_dir),
                                        "--engine-arg", "tensor_parallel_size=2"]))


def test_defaults_come_from_vllm_and_the_model(engine, toy_model_dir):
    """Unset optional settings are not passed, so vLLM's defaults (from the model) apply."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs = engine.engine_kwargs(ServerSettings(model=str(toy_model_dir)))
    for f in ("max_model_len", "quantization", "kv_cache_dtype", "max_num_batched_tokens",
              "enable_chunked_prefill", "distributed_executor_backend"):
        assert f not in kwargs, f
    args = engine.build_engine_args(ServerSettings(model=str(toy_model_dir)))
    defaults = AsyncEngineArgs(model=str(toy_model_dir))
    assert args.max_model_len is None and args.kv_cache_dtype == defaults.kv_cache_dtype
    assert args.tensor_parallel_size == 1


def test_env_json_object_and_flags_merge(engine, toy_model_dir, monkeypatch):
    monkeypatch.setenv("LORAPLEX_ENGINE_ARGS", json.dumps({"block_size": 16, "cpu_offload_gb": 4}))
    monkeypatch.setenv("LORAPLEX_TENSOR_PARALLEL_SIZE", "4")
    monkeypatch.setenv("LORAPLEX_ENABLE_CHUNKED_PREFILL", "false")
    s = parse(["--model", str(toy_model_dir), "--engine-arg", "block_size=32"])
    assert s.engine_args == {"block_size": 32, "cpu_offload_gb": 4}  # a flag wins per key
    args = engine.build_engine_args(s)
    assert (args.block_size, args.cpu_offload_gb, args.tensor_parallel_size) == (32, 4, 4)
    assert args.enable_chunked_prefill is False
    monkeypatch.setenv("LORAPLEX_ENGINE_ARGS", "")
    assert parse([]).engine_args == {}


@pytest.mark.parametrize("bad, says", [
    ("{not json", "not JSON"),
    ("[1, 2]", "JSON object"),
])
def test_bad_engine_args_env(monkeypatch, bad, says):
    monkeypatch.setenv("LORAPLEX_ENGINE_ARGS", bad)
    with pytest.raises(ConfigError, match=says) as exc:
        parse([])
    assert "LORAPLEX_ENGINE_ARGS" in exc.value.message


def test_engine_arg_flag_needs_key_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse(["--engine-arg", "block_size"])


def test_unknown_key_names_it_and_close_matches(engine, toy_model_dir):
    s = ServerSettings(model=str(toy_model_dir),
                       engine_args={"bogus": 1, "gpu_memory_utilisation": 0.5, "model": "x"})
    with pytest.raises(ConfigError) as exc:
        engine.build_engine_args(s)
    msg = exc.value.message
    assert "'bogus' is not a field of vLLM" in msg
    assert "'gpu_memory_utilisation'" in msg and "--gpu-memory-utilization" in msg  # close match
    assert "'model' is set by loraplex" in msg
    # the engine refuses at construction, before anything starts
    with pytest.raises(ConfigError, match="bogus"):
        engine.VllmEngine(ServerSettings(model=str(toy_model_dir), engine_args={"bogus": 1}))


def test_cli_unknown_engine_arg_exits_before_the_engine_starts(toy_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env.update(LORAPLEX_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "loraplex.adapters.cli", "serve", "--model",
                        str(toy_model_dir), "--engine-arg", "bogus=1", "--port", "0"],
                       env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stderr[-2000:]
    assert "'bogus'" in p.stderr and "EngineArgs" in p.stderr
    assert "Traceback" not in p.stderr
    assert took < 60, took  # importing vLLM only; no model load, no engine


def test_max_model_len_defaults_to_the_model():
    """The toy model has 1,024 positions: no constant default may exceed it."""
    assert ServerSettings.model_fields["max_model_len"].default is None
