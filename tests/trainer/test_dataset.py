"""Validation, curation, label masks and batching (toy tokenizer; one small forward for packing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.adapters.chat import IGNORE_INDEX, builtin_template
from loraplex.adapters.errors import BadRequest
from loraplex.trainer.config import load_config
from loraplex.trainer.dataset import batch_order, collate, inspect_lines, prepare_data

from .conftest import qa, qa_rows


def cfg_for(data: list[Path], **over):
    return load_config(None, {"base": "unused", "data": [str(p) for p in data],
                              "output": "unused", **over})


def test_counts_and_every_rejection_reported(write_jsonl, toy_tok):
    rows = qa_rows(6)
    rows += [
        "{not json",                                                       # line 7
        {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}]},
        {"instruction": "q", "output": ""},                                # empty output
        {"messages": [{"role": "user", "content": "say <|im_end|> now"},
                      {"role": "assistant", "content": "ok"}]},            # special token
        qa("Name animal 0.", "The cat 0."),                                # exact duplicate of 1
        qa("x " * 300, "long"),                                            # too long
    ]
    f = write_jsonl("d.jsonl", rows)
    data = prepare_data(cfg_for([f], max_seq_len=128), toy_tok, builtin_template("chatml"))
    rep = data.report
    assert (rep.rows, rep.train, rep.eval, len(rep.rejected)) == (12, 6, 0, 6)
    got = {r.source: r.code for r in rep.rejected}
    assert got == {f"{f}:7": "bad_json", f"{f}:8": "unknown_role", f"{f}:9": "empty_output",
                   f"{f}:10": "special_token", f"{f}:11": "duplicate", f"{f}:12": "too_long"}
    dup = next(r for r in rep.rejected if r.code == "duplicate")
    assert dup.detail == f"exact duplicate of {f}:1"
    too_long = next(r for r in rep.rejected if r.code == "too_long")
    assert "> --max-seq-len 128" in too_long.detail and "chatml" in too_long.detail
    text = "\n".join(rep.summary())
    assert "kept 6 (train 6, eval 0), dropped 6" in text and f"{f}:7: bad JSON" in text
    assert rep.to_dict()["dropped_by_reason"]["bad_json"] == 1


def test_strict_turns_drops_into_one_error(write_jsonl, toy_tok):
    f = write_jsonl("d.jsonl", qa_rows(3) + ["{oops"] + qa_rows(2, 3))
    with pytest.raises(BadRequest) as exc:
        prepare_data(cfg_for([f], strict=True), toy_tok, builtin_template("chatml"))
    assert f"{f}:4: bad JSON" in exc.value.message and "1 row(s) rejected" in exc.value.message


def test_empty_dataset_is_an_error(write_jsonl, toy_tok):
    f = write_jsonl("d.jsonl", [{"instruction": "q", "output": " "}])
    with pytest.raises(BadRequest, match="no training examples left.*empty_output 1"):
        prepare_data(cfg_for([f]), toy_tok, builtin_template("chatml"))
    (f.parent / "blank.jsonl").write_text("\n\n")
    with pytest.raises(BadRequest, match="0 row"):
        prepare_data(cfg_for([f.parent / "blank.jsonl"]), toy_tok, builtin_template("chatml"))


def test_normalized_dedup_and_length_filters(write_jsonl, toy_tok):
    f = write_jsonl("d.jsonl", [qa("Hello, there!", "Hi."), qa("hello there", "hi"),
                                qa("A much longer question with many words in it?", "Yes.")])
    tpl = builtin_template("chatml")
    assert prepare_data(cfg_for([f], dedup="exact"), toy_tok, tpl).report.train == 3
    data = prepare_data(cfg_for([f], dedup="normalized"), toy_tok, tpl)
    assert data.report.train == 2 and data.report.rejected[0].code == "duplicate"
    data = prepare_data(cfg_for([f], dedup="none", min_tokens=14, max_tokens=18), toy_tok, tpl)
    assert {r.code for r in data.report.rejected} <= {"too_short", "too_long_filter"}
    assert all(14 <= len(ex.input_ids) <= 18 for ex in data.train)


def test_eval_file_drops_rows_leaking_from_train(write_jsonl, toy_tok):
    train = write_jsonl("train.jsonl", qa_rows(5))
    held = write_jsonl("held.jsonl", qa_rows(3, 4))  # row 4 is also in train
    data = prepare_data(cfg_for([train], eval_data=[str(held)]), toy_tok,
                        builtin_template("chatml"))
    assert (data.report.train, data.report.eval) == (5, 2)
    assert data.report.rejected[0].source == f"{held}:1"


def test_eval_fraction_split_is_deterministic(write_jsonl, toy_tok):
    f = write_jsonl("d.jsonl", qa_rows(20))
    tpl = builtin_template("chatml")
    a = prepare_data(cfg_for([f], eval_fraction=0.25, seed=1), toy_tok, tpl)
    b = prepare_data(cfg_for([f], eval_fraction=0.25, seed=1), toy_tok, tpl)
    assert (len(a.train), len(a.eval)) == (15, 5)
    assert [e.source for e in a.eval] == [e.source for e in b.eval]
    assert a.report.data_sha256 == b.report.data_sha256
    c = prepare_data(cfg_for([f], eval_fraction=0.25, seed=2), toy_tok, tpl)
    assert c.report.data_sha256 != a.report.data_sha256
    with pytest.raises(BadRequest, match="leaves no training"):
        prepare_data(cfg_for([write_jsonl("one.jsonl", qa_rows(1))], eval_fraction=0.5),
                     toy_tok, tpl)


@pytest.mark.parametrize("name", ["chatml", "llama2", "alpaca"])
def test_multiturn_label_masks_decode_to_the_answers(name, write_jsonl, toy_tok):
    row = {"conversations": [{"from": "system", "value": "Be brief."},
                             {"from": "human", "value": "First?"}, {"from": "gpt", "value": "One."},
                             {"from": "human", "value": "Second?"}, {"from": "gpt", "value": "Two."}]}
    f = write_jsonl("d.jsonl", [row])
    tpl = builtin_template(name)
    ex = prepare_data(cfg_for([f]), toy_tok, tpl).train[0]
    spans, cur = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            assert lab == tid
            cur.append(tid)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    texts = [toy_tok.decode(s, skip_special_tokens=False).strip() for s in spans]
    assert texts == ["One. <|im_end|>", "Two. <|im_end|>"] if name == "llama2" else \
        texts == ["One.<|im_end|>", "Two.<|im_end|>"]


def test_inspect_lines_show_tokens_and_labels(write_jsonl, toy_tok):
    f = write_jsonl("d.jsonl", [qa("Hi?", "Yo.")])
    ex = prepare_data(cfg_for([f]), toy_tok, builtin_template("chatml")).train[0]
    lines = inspect_lines(ex, lambda ids: toy_tok.decode(ids, skip_special_tokens=False))
    assert lines[0].startswith(f"== {f}:1") and "labelled" in lines[0]
    assert any('"<|im_start|>"' in line and line.rstrip().endswith("-") for line in lines)
    assert lines[-1] == '   trained text: "Yo.<|im_end|>"'


def test_batch_order_is_deterministic_and_complete():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47, 30, 31]
    a = batch_order(lengths, 2, seed=3, epoch=0)
    assert a == batch_order(lengths, 2, seed=3, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(10))
    assert a != batch_order(lengths, 2, seed=3, epoch=1)
    # Length grouping: partners in a batch have similar lengths.
    assert all(abs(lengths[b[0]] - lengths[b[1]]) <= 3 for b in a if len(b) == 2)


def test_packing_has_no_cross_example_attention(toy_model_dir, write_jsonl, toy_tok):
    """Packed logits equal the logits of each example run alone (block-diagonal attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    f = write_jsonl("d.jsonl", [qa("Where is the cat?", "In the park."),
                                qa("Spell dog.", "d o g", system="Be brief."),
                                qa("Hi", "Hello there, friend.")])
    exs = prepare_data(cfg_for([f]), toy_tok, builtin_template("chatml")).train
    model = AutoModelForCausalLM.from_pretrained(str(toy_model_dir), dtype=torch.float32).eval()
    packed = collate(exs, pad_id=1, packing=True)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in exs))
    padded = collate(exs, pad_id=1, packing=False)
    with torch.no_grad():
        labels = packed.pop("labels")
        logits = model(**packed).logits[0]
        pad_logits = model(input_ids=padded["input_ids"],
                           attention_mask=padded["attention_mask"]).logits
    start = 0
    for row, ex in enumerate(exs):
        n = len(ex.input_ids)
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
        torch.testing.assert_close(logits[start:start + n], alone, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pad_logits[row, :n], alone, atol=1e-4, rtol=1e-4)
        assert labels[0, start] == IGNORE_INDEX  # no loss across the boundary
        start += n


def test_boundary_rule_and_dropped_messages_are_reported(write_jsonl, toy_tok, tmp_path):
    """A template whose generation prompt ends with a space (the merge the boundary rule cuts)
    and that drops the system prompt of a conversation ending in an assistant turn."""
    tpl = ("{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n"
           "{% elif m.role == 'assistant' %}Assistant: {{ m.content }}<|im_end|>\n{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")
    f = write_jsonl("d.jsonl", [qa("Hi?", "The cat.", system="Be brief."),
                                qa("Name one.", "The owl.")])
    data = prepare_data(cfg_for([f]), toy_tok, tpl)
    assert data.report.boundary_rows == 2 and data.report.dropped_message_rows == 1
    assert [ex.dropped for ex in data.train] == [1, 0]
    summary = "\n".join(data.report.summary())
    assert "boundary rule applied in 2 training row(s)" in summary
    assert "did not write every message" in summary
    lines = inspect_lines(data.train[0], toy_tok.decode)
    assert "boundary rule applied at 1 turn(s)" in lines[0]
    assert lines[-1] == '   trained text: "The cat.<|im_end|>"'
