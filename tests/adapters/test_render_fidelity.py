"""Chat rendering is token-exact against transformers' `apply_chat_template` (issue 10).

A matrix of tokenizer mechanics (tests/fixtures/tokenizers.py: byte-level BPE, SentencePiece
BPE with byte fallback in the Metaspace and the legacy Llama-2 layouts, each loaded the way
transformers 5 loads it, Gemma) x family templates (tests/fixtures/templates) x conversations
(system, multi-turn, padded content, leading newlines, non-ASCII).

- serving: `render(tpl, msgs, tok, add_generation_prompt=True)` gives HF's text and HF's ids;
  a conversation the template refuses is refused by both, with the template's own message.
- training: `render_for_training` gives HF's whole-text ids whenever no boundary was cut
  (`cuts == 0`), and then its labels are HF's `assistant_masks` computed on a copy of the
  template with `{% generation %}` around exactly the labelled span (`<name>.gen.jinja`); its
  spans are those generation spans. Where a whole-text token merges across a span start, the
  text is cut there: the ids before the first cut are the server's prompt ids for the same
  text, the ids still spell the same text, and each labelled run is exactly its span.
- a template that carries its own `{% generation %}` markers is labelled exactly there.
"""

from __future__ import annotations

import bisect
import functools
from pathlib import Path
from typing import Any

import jinja2
import pytest

from loraplex.adapters import chat
from loraplex.adapters.errors import BadRequest
from tests.fixtures.tokenizers import (
    MARKED_ONLY,
    MECHANICS,
    TEMPLATES,
    build_tokenizer_dir,
    cache_root,
    marked_template,
    template,
)

IGNORE_INDEX = -100

# The plain template has no end-of-turn token: render_for_training warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:chat template .* emits no end-of-turn token")


def _m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SYSTEM = _m("system", "You are a terse assistant.")
CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "system_user": [SYSTEM, _m("user", "Name a fruit."), _m("assistant", "apple")],
    "user_only": [_m("user", "Name a fruit."), _m("assistant", "apple")],
    "multi_turn_system": [SYSTEM, _m("user", "Name a fruit."), _m("assistant", "A pear."),
                          _m("user", "And a color?"), _m("assistant", "blue")],
    "multi_turn": [_m("user", "What is 2 plus 3?"), _m("assistant", "2 plus 3 is 5."),
                   _m("user", "Spell cat."), _m("assistant", "c a t")],
    "padded": [_m("user", "  Name a fruit.  \n"), _m("assistant", "  apple \n\n")],
    "leading_newline": [_m("user", "\nName a color."), _m("assistant", "\nred\n")],
    "accents": [_m("user", "Où est le café ?"), _m("assistant", "Près de la forêt, señor.")],
    "cjk": [_m("user", "你好，世界"), _m("assistant", "世界你好。")],
    "emoji": [_m("user", "Pick one: 🍎 or 🍐?"), _m("assistant", "🍐 👍🏽")],
    "not_alternating": [_m("user", "Hi."), _m("user", "Name a fruit."), _m("assistant", "plum")],
}

# The token each family writes right after the assistant content (None: the tokenizer's eos).
END_OF_TURN = {"llama2": None, "mistral_v01": None, "mistral_v03": None, "zephyr": None,
               "qwen25": "<|im_end|>", "llama3": "<|eot_id|>", "phi3": "<|end|>",
               "gemma": "<end_of_turn>", "plain": None, "builtin_chatml": "<|im_end|>",
               "builtin_llama2": None, "builtin_alpaca": None}


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fixture_root(request: pytest.FixtureRequest) -> Path:
    return cache_root(request.config.cache.mkdir("render-fixtures"))


@pytest.fixture(scope="session")
def tokenizers(fixture_root: Path):
    """`tokenizers(mechanic)` -> (transformers AutoTokenizer, loraplex ChatTokenizer), once each."""
    from transformers import AutoTokenizer

    @functools.cache
    def get(mechanic: str) -> tuple[Any, Any]:
        d = build_tokenizer_dir(fixture_root, mechanic)
        return AutoTokenizer.from_pretrained(d), chat.load_tokenizer(d)

    return get


# -- the transformers reference -------------------------------------------------------------------

def _hf(call):
    """(result, None), or (None, the template's message) where the template refuses."""
    try:
        return call(), None
    except jinja2.exceptions.TemplateError as exc:
        return None, str(exc)


def _assert_refused(call, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        call()
    assert message in info.value.message


def hf_text(hf, tpl: str, msgs, agp: bool) -> str:
    return hf.apply_chat_template(msgs, chat_template=tpl, tokenize=False, add_generation_prompt=agp)


def hf_ids(hf, tpl: str, msgs, agp: bool) -> list[int]:
    ids = hf.apply_chat_template(msgs, chat_template=tpl, tokenize=True, add_generation_prompt=agp,
                                 return_dict=False)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)  # transformers 5 shape
    return ids


def hf_spans(hf, marked: str, msgs) -> list[tuple[int, int]]:
    """The character spans inside `{% generation %}` (what HF's assistant mask is built from)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    _, indices = render_jinja_template(conversations=[msgs], chat_template=marked,
                                       return_assistant_tokens_mask=True,
                                       add_generation_prompt=False, **hf.special_tokens_map)
    return [tuple(s) for s in indices[0]]


def hf_mask(hf, marked: str, msgs, spans) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) from transformers, with the last character of a span whole.

    HF marks the tokens from the one holding a span's first character to the FIRST token holding
    its last character: where that character is several tokens (byte-fallback or byte-level
    pieces of one CJK character or emoji, a "▁" the legacy layout prepends before a newline), the
    others are left out of its mask. Those are added back (checked to be the only difference)."""
    out = hf.apply_chat_template(msgs, chat_template=marked, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True, add_generation_prompt=False,
                                 tokenizer_kwargs={"return_offsets_mapping": True})
    ids, mask, offsets = list(out["input_ids"]), list(out["assistant_masks"]), out["offset_mapping"]
    live = [(s, e) for s, e in spans if e > s]
    whole = [int(any(a < e and b > s for s, e in live)) for a, b in offsets]
    for k, (m, w) in enumerate(zip(mask, whole)):
        if m != w:  # only the tail of a span's last character may differ
            assert w == 1 and any(offsets[k][0] <= e - 1 < offsets[k][1] for _, e in live), k
    return ids, whole


def dirty_starts(hf, text: str, spans) -> list[int]:
    """Span starts where the whole-text tokens that start before them are not the ids of the
    text before them (a token merges across the start, or BPE would split the prefix alone
    differently): where the boundary rule has to cut."""
    enc = hf.backend_tokenizer.encode(text, add_special_tokens=False)
    starts = [a for a, _ in enc.offsets]
    out = []
    for s, e in spans:
        if e > s and 0 < s < len(text):
            k = bisect.bisect_left(starts, s)
            if enc.ids[:k] != hf.backend_tokenizer.encode(text[:s], add_special_tokens=False).ids:
                out.append(s)
    return out


def label_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, i = [], 0
    while i < len(labels):
        if labels[i] != IGNORE_INDEX:
            j = i
            while j < len(labels) and labels[j] != IGNORE_INDEX:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


# -- the checks ------------------------------------------------------------------------------------

def check_serving(hf, tok, tpl: str, conv: list[dict[str, str]]) -> None:
    prompts = [conv[:k] for k in range(1, len(conv) + 1) if conv[k - 1]["role"] == "user"]
    assert prompts
    for msgs in prompts:
        text, refused = _hf(lambda msgs=msgs: hf_text(hf, tpl, msgs, True))
        if refused is not None:
            _assert_refused(lambda msgs=msgs: chat.render(tpl, msgs, tok, add_generation_prompt=True),
                            refused)
            continue
        r = chat.render(tpl, msgs, tok, add_generation_prompt=True)
        assert r.text == text
        assert r.token_ids == hf_ids(hf, tpl, msgs, True), (
            f"ours {tok.decode(r.token_ids)!r} vs HF {hf.decode(hf_ids(hf, tpl, msgs, True))!r}")


def check_training(hf, tok, tpl: str, marked: str, msgs: list[dict[str, str]]) -> None:
    text, refused = _hf(lambda: hf_text(hf, tpl, msgs, False))
    if refused is not None:
        _assert_refused(lambda: chat.render_for_training(tpl, msgs, tok), refused)
        return
    assert hf_text(hf, marked, msgs, False) == text, "the marked copy must render the same text"
    whole = hf_ids(hf, tpl, msgs, False)
    spans = hf_spans(hf, marked, msgs)

    t = chat.render_for_training(tpl, msgs, tok)
    assert t.text == text
    assert [tuple(s) for s in t.spans] == spans, [(text[a:b]) for a, b in t.spans]
    assert len(t.labels) == len(t.token_ids)
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(t.labels, t.token_ids))
    dirty = dirty_starts(hf, text, spans)
    assert t.cuts == len(dirty), f"cut at {dirty} expected, got {t.cuts} cuts"

    if t.cuts == 0:
        ids, mask = hf_mask(hf, marked, msgs, spans)
        assert ids == whole
        assert t.token_ids == whole, (
            f"ours {hf.convert_ids_to_tokens(t.token_ids)} vs HF {hf.convert_ids_to_tokens(whole)}")
        assert [int(lab != IGNORE_INDEX) for lab in t.labels] == mask, (
            f"labelled {hf.decode([i for i, lab in zip(t.token_ids, t.labels) if lab != IGNORE_INDEX])!r}"
            f" vs HF {hf.decode([i for i, m in zip(whole, mask) if m])!r}")
    else:
        # The ids before the first cut are what the server sends for the text before it.
        prompt = hf.backend_tokenizer.encode(text[:dirty[0]], add_special_tokens=False).ids
        assert t.token_ids[:len(prompt)] == prompt
        # The same text, spelled with different tokens.
        assert hf.decode(t.token_ids) == hf.decode(whole)
        # Each labelled run starts exactly at its span and ends with the token that holds the
        # span's last character: where no end-of-turn token closes the span (a template without
        # one), that token may run past it (byte-level "." + "\n" is one token), as in HF's mask.
        runs = label_runs(t.labels)
        live = [(s, e) for s, e in spans if e > s]
        assert len(runs) == len(live), (runs, live)
        for (i, j), (s, e) in zip(runs, live):
            before, upto = hf.decode(t.token_ids[:i]), hf.decode(t.token_ids[:j])
            assert upto.startswith(before)
            run = upto[len(before):]
            assert run.startswith(text[s:e]), (run, text[s:e])
            if run != text[s:e]:
                assert len(hf.decode(t.token_ids[:j - 1])) - len(before) < e - s, (run, text[s:e])
                assert text[s:].startswith(run), (run, text[s:])

    everything = chat.render_for_training(tpl, msgs, tok, train_on_inputs=True)
    assert everything.token_ids == t.token_ids
    assert everything.labels == t.token_ids


def check_prompt_parity(hf, tok, tpl: str, msgs: list[dict[str, str]]) -> int:
    """The training ids before an assistant turn are the ids the server sends for the same
    conversation without that turn, wherever the template is prefix-stable there (the
    generation prompt ends where the labels start) and no boundary was cut before it. Returns
    how many turns were checked."""
    text, refused = _hf(lambda: hf_text(hf, tpl, msgs, False))
    if refused is not None:
        return -1
    t = chat.render_for_training(tpl, msgs, tok)
    cuts = dirty_starts(hf, text, t.spans)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    checked = 0
    for i, (s, _) in zip(turns, t.spans):
        prompt, refused = _hf(lambda i=i: hf_text(hf, tpl, msgs[:i], True))
        if refused is not None or prompt != text[:s] or any(c < s for c in cuts):
            continue
        served = chat.render(tpl, msgs[:i], tok, add_generation_prompt=True).token_ids
        assert t.token_ids[:len(served)] == served, f"turn {i}"
        assert t.labels[len(served) - 1] == IGNORE_INDEX
        assert t.labels[len(served)] != IGNORE_INDEX
        checked += 1
    return checked


# -- the matrix ------------------------------------------------------------------------------------

MECHANIC_NAMES = list(MECHANICS)
CONV_NAMES = list(CONVERSATIONS)


@pytest.mark.parametrize("conv", CONV_NAMES)
@pytest.mark.parametrize("tpl", TEMPLATES)
@pytest.mark.parametrize("mechanic", MECHANIC_NAMES)
def test_serving_matches_transformers(tokenizers, mechanic, tpl, conv):
    hf, tok = tokenizers(mechanic)
    check_serving(hf, tok, template(tpl), CONVERSATIONS[conv])


@pytest.mark.parametrize("conv", CONV_NAMES)
@pytest.mark.parametrize("tpl", TEMPLATES)
@pytest.mark.parametrize("mechanic", MECHANIC_NAMES)
def test_training_matches_transformers(tokenizers, mechanic, tpl, conv):
    hf, tok = tokenizers(mechanic)
    check_training(hf, tok, template(tpl), marked_template(tpl), CONVERSATIONS[conv])


@pytest.mark.parametrize("conv", CONV_NAMES)
@pytest.mark.parametrize("tpl", TEMPLATES + MARKED_ONLY)
@pytest.mark.parametrize("mechanic", MECHANIC_NAMES)
def test_generation_markers_are_the_labels(tokenizers, mechanic, tpl, conv):
    """A template with its own `{% generation %}` markers: exactly the marked spans."""
    hf, tok = tokenizers(mechanic)
    marked = marked_template(tpl)
    check_training(hf, tok, marked, marked, CONVERSATIONS[conv])


# Mistral v0.3 puts the system prompt into the LAST user turn: the prompt of the first answer is
# not how the whole conversation starts.
NOT_PREFIX_STABLE = {("mistral_v03", "system_user"), ("mistral_v03", "multi_turn_system")}


@pytest.mark.parametrize("conv", ["system_user", "user_only", "multi_turn", "multi_turn_system",
                                  "padded", "leading_newline", "emoji"])
@pytest.mark.parametrize("tpl", TEMPLATES)
@pytest.mark.parametrize("mechanic", MECHANIC_NAMES)
def test_training_prompt_is_the_served_prompt(tokenizers, mechanic, tpl, conv):
    hf, tok = tokenizers(mechanic)
    checked = check_prompt_parity(hf, tok, template(tpl), CONVERSATIONS[conv])
    if checked >= 0:
        assert (checked == 0) == ((tpl, conv) in NOT_PREFIX_STABLE)


@pytest.mark.parametrize("tpl", TEMPLATES)
@pytest.mark.parametrize("mechanic", MECHANIC_NAMES)
def test_stop_tokens(tokenizers, mechanic, tpl):
    hf, tok = tokenizers(mechanic)
    eos = hf.eos_token
    eot = END_OF_TURN[tpl] or eos
    stops = tok.stop_tokens(template(tpl))
    assert stops == ([eot, eos] if eot != eos else [eos])
    assert tok.stop_token_ids(template(tpl)) == hf.convert_tokens_to_ids(stops)


@pytest.mark.parametrize("mechanic", MECHANIC_NAMES)
def test_tokenizer_is_what_transformers_loads(tokenizers, mechanic):
    """Special tokens the templates see, encode/decode and added tokens, as AutoTokenizer has them."""
    hf, tok = tokenizers(mechanic)
    assert chat.IGNORE_INDEX == IGNORE_INDEX
    assert tok.special_tokens == hf.special_tokens_map
    for text in ["<s>[INST] hi [/INST]", " Hello", "a\n\nb", "Café 你好 👍🏽", "<|im_start|>user\n x"]:
        assert tok.encode(text) == hf(text, add_special_tokens=False).input_ids
        assert tok.decode(tok.encode(text)) == hf.decode(hf(text, add_special_tokens=False).input_ids)
    for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", hf.eos_token, hf.bos_token):
        assert tok.token_to_id(t) == hf.convert_tokens_to_ids(t)


def test_fixture_mechanics(tokenizers):
    """The fixtures have the mechanics they claim, as transformers 5 loads them."""
    def toks(mechanic, text):
        hf, _ = tokenizers(mechanic)
        return hf.convert_ids_to_tokens(hf(text, add_special_tokens=False).input_ids)

    # Byte-level: a blank line is one token, and merges with a newline after a header.
    assert "ĊĊ" in toks("bytelevel", "a\n\nb")
    assert toks("bytelevel", "assistant: cat")[-1] == "Ġcat"
    # SentencePiece + byte fallback: newlines and CJK are bytes.
    assert toks("sp_metaspace", "a\nb").count("<0x0A>") == 1
    assert "<0xE4>" in toks("sp_legacy", "你")
    # The legacy tokenizer.json, kept verbatim: "▁" is prepended to every piece, also after an
    # added token, and a leading space gives "▁▁".
    assert toks("sp_legacy", "<s> x") == ["<s>", "▁", "▁x"]
    assert toks("sp_legacy", " Hello")[:2] == ["▁", "▁H"]
    # The same file under class LlamaTokenizer: transformers 5 rebuilds the pipeline with
    # Metaspace (legacy true: prepend "always" without doubling a leading space; legacy false:
    # only at the very start, never after an added token).
    assert toks("sp_legacy_llama", "<s> x") == ["<s>", "▁x"]
    assert toks("sp_legacy_llama", "<s>hi")[1].startswith("▁")
    assert not toks("sp_legacy_llama_nonlegacy", "<s>hi")[1].startswith("▁")
    assert toks("sp_legacy_llama_nonlegacy", "hi")[0].startswith("▁")
    # Gemma: no prefix, spaces become "▁", newline pieces exist.
    assert not toks("gemma", "hi")[0].startswith("▁")
    assert "\n\n" in toks("gemma", "a\n\nb")
    # [INST] is plain text in the legacy Llama-2 vocabulary, one token elsewhere.
    assert "[INST]" not in toks("sp_legacy", "[INST]")
    assert toks("sp_metaspace", "[INST]") == ["[INST]"]
