"""Session-wide test setup: offline hub, a quiet vLLM, and the shared toy base model.

The toy model takes a minute or two to pre-train, so it is built once and cached in pytest's
cache directory under a digest of its spec, corpus and builder code (a changed builder builds
a new one). A fresh clone (CI) builds it once per run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.services"]  # real PostgreSQL and S3 servers for any test area

# Set before anything imports transformers/vllm: nothing may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def toy_model_dir(request: pytest.FixtureRequest) -> Path:
    """The pre-trained toy base model (see loraplex.trainer.toy), built once and cached."""
    from filelock import FileLock

    from loraplex.trainer.toy import ToySpec, build_toy_model, spec_digest

    spec = ToySpec()
    root = Path(request.config.cache.mkdir("toy-model"))
    out = root / spec_digest(spec)
    # A lock, so parallel pytest processes build it once.
    with FileLock(str(root / "build.lock")):
        if not (out / "loraplex_toy.json").exists():
            tmp = root / (out.name + ".partial")
            build_toy_model(tmp, spec)
            tmp.rename(out)
    return out


# Deterministic toy tasks for quick test adapters: the answer is a function of the question,
# so a briefly tuned adapter is confident and its greedy output is stable across batches.
_WORDS = "cat dog bird fish apple pear plum grape red blue green book cup lamp park lake".split()
TASKS = {
    "upper": lambda words: " ".join(w.upper() for w in words),
    "reverse": lambda words: " ".join(reversed(words)),
}


def task_examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    import random

    r = random.Random(seed)
    out = []
    for _ in range(n):
        words = r.sample(_WORDS, r.randint(2, 4))
        out.append((" ".join(words), TASKS[task](words)))
    return out


def train_test_lora(base_dir: Path, out_dir: Path, task: str, *, rank: int = 8, steps: int = 60, lr: float = 5e-3,
                    seed: int = 0) -> Path:
    """A small PEFT LoRA tuned on `task` with a plain loop (the trainer has its own tests)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ))
    rows = []
    for q, a in task_examples(task, 64, seed):
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        a_ids = tok(a + "<|im_end|>", add_special_tokens=False).input_ids
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        batch = [rows[(step * 8 + i) % len(rows)] for i in range(8)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(x) for x, _ in batch])[:, None])
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def test_loras(toy_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two quick adapters on the toy model: `upper` (shout the words) and `reverse` (reverse them)."""
    root = tmp_path_factory.mktemp("loras")
    return {task: train_test_lora(toy_model_dir, root / task, task) for task in TASKS}


@pytest.fixture(scope="session")
def one_step_lora(toy_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One optimizer step of `upper`: a valid adapter file in seconds, for tests whose
    adapter's outputs do not matter (routing, auth, validation, rendering)."""
    return train_test_lora(toy_model_dir, tmp_path_factory.mktemp("lora") / "a", "upper", steps=1)


@pytest.fixture(scope="session")
def lora_trainer():
    """`lora_trainer(base_dir, out_dir, task, rank=8, steps=60)` -> a quick PEFT adapter dir."""
    return train_test_lora


@pytest.fixture(scope="session")
def task_prompts():
    """`task_prompts(task, n, seed)` -> [(question, expected answer)] for the test adapters."""
    return task_examples
