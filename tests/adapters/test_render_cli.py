"""`loraplex render`: JSON lines in, the prompt text and token ids (and training labels) out.

Most tests call the command in-process (the tokenizer loads once); the ones about what a
script sees (stdout holds only JSON lines, exit statuses) run it as a real subprocess.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from loraplex.adapters import cli
from loraplex.adapters.chat import IGNORE_INDEX, builtin_template

HI = [{"role": "user", "content": "cat dog"}]
CONVERSATIONS = [
    HI,
    [{"role": "system", "content": "Answer in capitals."}, {"role": "user", "content": "red cup"},
     {"role": "assistant", "content": "RED CUP"}, {"role": "user", "content": "blue lamp"}],
    [{"role": "user", "content": "héllo – ünïcode"}],
]
TRAIN = [{"role": "user", "content": "cat dog"}, {"role": "assistant", "content": "dog cat"},
         {"role": "user", "content": "red cup"}, {"role": "assistant", "content": "cup red"}]

# ChatML that refuses system messages, as some model templates do.
NO_SYSTEM = (
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}"
    "{{ raise_exception('System role not supported') }}{%- endif -%}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor -%}\n"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{% endif -%}\n"
)


def line(messages, **kw) -> str:
    return json.dumps({"messages": messages, **kw})


def render_cli(monkeypatch, capsys, args: list[str], stdin: str = "") -> list[dict]:
    """Run `loraplex render ARGS` in-process with `stdin`; the JSON lines it wrote."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    assert cli.main(["render", *args]) == 0
    out = capsys.readouterr().out
    return [json.loads(x) for x in out.splitlines()]


def run_subprocess(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraplex.adapters.cli", "render", *args],
                          input=stdin, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def hf_tokenizer(toy_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_model_dir)


def hf_ids(tok, messages, add_generation_prompt=True, chat_template=None) -> list[int]:
    ids = tok.apply_chat_template(messages, tokenize=True, chat_template=chat_template,
                                  add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_stdin_gives_only_json_lines_with_transformers_ids(toy_model_dir, hf_tokenizer):
    """Read from stdin by default; stdout is one JSON line per input line and nothing else;
    the ids are transformers' apply_chat_template(tokenize=True) ids for the toy."""
    lines = [line(m) for m in CONVERSATIONS] + [line(TRAIN, add_generation_prompt=False)]
    r = run_subprocess(["--model", str(toy_model_dir)], "\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    out = [json.loads(x) for x in r.stdout.splitlines()]  # every stdout line is JSON
    assert len(out) == len(lines)
    for got, msgs in zip(out, CONVERSATIONS):
        assert set(got) == {"text", "token_ids", "stop_tokens"}
        assert got["text"] == hf_tokenizer.apply_chat_template(msgs, tokenize=False,
                                                               add_generation_prompt=True)
        assert got["token_ids"] == hf_ids(hf_tokenizer, msgs)
        assert got["stop_tokens"] == ["<|im_end|>"]
    assert out[-1]["token_ids"] == hf_ids(hf_tokenizer, TRAIN, add_generation_prompt=False)
    assert not out[-1]["text"].endswith("<|im_start|>assistant\n")


def test_input_file_and_train_labels(toy_model_dir, hf_tokenizer, tmp_path, monkeypatch, capsys):
    data = tmp_path / "conv.jsonl"
    data.write_text(line(TRAIN) + "\n" + line(HI) + "\n")
    out = render_cli(monkeypatch, capsys, ["--model", str(toy_model_dir), "--train",
                                           "--input", str(data)])
    assert len(out) == 2
    t = out[0]
    assert set(t) == {"text", "token_ids", "labels", "stop_tokens"}
    assert t["token_ids"] == hf_ids(hf_tokenizer, TRAIN, add_generation_prompt=False)
    assert len(t["labels"]) == len(t["token_ids"])
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(t["labels"], t["token_ids"]))
    # The loss is on the assistant turns (content and end-of-turn token), nothing else.
    learned = [i for i, lab in zip(t["token_ids"], t["labels"]) if lab != IGNORE_INDEX]
    assert hf_tokenizer.decode(learned) == "dog cat<|im_end|>cup red<|im_end|>"
    assert t["labels"][0] == IGNORE_INDEX
    # A conversation with nothing to learn is refused for training, and the run goes on.
    assert out[1]["error"]["type"] == "invalid_request_error"
    assert "assistant" in out[1]["error"]["message"]
    # Without --train there are no labels.
    out = render_cli(monkeypatch, capsys, ["--model", str(toy_model_dir), "--input", str(data)])
    assert "labels" not in out[0] and "labels" not in out[1]


def test_refused_and_malformed_lines_get_error_lines_and_the_run_goes_on(toy_model_dir, tmp_path):
    tpl = tmp_path / "no_system.jinja"
    tpl.write_text(NO_SYSTEM)
    lines = [
        line([{"role": "system", "content": "be brief"}, *HI]),  # the template refuses it
        line(HI),
        '{"messages": [',                                       # bad JSON
        "",                                                      # blank
        "[1, 2]",                                                # not an object
        json.dumps({"messages": HI, "add_generation_prompt": "yes"}),
        line(HI, add_generation_prompt=False),
    ]
    r = run_subprocess(["--model", str(toy_model_dir), "--chat-template", str(tpl)],
                       "\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(out) == len(lines)
    refused, ok, bad_json, blank, not_obj, bad_flag, no_prompt = out
    assert set(refused) == {"error"}
    assert "System role not supported" in refused["error"]["message"]
    assert refused["error"]["type"] == "invalid_request_error"
    assert ok["text"] == "<|im_start|>user\ncat dog<|im_end|>\n<|im_start|>assistant\n"
    assert "invalid JSON" in bad_json["error"]["message"] and "line 3" in bad_json["error"]["message"]
    assert "empty line" in blank["error"]["message"]
    assert "messages" in not_obj["error"]["message"]
    assert "add_generation_prompt" in bad_flag["error"]["message"]
    assert no_prompt["text"] == "<|im_start|>user\ncat dog<|im_end|>\n"
    assert all(set(e["error"]) >= {"message", "type"}
               for e in (refused, bad_json, blank, not_obj, bad_flag))


def test_chat_template_builtin_file_and_adapter_dir(toy_model_dir, hf_tokenizer, tmp_path,
                                                   monkeypatch, capsys):
    msgs = CONVERSATIONS[1]
    base = ["--model", str(toy_model_dir)]
    (llama2,) = render_cli(monkeypatch, capsys, [*base, "--chat-template", "llama2"], line(msgs))
    assert llama2["text"].startswith("<|endoftext|>[INST] <<SYS>>\nAnswer in capitals.")
    assert llama2["token_ids"] == hf_ids(hf_tokenizer, msgs,
                                         chat_template=builtin_template("llama2"))
    # An adapter directory brings its own template (as the registry reads it on push).
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "chat_template.jinja").write_text(builtin_template("alpaca"))
    (alpaca,) = render_cli(monkeypatch, capsys, [*base, "--chat-template", "alpaca"], line(msgs))
    (from_dir,) = render_cli(monkeypatch, capsys, [*base, "--chat-template", str(adapter)],
                             line(msgs))
    assert from_dir == alpaca and alpaca["text"] != llama2["text"]
    # The same template as a .jinja file.
    (from_file,) = render_cli(monkeypatch, capsys, [*base, "--chat-template",
                                                    str(adapter / "chat_template.jinja")],
                              line(msgs))
    assert from_file == alpaca


def test_setup_errors_exit_2_with_nothing_on_stdout(toy_model_dir, tmp_path, monkeypatch, capsys):
    cases = [
        ["--model", str(tmp_path / "missing")],
        ["--model", str(toy_model_dir), "--chat-template", "no-such-template"],
        ["--model", str(toy_model_dir), "--chat-template", str(tmp_path)],  # dir, no template
        ["--model", str(toy_model_dir), "--input", str(tmp_path / "missing.jsonl")],
    ]
    for args in cases:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((line(HI) + "\n").encode())))
        assert cli.main(["render", *args]) == 2, args
        r = capsys.readouterr()
        assert r.out == "" and r.err.startswith("error: "), (args, r.err)


def test_server_render_gives_the_cli_ids(toy_model_dir, one_step_lora, tmp_path, monkeypatch,
                                         capsys):
    """/v1/render (the server's prompt for a request) and `loraplex render` agree, for the base
    model's template and for an adapter that brings its own."""
    from fastapi.testclient import TestClient

    from loraplex.adapters.registry import Registry
    from loraplex.server.app import create_app
    from loraplex.server.settings import ServerSettings
    from tests.server.test_app_unit import FakeEngine  # vLLM stand-in; rendering is real

    adapter = tmp_path / "llama"
    shutil.copytree(one_step_lora, adapter)
    (adapter / "chat_template.jinja").write_text(builtin_template("llama2"))
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "art"))
    registry.register_base("toy", toy_model_dir)
    registry.push(adapter, "llama", base="toy")
    settings = ServerSettings(home=tmp_path, model=toy_model_dir, served_model_name="toy",
                              max_lora_rank=8)

    requests = [(m, agp) for m in CONVERSATIONS for agp in (True, False)]
    stdin = "".join(line(m, add_generation_prompt=agp) + "\n" for m, agp in requests)
    base = ["--model", str(toy_model_dir)]
    cli_ids = {
        "toy": [o["token_ids"] for o in render_cli(monkeypatch, capsys, base, stdin)],
        "llama": [o["token_ids"] for o in render_cli(
            monkeypatch, capsys, [*base, "--chat-template", str(adapter)], stdin)],
    }
    with TestClient(create_app(settings, FakeEngine(), registry=registry)) as client:
        for model, want in cli_ids.items():
            got = []
            for m, agp in requests:
                r = client.post("/v1/render", json={"model": model, "messages": m,
                                                    "add_generation_prompt": agp})
                assert r.status_code == 200, r.text
                got.append(r.json()["token_ids"])
            assert got == want, model
        # A conversation the adapter's template refuses: a 400 with the template's own words.
        r = client.post("/v1/chat/completions", json={"model": "llama", "messages": [
            {"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]})
        assert r.status_code == 400, r.text
        assert "a system message is only allowed first" in r.json()["error"]["message"]
    assert cli_ids["toy"] != cli_ids["llama"]
    registry.close()
