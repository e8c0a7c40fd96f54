"""An adapter trained on the bundled toy tool-use data calls tools through `loraplex serve`, end to
end, with the official `openai` client and tool_choice auto (nothing constrains the output: the
calls are the adapter's own text, parsed by vLLM's hermes parser for its registered tool format).

The adapter is tests/trainer/test_tool_use.py's (TOOL_RECIPE on trainer/data/tools.openai.jsonl),
trained once and cached under pytest's cache dir; it is pushed with tool_format hermes and the
hermes template, next to a copy whose LoRA B matrices are zero: the base's weights behind the
same prompt, the control that shows the calls come from the training. The answers are printed for
the record (`-s`).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.server.conftest import Served, serving, toy_registry
from tests.trainer.test_tool_use import held_out_tool_questions, trained_tool_adapter

# The first test may train the adapter: about 4 minutes on an idle 2-core CPU (200 s of training),
# far more on a busy one (28 minutes at a load average of 10).
pytestmark = [pytest.mark.engine, pytest.mark.timeout(5400)]

HERMES = Path(__file__).resolve().parents[2] / "adapters" / "templates" / "hermes.jinja"
NAME, ZERO = "weather", "weather-zero"


def zeroed(adapter: Path, out: Path) -> Path:
    """A copy of `adapter` whose LoRA B matrices are zero: it changes nothing in the base."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()},
              str(out / "adapter_model.safetensors"))
    return out


@pytest.fixture(scope="module")
def adapter(toy_model_dir, request) -> Path:
    return trained_tool_adapter(toy_model_dir, Path(request.config.cache.mkdir("tool-adapter")))


@pytest.fixture(scope="module")
def server(toy_model_dir, adapter, tmp_path_factory) -> Served:
    home = tmp_path_factory.mktemp("tool-adapter-home")
    registry = toy_registry(home, toy_model_dir)
    for name, d in ((NAME, adapter), (ZERO, zeroed(adapter, home / "zero"))):
        pushed = registry.push(d, name, base="toy", tool_format="hermes", chat_template=HERMES)
        assert pushed.version.tool_format == "hermes"
    # The hermes system prompt with two tools is ~700 tokens of the toy tokenizer; the base
    # parses hermes too (it answers with its own ChatML template, which ignores tools).
    with serving(toy_model_dir, home, registry, LORAPLEX_MAX_MODEL_LEN="1024",
                 LORAPLEX_MAX_LORA_RANK="16", LORAPLEX_TOOL_FORMAT="hermes") as served:
        yield served


@pytest.fixture(scope="module")
def questions() -> dict[str, list]:
    return held_out_tool_questions()


def ask(client, messages, tools, model=NAME, **kw):
    kw.setdefault("max_tokens", 140)  # two calls are ~120 tokens
    return client.chat.completions.create(model=model, messages=messages, tools=tools,
                                          temperature=0, **kw)


def calls_of(choice) -> list[tuple[str, dict]]:
    return [(t.function.name, json.loads(t.function.arguments))
            for t in choice.message.tool_calls or []]


class Reassembled:
    """The tool calls of a streamed answer, put together from its `delta.tool_calls` chunks as
    a client does (id and name once, arguments in fragments), and its finish reason."""

    def __init__(self) -> None:
        self.parts: dict[int, dict] = {}
        self.finish: str | None = None

    def add(self, chunk) -> None:
        for ch in chunk.choices:
            self.finish = ch.finish_reason or self.finish
            for d in ch.delta.tool_calls or []:
                cur = self.parts.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                cur["id"] = cur["id"] or d.id
                if d.function:
                    cur["name"] += d.function.name or ""
                    cur["arguments"] += d.function.arguments or ""

    def calls(self) -> list[tuple[str, dict]]:
        return [(v["name"], json.loads(v["arguments"])) for _, v in sorted(self.parts.items())]


def test_auto_answers_held_out_weather_questions_with_parsed_tool_calls(server, questions):
    c = server.client()
    right = 0
    print()
    for msgs, tools, want in questions["weather"]:
        ch = ask(c, msgs, tools, tool_choice="auto").choices[0]
        got = calls_of(ch)
        print(f"  {msgs[-1]['content']!r} -> {got} (finish {ch.finish_reason})")
        assert ch.finish_reason == "tool_calls", ch
        assert [n for n, _ in got] == ["get_weather"] and set(got[0][1]) == {"city"}, ch
        assert ch.message.tool_calls[0].id and ch.message.tool_calls[0].type == "function"
        assert not ch.message.content  # the call is parsed out of the text, none is left
        right += got == want
    print(f"held-out weather questions: {len(questions['weather'])} answered with a parsed "
          f"get_weather call; right town {right}")


def test_streamed_auto_calls_reassemble_to_the_non_streamed_ones(server, questions):
    c = server.client()
    for msgs, tools, _ in questions["weather"][:2] + questions["two"][:1]:
        whole = calls_of(ask(c, msgs, tools, tool_choice="auto").choices[0])
        got = Reassembled()
        for chunk in ask(c, msgs, tools, tool_choice="auto", stream=True):
            got.add(chunk)
        streamed = got.calls()
        print(f"\n  streamed {msgs[-1]['content']!r} -> {streamed}")
        assert got.finish == "tool_calls"
        assert streamed == whole and whole
        assert all(v["id"] for v in got.parts.values())


def test_two_towns_make_parallel_calls_and_parallel_tool_calls_false_keeps_one(server, questions):
    c = server.client()
    right = 0
    print()
    for msgs, tools, want in questions["two"]:
        ch = ask(c, msgs, tools, tool_choice="auto").choices[0]  # parallel_tool_calls default
        got = calls_of(ch)
        print(f"  {msgs[-1]['content']!r} -> {got}")
        assert ch.finish_reason == "tool_calls"
        assert [n for n, _ in got] == ["get_weather"] * 2, ch
        assert len({t.id for t in ch.message.tool_calls}) == 2
        right += got == want
        # parallel_tool_calls false under auto: the server keeps the first call (as vLLM's
        # server: nothing constrains auto output, the parsed calls are cut to one)
        one = ask(c, msgs, tools, tool_choice="auto", parallel_tool_calls=False).choices[0]
        assert calls_of(one) == got[:1] and one.finish_reason == "tool_calls"
        streamed = {d.index for chunk in ask(c, msgs, tools, tool_choice="auto", stream=True,
                                             parallel_tool_calls=False)
                    for ch in chunk.choices for d in ch.delta.tool_calls or []}
        assert streamed == {0}
    print(f"held-out two-town questions: {len(questions['two'])} answered with two parallel "
          f"get_weather calls; both towns right {right}")


def test_the_follow_up_turn_gets_a_text_answer(server, questions):
    c = server.client()
    print()
    for msgs, tools, _ in questions["weather"][:2] + questions["two"][:1]:
        ch = ask(c, msgs, tools, tool_choice="auto").choices[0]
        follow = msgs + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": t.id, "type": "function",
                 "function": {"name": t.function.name, "arguments": t.function.arguments}}
                for t in ch.message.tool_calls]}]
        follow += [{"role": "tool", "tool_call_id": t.id,
                    "content": json.dumps({**json.loads(t.function.arguments), "sky": "gray"})}
                   for t in ch.message.tool_calls]
        r = ask(c, follow, tools, tool_choice="auto", max_tokens=40).choices[0]
        print(f"  {msgs[-1]['content']!r} -> {calls_of(ch)} -> results -> "
              f"{r.message.content!r} (finish {r.finish_reason})")
        assert r.finish_reason == "stop" and not r.message.tool_calls
        assert r.message.content and r.message.content.strip()


def test_the_base_never_calls_a_tool(server, questions):
    c = server.client()
    asked = [q for qs in questions.values() for q in qs]
    print()
    for model in (ZERO, "toy"):  # the base's weights behind the adapter's prompt; the base
        answers = []
        for msgs, tools, _ in asked:
            ch = ask(c, msgs, tools, model=model, tool_choice="auto", max_tokens=60).choices[0]
            assert not ch.message.tool_calls and ch.finish_reason in ("stop", "length"), ch
            answers.append(ch.message.content)
        print(f"  {model}: no tool call in {len(asked)} answers; e.g. "
              f"{asked[0][0][-1]['content']!r} -> {answers[0]!r}")


def test_async_streamed_parallel_calls_equal_the_sync_ones(server, questions):
    """Every two-town question at once through AsyncOpenAI, streamed: the reassembled deltas of
    each equal its non-streamed answer (one batch in the engine; the calls still parse apart)."""
    c, ac = server.client(), server.async_client()
    qs = questions["two"]
    whole = [calls_of(ask(c, m, t, tool_choice="auto").choices[0]) for m, t, _ in qs]

    async def one(msgs, tools):
        got = Reassembled()
        stream = await ac.chat.completions.create(
            model=NAME, messages=msgs, tools=tools, temperature=0, max_tokens=140,
            tool_choice="auto", stream=True)
        async for chunk in stream:
            got.add(chunk)
        return got.finish, got.calls()

    async def all_of_them():
        return await asyncio.gather(*(one(m, t) for m, t, _ in qs))

    for (finish, streamed), w in zip(asyncio.run(all_of_them()), whole):
        assert finish == "tool_calls" and streamed == w and len(w) == 2


def test_the_calls_are_what_transformers_generates(server, adapter, questions, toy_model_dir):
    """The reference: transformers + PEFT, greedy, on the prompt the server renders (the hermes
    template with the tools); its text parsed as vLLM's hermes parser does equals the server's
    `tool_calls` for every held-out weather and two-town question."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.adapters import chat
    from tests.trainer.test_tool_use import greedy, parse_hermes

    tok = chat.load_tokenizer(toy_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(toy_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    c = server.client()
    asked = questions["weather"] + questions["two"]
    reference = greedy(model, tok, [(m, t) for m, t, _ in asked])
    for (msgs, tools, _), text in zip(asked, reference):
        want = [(x["name"], x["arguments"]) for x in parse_hermes(text)]
        assert calls_of(ask(c, msgs, tools, tool_choice="auto").choices[0]) == want, text
