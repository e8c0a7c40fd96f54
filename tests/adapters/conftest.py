"""Fixtures for the registry tests: a tiny base model, PEFT adapters, and real servers.

- tiny bases are built in code (transformers LlamaConfig, a `tokenizers` BPE tokenizer); nothing
  is downloaded. torch/transformers/peft are imported only inside these fixtures.
- PostgreSQL and S3 (`pg_server`, `pg_url`, `s3_server`, `s3_url`): real servers from the shared
  plugin tests/services.py; each test gets its own fresh database and bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
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

