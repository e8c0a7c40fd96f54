"""Chat rendering: the one function the trainer and the server both use to turn messages into ids.

    tok = load_tokenizer(base_dir)                       # tokenizers.Tokenizer, cached per path
    tpl = resolve_template("chatml", base_dir)           # built-in name, .jinja file, or None
    r = render(tpl, messages, tok)                       # Rendered(text, token_ids, segments)
    ids, labels = render_for_training(tpl, messages, tok)
    stops = stop_tokens(tpl, tok)                        # e.g. ["<|im_end|>"]

Templates run in a sandboxed Jinja environment with Hugging Face semantics (trim_blocks,
lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`, the tokenizer's special tokens as
variables), so a base model's own template renders exactly as `apply_chat_template` would.

Token ids are built segment by segment, never by tokenizing the whole text at once: a BPE merge
across the prompt/answer boundary would otherwise make the ids of a prompt depend on whether its
answer follows it. Segment k is render(msgs[:k+1]) minus render(msgs[:k]); an assistant turn is
split into its header (what `add_generation_prompt` adds), its body (content and end-of-turn
token) and a tail (whitespace after the end-of-turn token); the generation prompt is its own
segment. The trainer's prompt ids are therefore exactly the server's ids for the same messages.

No torch or transformers here: the server imports this module on every request path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from loraplex.adapters.errors import BadRequest, ConfigError
from loraplex.adapters.fingerprint import read_chat_template, read_json

log = logging.getLogger(__name__)

BUILTIN_TEMPLATES = ("chatml", "llama2", "alpaca")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label of tokens the loss skips (PyTorch's cross_entropy default)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "mask_token")


# -- tokenizers ----------------------------------------------------------------------------------

# id(tokenizer) -> (tokenizer, special tokens); the tokenizer is kept alive so the id stays unique.
_SPECIALS: dict[int, tuple[Tokenizer, dict[str, str]]] = {}


def load_special_tokens(model_dir: str | Path) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ..., ...} from tokenizer_config.json (template variables)."""
    p = Path(model_dir) / "tokenizer_config.json"
    if not p.is_file():
        return {}
    out: dict[str, str] = {}
    for key, value in read_json(p).items():
        if key in _SPECIAL_KEYS:
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and value:
                out[key] = value
    return out


@functools.lru_cache(maxsize=32)
def _load(path: str) -> Tokenizer:
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"{path}: no tokenizer.json; the base model needs a fast tokenizer file")
    tok = Tokenizer.from_file(str(file))
    _SPECIALS[id(tok)] = (tok, load_special_tokens(path))
    return tok


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The base model's `tokenizers.Tokenizer` (cached per directory) with its special tokens."""
    return _load(str(Path(model_dir).expanduser().resolve()))


def special_tokens_of(tokenizer: Tokenizer) -> dict[str, str]:
    """The special tokens recorded by `load_tokenizer` for this tokenizer ({} if unknown)."""
    entry = _SPECIALS.get(id(tokenizer))
    return dict(entry[1]) if entry and entry[0] is tokenizer else {}


def added_tokens(tokenizer: Tokenizer) -> list[str]:
    """Every added (special) token string; these encode to one id wherever they appear in text."""
    return [t.content for _, t in sorted(tokenizer.get_added_tokens_decoder().items())]


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    # add_special_tokens=False: templates write BOS/EOS themselves; added tokens written in the
    # text (<|im_end|>) still map to their single ids.
    return tokenizer.encode(text, add_special_tokens=False).ids if text else []


# -- templates -----------------------------------------------------------------------------------

def builtin_template(name: str) -> str:
    if name not in BUILTIN_TEMPLATES:
        raise BadRequest(f"unknown built-in chat template {name!r}; choose one of "
                         f"{', '.join(BUILTIN_TEMPLATES)} or pass a .jinja file",
                         param="chat_template")
    return resources.files("loraplex.adapters").joinpath(f"templates/{name}.jinja").read_text()


def resolve_template(spec: str | Path | None, base_dir: str | Path | None = None) -> str:
    """A built-in name, a path to a Jinja file, or None for the base tokenizer's own template."""
    if spec is None or spec == "":
        template, _ = read_chat_template(base_dir) if base_dir is not None else (None, None)
        if template is None:
            raise ConfigError(f"base model {str(base_dir)!r} has no chat template; pass one of "
                              f"{', '.join(BUILTIN_TEMPLATES)} or a .jinja file",
                              param="chat_template")
        return template
    if str(spec) in BUILTIN_TEMPLATES:
        return builtin_template(str(spec))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BadRequest(f"chat template {str(spec)!r} is neither a built-in "
                         f"({', '.join(BUILTIN_TEMPLATES)}) nor a readable file",
                         param="chat_template")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadRequest(f"cannot read chat template {str(path)!r}: {exc}",
                         param="chat_template") from None


def template_label(template: str) -> str:
    """A short name for error messages: the built-in name or a content hash."""
    for name in BUILTIN_TEMPLATES:
        if template == builtin_template(name):
            return name
    return "sha256:" + hashlib.sha256(template.encode()).hexdigest()[:12]


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF assistant-mask markers): rendered as-is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; HF overrides it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise BadRequest(f"chat template {template_label(template)} does not compile: {exc}",
                         param="chat_template") from None


def _render_text(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                 specials: dict[str, str]) -> str:
    try:
        return _compile(template).render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **specials)
    except jinja2.TemplateError as exc:
        raise BadRequest(f"chat template {template_label(template)} rejected the messages: {exc}",
                         param="messages") from None


# -- messages ------------------------------------------------------------------------------------

def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Plain {"role", "content": str} dicts; OpenAI text content parts are concatenated."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content",
                             param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role {role!r} is not supported; use one of "
                             f"{', '.join(ROLES)}", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise BadRequest(f"messages[{i}].content[{j}] must be a text part "
                                     '({"type": "text", "text": ...})',
                                     param=f"messages[{i}].content[{j}]")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts",
                             param=f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


# -- rendering -----------------------------------------------------------------------------------

@dataclass
class Segment:
    """One separately tokenized piece of a rendered conversation."""

    # prefix | system | user | assistant_header | assistant | assistant_tail | generation_prompt
    kind: str
    message_index: int | None
    text: str
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Rendered:
    text: str
    token_ids: list[int]
    segments: list[Segment]


def _not_prefix(template: str, what: str) -> BadRequest:
    return BadRequest(f"chat template {template_label(template)} is not prefix-stable: {what}; "
                      "loraplex renders conversations turn by turn and needs each rendered turn "
                      "to extend the previous one", param="chat_template")


def _split_body(rest: str, stops: list[str]) -> tuple[str, str]:
    """(content + end-of-turn token, what follows it) for an assistant turn after its header."""
    if stops:
        pos = rest.rfind(stops[0])
        if pos >= 0:
            end = pos + len(stops[0])
            return rest[:end], rest[end:]
    return rest, ""


def render(template: str, messages: Any, tokenizer: Tokenizer, *,
           add_generation_prompt: bool = True,
           special_tokens: dict[str, str] | None = None) -> Rendered:
    """Render `messages` with `template`; token ids built segment by segment (see module doc)."""
    msgs = validate_messages(messages)
    specials = special_tokens if special_tokens is not None else special_tokens_of(tokenizer)
    stops = _stops(template, tokenizer, tuple(sorted(specials.items())))[0]

    def text(k: int, agp: bool) -> str:
        return _render_text(template, msgs[:k], agp, specials)

    try:
        prev = text(0, False)
    except BadRequest:  # templates may refuse an empty conversation; nothing precedes turn 0
        prev = ""
    pieces: list[tuple[str, int | None, str]] = [("prefix", None, prev)]
    for i, m in enumerate(msgs):
        full = text(i + 1, False)
        if not full.startswith(prev):
            raise _not_prefix(template, f"messages[:{i + 1}] does not start with messages[:{i}]")
        if m["role"] == "assistant":
            gen = text(i, True)
            if not gen.startswith(prev) or not full.startswith(gen):
                raise _not_prefix(template, f"the generation prompt after messages[:{i}] is not "
                                  f"how messages[{i}] (assistant) starts")
            body, tail = _split_body(full[len(gen):], stops)
            pieces += [("assistant_header", i, gen[len(prev):]), ("assistant", i, body),
                       ("assistant_tail", i, tail)]
        else:
            pieces.append((m["role"], i, full[len(prev):]))
        prev = full
    if add_generation_prompt:
        gen = text(len(msgs), True)
        if not gen.startswith(prev):
            raise _not_prefix(template, "the generation prompt does not extend the conversation")
        pieces.append(("generation_prompt", None, gen[len(prev):]))
        prev = gen

    segments = [Segment(kind, idx, t, encode(tokenizer, t)) for kind, idx, t in pieces if t]
    ids = [i for s in segments for i in s.token_ids]
    return Rendered(text=prev, token_ids=ids, segments=segments)


def render_for_training(template: str, messages: Any, tokenizer: Tokenizer,
                        train_on_inputs: bool = False,
                        special_tokens: dict[str, str] | None = None,
                        ) -> tuple[list[int], list[int]]:
    """(token ids, labels): labels are the ids of every assistant body (content + end-of-turn
    token) and IGNORE_INDEX elsewhere; with `train_on_inputs`, every token is labelled."""
    specials = special_tokens if special_tokens is not None else special_tokens_of(tokenizer)
    _, found = _stops(template, tokenizer, tuple(sorted(specials.items())))
    if not found:
        _warn_no_end_of_turn(template)
    r = render(template, messages, tokenizer, add_generation_prompt=False,
               special_tokens=specials)
    labels: list[int] = []
    for s in r.segments:
        keep = train_on_inputs or s.kind == "assistant"
        labels += s.token_ids if keep else [IGNORE_INDEX] * len(s.token_ids)
    return r.token_ids, labels


@functools.lru_cache(maxsize=64)
def _warn_no_end_of_turn(template: str) -> None:
    # lru_cache makes this warn once per template.
    msg = (f"chat template {template_label(template)} emits no end-of-turn token after the "
           "assistant content: the model will not learn to stop; generation will rely on the "
           "eos token or max_tokens")
    warnings.warn(msg, stacklevel=3)
    log.warning(msg)


_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "LORAPLEXPROBE"}]


@functools.lru_cache(maxsize=64)
def _stops_cached(template: str, tok_id: int, specials: tuple[tuple[str, str], ...]
                  ) -> tuple[list[str], bool]:
    tokenizer = _TOKS[tok_id]
    sp = dict(specials)
    gen = _render_text(template, _PROBE[:1], True, sp)
    full = _render_text(template, _PROBE, False, sp)
    after = full[len(gen):] if full.startswith(gen) else full
    pos = after.rfind("LORAPLEXPROBE")
    after = after[pos + len("LORAPLEXPROBE"):] if pos >= 0 else ""
    hits = [(after.find(t), t) for t in added_tokens(tokenizer) if t and t in after]
    eos = sp.get("eos_token")
    if hits:
        eot = min(hits)[1]
        return ([eot] + ([eos] if eos and eos != eot else [])), True
    return ([eos] if eos else []), False


_TOKS: dict[int, Tokenizer] = {}


def _stops(template: str, tokenizer: Tokenizer, specials: tuple[tuple[str, str], ...]
           ) -> tuple[list[str], bool]:
    """(stop tokens, whether the template itself emits an end-of-turn token)."""
    _TOKS[id(tokenizer)] = tokenizer
    stops, found = _stops_cached(template, id(tokenizer), specials)
    return list(stops), found


def stop_tokens(template: str, tokenizer: Tokenizer,
                special_tokens: dict[str, str] | None = None) -> list[str]:
    """The token(s) that end an assistant turn in this template, first the one the template
    writes after the content (<|im_end|> for ChatML, the eos for Llama-2/Alpaca), then the
    tokenizer's eos if different. Found by rendering a probe conversation."""
    specials = special_tokens if special_tokens is not None else special_tokens_of(tokenizer)
    return _stops(template, tokenizer, tuple(sorted(specials.items())))[0]


def stop_token_ids(template: str, tokenizer: Tokenizer,
                   special_tokens: dict[str, str] | None = None) -> list[int]:
    """`stop_tokens` as single token ids (stop strings that are not one token are skipped)."""
    out = []
    for t in stop_tokens(template, tokenizer, special_tokens):
        i = tokenizer.token_to_id(t)
        if i is not None and i not in out:
            out.append(i)
    return out
