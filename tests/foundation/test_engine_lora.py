"""The real vLLM CPU engine serves the toy model with two LoRA adapters batched together.

This is the engine-level promise the server builds on: requests for different adapters share
one batch, and each gets exactly what that adapter gives when served alone.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(toy_model_dir):
    from vllm import LLM

    engine = LLM(
        model=str(toy_model_dir), enable_lora=True, max_loras=2, max_lora_rank=8,
        dtype="float32",  # vLLM's CPU default is bf16; fp32 keeps greedy ties away
        gpu_memory_utilization=0.1, max_model_len=512, enforce_eager=True, seed=0,
    )
    yield engine
    del engine


def _prompt(toy_model_dir, question: str) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


def test_two_adapters_in_one_batch_match_each_alone(llm, toy_model_dir, test_loras, task_prompts):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    loras = {task: LoRARequest(task, i + 1, str(path)) for i, (task, path) in enumerate(test_loras.items())}
    questions = [q for q, _ in task_prompts("upper", 4, seed=99)]

    # Interleave: base, upper, reverse, base, upper, reverse, ... in one generate() call.
    jobs = [(q, name) for q in questions for name in (None, "upper", "reverse")]
    prompts = [_prompt(toy_model_dir, q) for q, _ in jobs]
    batched = llm.generate(prompts, greedy, lora_request=[loras[n] if n else None for _, n in jobs])
    batched_text = [o.outputs[0].text for o in batched]

    for (q, name), prompt, got in zip(jobs, prompts, batched_text):
        alone = llm.generate([prompt], greedy, lora_request=loras[name] if name else None)
        assert got == alone[0].outputs[0].text, f"{name or 'base'} on {q!r}: batched != alone"

    by = {name: [t for (_, n), t in zip(jobs, batched_text) if n == name] for name in (None, "upper", "reverse")}
    assert by["upper"] != by[None] and by["reverse"] != by[None] and by["upper"] != by["reverse"]
    # The adapters moved the model the way they were tuned: `upper` answers in capitals.
    assert all(a.strip() and a.strip() == a.strip().upper() for a in by["upper"]), by["upper"]
