"""The shared rendering contract (loraplex.adapters.chat) on the toy tokenizer."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from loraplex.adapters.chat import (
    IGNORE_INDEX,
    ChatTokenizer,
    builtin_template,
    load_tokenizer,
    render,
    render_for_training,
    resolve_template,
    validate_messages,
)
from loraplex.adapters.errors import BadRequest, ConfigError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Spell cat."},
    {"role": "assistant", "content": "c a t"},
    {"role": "user", "content": "Spell dog."},
    {"role": "assistant", "content": "d o g"},
]
BUILTINS = ["chatml", "llama2", "alpaca"]
# No special token after the content, and a generation prompt ending in a space: the case where
# tokenizing the whole text merges " " + "cat" across the prompt/answer boundary.
PLAIN = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant: {% endif %}")


def labelled_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def hf_ids(hf, msgs, tpl, agp):
    out = hf.apply_chat_template(msgs, chat_template=tpl, tokenize=True, return_dict=False,
                                 add_generation_prompt=agp)
    return list(out)


@pytest.mark.parametrize("name", BUILTINS)
def test_render_matches_transformers_apply_chat_template(name, toy_model_dir, toy_tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(toy_model_dir))
    tpl = builtin_template(name)
    for msgs, agp in ((CONV, False), (CONV[:4], True), (CONV[1:2], True)):
        ours = render(tpl, msgs, toy_tok, add_generation_prompt=agp)
        theirs = hf.apply_chat_template(msgs, chat_template=tpl, tokenize=False,
                                        add_generation_prompt=agp)
        assert ours.text == theirs
        assert ours.token_ids == hf_ids(hf, msgs, tpl, agp)


def test_base_template_is_the_tokenizers_own(toy_model_dir, toy_tok):
    from transformers import AutoTokenizer

    tpl = resolve_template(None, toy_model_dir)
    assert tpl == builtin_template("chatml")  # the toy base ships ChatML
    hf = AutoTokenizer.from_pretrained(str(toy_model_dir))
    assert render(tpl, CONV[:4], toy_tok).token_ids == hf_ids(hf, CONV[:4], None, True)


def test_resolve_template_file_and_errors(tmp_path: Path):
    f = tmp_path / "t.jinja"
    f.write_text(PLAIN)
    assert resolve_template(str(f)) == PLAIN
    assert resolve_template("llama2") == builtin_template("llama2")
    with pytest.raises(BadRequest, match="neither a built-in"):
        resolve_template("chatml2")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no chat template"):
        resolve_template(None, tmp_path)


@pytest.mark.parametrize("name", BUILTINS)
def test_special_tokens_map_to_single_ids(name, toy_tok):
    r = render(builtin_template(name), CONV, toy_tok, add_generation_prompt=False)
    eot = toy_tok.token_to_id("<|im_end|>")
    assert r.token_ids.count(eot) >= 2  # one per assistant turn at least, as ONE id each


@pytest.mark.parametrize("name", BUILTINS)
def test_labels_are_exactly_the_assistant_turns(name, toy_tok):
    t = render_for_training(builtin_template(name), CONV, toy_tok)
    ids, labels = t.token_ids, t.labels
    assert len(ids) == len(labels) and t.cuts == 0
    text = labelled_text(toy_tok, ids, labels)
    # Every assistant turn, each with its end-of-turn token; no prompt text.
    assert text.replace(" ", "") == "cat<|im_end|>dog<|im_end|>"
    assert "Spell" not in text and "brief" not in text
    # The labelled tokens are exactly those of the labelled character spans.
    assert "".join(t.text[a:b] for a, b in t.spans) == text
    t2 = render_for_training(builtin_template(name), CONV, toy_tok, train_on_inputs=True)
    assert t2.token_ids == ids and t2.labels == ids


@pytest.mark.parametrize("name", BUILTINS + ["plain"])
def test_prompt_ids_are_a_prefix_of_training_ids(name, toy_tok):
    """Parity: what the server renders for the prompt is what the trainer trained on: for every
    answer when nothing was cut, else up to the first cut (after it, the server tokenizes the
    earlier answer as history, whole; docs/rendering.md)."""
    tpl = PLAIN if name == "plain" else builtin_template(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = render_for_training(tpl, CONV, toy_tok)
    ids, labels = t.token_ids, t.labels
    for k in ((2, 4) if t.cuts == 0 else (2,)):  # prompts ending before each assistant turn
        prompt = render(tpl, CONV[:k], toy_tok, add_generation_prompt=True).token_ids
        assert ids[:len(prompt)] == prompt
        assert labels[len(prompt)] != IGNORE_INDEX  # the answer starts right after the prompt
        assert labels[len(prompt) - 1] == IGNORE_INDEX


def test_boundary_rule_cuts_a_merge_across_the_answer_start(toy_tok, toy_model_dir):
    """Whole-text tokenization merges "assistant: " + "cat" into " cat": the trainer cuts there,
    so its prompt ids are the server's; HF's own ids are kept wherever nothing merges."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(toy_model_dir))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cat"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = render_for_training(PLAIN, msgs, toy_tok)
    whole = hf_ids(hf, msgs, PLAIN, False)
    assert t.cuts == 1 and t.token_ids != whole
    prompt = render(PLAIN, msgs[:1], toy_tok).token_ids
    assert prompt == hf_ids(hf, msgs[:1], PLAIN, True)  # serving stays HF-exact
    assert t.token_ids[:len(prompt)] == prompt
    assert labelled_text(toy_tok, t.token_ids, t.labels) == "cat"
    # The text after the cut is the whole-text tokenization again.
    assert toy_tok.decode(t.token_ids) == t.text
    # A template whose boundary does not merge keeps HF's whole-text ids exactly.
    t2 = render_for_training(builtin_template("chatml"), CONV, toy_tok)
    assert t2.cuts == 0 and t2.token_ids == hf_ids(hf, CONV, builtin_template("chatml"), False)


def test_generation_markers_are_the_labels(toy_tok, toy_model_dir):
    """A template with {% generation %} markers: exactly HF's return_assistant_tokens_mask."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(toy_model_dir))
    tpl = builtin_template("chatml").replace(
        "{{ message['content'] }}<|im_end|>",
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}"
        "<|im_end|>{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>{% endif %}")
    assert "generation" in tpl
    t = render_for_training(tpl, CONV, toy_tok)
    out = hf.apply_chat_template(CONV, chat_template=tpl, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    assert t.token_ids == list(out["input_ids"])
    assert [int(lab != IGNORE_INDEX) for lab in t.labels] == list(out["assistant_masks"])


def test_stop_tokens(toy_model_dir, toy_tok):
    assert toy_tok.stop_tokens(builtin_template("chatml")) == ["<|im_end|>"]
    assert toy_tok.stop_tokens(builtin_template("llama2")) == ["<|im_end|>"]  # the toy's eos
    assert toy_tok.stop_token_ids(builtin_template("chatml")) == [toy_tok.token_to_id("<|im_end|>")]
    other = ChatTokenizer(toy_tok.tokenizer, {"bos_token": "<|endoftext|>",
                                              "eos_token": "<|endoftext|>"})
    assert other.stop_tokens(builtin_template("chatml")) == ["<|im_end|>", "<|endoftext|>"]
    assert other.stop_tokens(builtin_template("llama2")) == ["<|endoftext|>"]
    assert other.stop_tokens(builtin_template("alpaca")) == ["<|endoftext|>"]


def test_template_without_end_of_turn_warns(toy_tok):
    with pytest.warns(UserWarning, match="no end-of-turn token"):
        render_for_training(PLAIN + "{# warn-probe #}", CONV[1:3], toy_tok)
    assert toy_tok.stop_tokens(PLAIN) == ["<|im_end|>"]  # falls back to the eos


def test_templates_that_are_not_prefix_stable_are_rendered(toy_tok):
    """Mistral v0.3 folds the system prompt into the LAST user turn; Phi-3 writes its
    end-of-text only without a generation prompt. Both are rendered, and labelled."""
    folds = ("{% for m in messages if m.role != 'system' %}{% if m.role == 'user' %}[U]"
             "{% if loop.last and messages[0].role == 'system' %}{{ messages[0].content }} "
             "{% endif %}{{ m.content }}[/U]{% else %} {{ m.content }}<|im_end|>{% endif %}"
             "{% endfor %}")
    t = render_for_training(folds, CONV, toy_tok)
    assert labelled_text(toy_tok, t.token_ids, t.labels) == " c a t<|im_end|> d o g<|im_end|>"
    assert t.dropped == [0]  # like Mistral v0.3: no system prompt when an assistant turn ends
    assert render(folds, CONV[:4], toy_tok).text.endswith("[U]Be brief. Spell dog.[/U]")
    eot_only_at_end = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>"
                       "\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                       "{% else %}<|endoftext|>{% endif %}")
    t = render_for_training(eot_only_at_end, CONV[1:3], toy_tok)
    assert labelled_text(toy_tok, t.token_ids, t.labels) == "c a t<|im_end|>"
    assert toy_tok.stop_tokens(eot_only_at_end) == ["<|im_end|>"]


def test_template_refusals_name_the_templates_message(toy_tok):
    no_system = ("{% if messages[0].role == 'system' %}"
                 "{{ raise_exception('System role not supported') }}{% endif %}"
                 "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}")
    with pytest.raises(BadRequest, match="System role not supported") as exc:
        render(no_system, CONV, toy_tok)
    assert exc.value.param == "messages" and "sha256:" in exc.value.message
    with pytest.raises(BadRequest, match="empty prompt"):
        render("{% for m in messages if m.role == 'user' %}{{ m.content }}{% endfor %}",
               CONV[:1], toy_tok)


def test_template_errors_and_hf_helpers(toy_tok):
    tpl = ("{% if messages[0].role != 'user' %}{{ raise_exception('user first please') }}{% endif %}"
           "{% generation %}{{ messages | tojson }}{% endgeneration %}{{ strftime_now('%Y') | length }}")
    with pytest.raises(BadRequest, match="user first please"):
        render(tpl, CONV[:1], toy_tok, add_generation_prompt=False)
    r = render(tpl, [{"role": "user", "content": "é"}], toy_tok, add_generation_prompt=False)
    assert r.text == '[{"role": "user", "content": "é"}]4'
    with pytest.raises(BadRequest, match="does not compile"):
        render("{% for %}", CONV, toy_tok)


def test_validate_messages():
    msgs = validate_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                          {"type": "text", "text": "b"}]}])
    assert msgs == [{"role": "user", "content": "a\nb"}]  # vLLM's server joins with "\n"
    with pytest.raises(BadRequest) as exc:
        validate_messages([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])
    assert exc.value.param == "messages[1].role"
    with pytest.raises(BadRequest) as exc:
        validate_messages([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    assert exc.value.param == "messages[1].tool_call_id"
    with pytest.raises(BadRequest) as exc:
        validate_messages([{"role": "user", "content": 3}])
    assert exc.value.param == "messages[0].content"
    with pytest.raises(BadRequest) as exc:
        validate_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert exc.value.param == "messages[0].content[0]"
    with pytest.raises(BadRequest):
        validate_messages([])


def test_tokenizer_cache_and_special_tokens(toy_model_dir):
    tok = load_tokenizer(toy_model_dir)
    assert tok is load_tokenizer(str(toy_model_dir) + "/")
    assert tok.special_tokens["eos_token"] == "<|im_end|>"
    assert tok.special_tokens["bos_token"] == "<|endoftext|>"
    assert "<|im_start|>" in tok.added_tokens


def test_chat_module_imports_no_torch():
    code = ("import sys, loraplex.adapters.chat; "
            "assert not {'torch', 'transformers', 'peft', 'vllm'} & set(sys.modules), 'heavy'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_validate_tool_turns_as_vllm_does():
    """The follow-up turn of a tool call: assistant content null with tool_calls (arguments a
    JSON string, parsed to an object for the template), then the tool's result."""
    msgs = validate_messages([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
    ])
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "id": "call_2", "function": {"name": "now", "arguments": {}}}]}
    assert msgs[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    with pytest.raises(BadRequest) as exc:
        validate_messages([{"role": "user", "content": None}])
    assert exc.value.param == "messages[0].content"
    with pytest.raises(BadRequest) as exc:
        validate_messages([{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}])
    assert exc.value.param == "messages[0].tool_calls[0]"


def test_developer_role_follows_the_template():
    msgs = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "system", "content": "and kind"}]
    plain = validate_messages(msgs, "{{ messages }}")
    assert plain == [{"role": "system", "content": "be brief\n\nand kind"},
                     {"role": "user", "content": "hi"}]
    knows = validate_messages(msgs, "{% if m.role == 'developer' %}{% endif %}")
    assert [m["role"] for m in knows] == ["developer", "user", "system"]


def test_template_kwargs_and_tools_reach_the_template(toy_tok):
    from loraplex.adapters.chat import template_kwargs

    tpl = ("{% if enable_thinking %}T{% endif %}{% for t in tools or [] %}"
           "{{ t.function.name }};{% endfor %}{{ messages[0].content }}")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    r = render(tpl, [{"role": "user", "content": "q"}], toy_tok, tools=tools,
               kwargs={"enable_thinking": True, "unused_by_template": 1})
    assert r.text == "Tf;q"
    assert template_kwargs(tpl, {"unused": 1}) == {}
    with pytest.raises(BadRequest) as exc:
        render(tpl, [{"role": "user", "content": "q"}], toy_tok, kwargs={"messages": []})
    assert exc.value.param == "chat_template_kwargs"
