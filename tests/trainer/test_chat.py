"""The shared rendering contract (loraplex.adapters.chat) on the toy tokenizer."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from loraplex.adapters.chat import (
    IGNORE_INDEX,
    builtin_template,
    load_special_tokens,
    load_tokenizer,
    render,
    render_for_training,
    resolve_template,
    stop_token_ids,
    stop_tokens,
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
# tokenizing the whole text would merge " " + "cat" across the prompt/answer boundary.
PLAIN = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant: {% endif %}")


def labelled_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX],
                      skip_special_tokens=False)


@pytest.mark.parametrize("name", BUILTINS)
def test_render_matches_transformers_apply_chat_template(name, toy_model_dir, toy_tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(toy_model_dir))
    tpl = builtin_template(name)
    for msgs, agp in ((CONV, False), (CONV[:4], True), (CONV[1:2], True)):
        ours = render(tpl, msgs, toy_tok, add_generation_prompt=agp).text
        theirs = hf.apply_chat_template(msgs, chat_template=tpl, tokenize=False,
                                        add_generation_prompt=agp)
        assert ours == theirs


def test_base_template_is_the_tokenizers_own(toy_model_dir, toy_tok):
    from transformers import AutoTokenizer

    tpl = resolve_template(None, toy_model_dir)
    assert tpl == builtin_template("chatml")  # the toy base ships ChatML
    hf = AutoTokenizer.from_pretrained(str(toy_model_dir))
    ids = hf.apply_chat_template(CONV[:4], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert render(tpl, CONV[:4], toy_tok).token_ids == list(ids)


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
    assert "".join(s.text for s in r.segments) == r.text


@pytest.mark.parametrize("name", BUILTINS)
def test_labels_are_exactly_the_assistant_turns(name, toy_tok):
    ids, labels = render_for_training(builtin_template(name), CONV, toy_tok)
    assert len(ids) == len(labels)
    text = labelled_text(toy_tok, ids, labels)
    # Every assistant turn, each with its end-of-turn token; no prompt text.
    assert text.replace(" ", "") == "cat<|im_end|>dog<|im_end|>"
    assert "Spell" not in text and "brief" not in text
    ids2, labels2 = render_for_training(builtin_template(name), CONV, toy_tok, train_on_inputs=True)
    assert ids2 == ids and labels2 == ids


@pytest.mark.parametrize("name", BUILTINS + ["plain"])
def test_prompt_ids_are_a_prefix_of_training_ids(name, toy_tok, tmp_path):
    """Parity: what the server renders for the prompt is what the trainer trained on."""
    tpl = PLAIN if name == "plain" else builtin_template(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, labels = render_for_training(tpl, CONV, toy_tok)
    for k in (2, 4):  # prompts ending before each assistant turn
        prompt = render(tpl, CONV[:k], toy_tok, add_generation_prompt=True).token_ids
        assert ids[:len(prompt)] == prompt
        assert labels[len(prompt)] != IGNORE_INDEX  # the answer starts right after the prompt
        assert all(lab == IGNORE_INDEX for lab in labels[len(prompt) - 1:len(prompt)])


def test_segmentwise_ids_differ_from_whole_text_tokenization(toy_tok):
    """Why ids are built per segment: the whole text merges ' ' and 'cat' into one token."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cat"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = render(PLAIN, msgs, toy_tok, add_generation_prompt=False)
    whole = toy_tok.encode(r.text, add_special_tokens=False).ids
    assert whole != r.token_ids
    prompt = render(PLAIN, msgs[:1], toy_tok).token_ids
    assert r.token_ids[:len(prompt)] == prompt


def test_stop_tokens(toy_tok):
    assert stop_tokens(builtin_template("chatml"), toy_tok) == ["<|im_end|>"]
    assert stop_tokens(builtin_template("llama2"), toy_tok) == ["<|im_end|>"]  # the toy's eos
    assert stop_token_ids(builtin_template("chatml"), toy_tok) == [toy_tok.token_to_id("<|im_end|>")]
    other = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    assert stop_tokens(builtin_template("chatml"), toy_tok, other) == ["<|im_end|>", "<|endoftext|>"]
    assert stop_tokens(builtin_template("llama2"), toy_tok, other) == ["<|endoftext|>"]
    assert stop_tokens(builtin_template("alpaca"), toy_tok, other) == ["<|endoftext|>"]


def test_template_without_end_of_turn_warns(toy_tok):
    with pytest.warns(UserWarning, match="no end-of-turn token"):
        render_for_training(PLAIN + "{# warn-probe #}", CONV[1:3], toy_tok)
    assert stop_tokens(PLAIN, toy_tok) == ["<|im_end|>"]  # falls back to the eos


def test_not_prefix_stable_template_is_refused(toy_tok):
    tpl = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.content }}{% endfor %}"
    with pytest.raises(BadRequest, match="not prefix-stable") as exc:
        render(tpl, CONV[1:3], toy_tok)
    assert "sha256:" in exc.value.message  # names the template


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
    assert msgs == [{"role": "user", "content": "ab"}]
    with pytest.raises(BadRequest) as exc:
        validate_messages([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    assert exc.value.param == "messages[1].role"
    with pytest.raises(BadRequest) as exc:
        validate_messages([{"role": "user", "content": 3}])
    assert exc.value.param == "messages[0].content"
    with pytest.raises(BadRequest) as exc:
        validate_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert exc.value.param == "messages[0].content[0]"
    with pytest.raises(BadRequest):
        validate_messages([])


def test_tokenizer_cache_and_special_tokens(toy_model_dir):
    assert load_tokenizer(toy_model_dir) is load_tokenizer(str(toy_model_dir) + "/")
    sp = load_special_tokens(toy_model_dir)
    assert sp["eos_token"] == "<|im_end|>" and sp["bos_token"] == "<|endoftext|>"


def test_chat_module_imports_no_torch():
    code = ("import sys, loraplex.adapters.chat; "
            "assert not {'torch', 'transformers', 'peft', 'vllm'} & set(sys.modules), 'heavy'")
    subprocess.run([sys.executable, "-c", code], check=True)
