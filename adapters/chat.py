"""Chat rendering: the one module the trainer and the server both use to turn messages into ids.

    tok = load_tokenizer(base_dir)                        # ChatTokenizer, cached per directory
    tpl = resolve_template("chatml", base_dir)            # built-in name, .jinja file, or None
    r = render(tpl, messages, tok)                        # Rendered(text, token_ids): the prompt
    t = render_for_training(tpl, messages, tok)           # TrainingRender(..., labels, spans, cuts)
    tok.stop_tokens(tpl)                                  # e.g. ["<|im_end|>"]

Templates run in a sandboxed Jinja environment with Hugging Face semantics (trim_blocks,
lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`, `{% generation %}`, the tokenizer's
special tokens as variables), and the rendered text is tokenized AS A WHOLE by the tokenizer
pipeline transformers itself builds for the model directory. So the ids the server sends are
those of `apply_chat_template(messages, tokenize=True, add_generation_prompt=True)`, which is
also what vLLM's own server sends, on every tokenizer family (SentencePiece-style tokenizers add
a `▁` at the start of each encode call, so a turn-by-turn encoding would be wrong there).

Training labels come from character spans of the rendered text (docs/rendering.md):
- with `{% generation %}` markers in the template: exactly the marked spans (HF's
  `return_assistant_tokens_mask` semantics);
- otherwise, per assistant message: from the end of the generation prompt the server would send
  for that turn (or, for a template that is not prefix-stable there, from the content minus the
  whitespace the template put before it) to the end of the end-of-turn token written after the
  content. Where the content is, is found by rendering the conversation once more with each
  assistant content replaced by a unique marker, so templates that fold or move messages
  (Mistral v0.3, Phi-3) render as they are.
- The boundary rule: the training ids are the whole-text ids, except where a token would merge
  across the start of a label span (a "\\n" + "\\n" merge in byte-level BPE, "assistant: " +
  "cat"). There the text is cut: the ids before the cut are exactly the prompt ids the server
  sends, the answer starts a new token, and `TrainingRender.cuts` counts the cuts.

No torch or transformers at import time: the server imports this module on every request path
(transformers is imported lazily, once per tokenizer load).
"""

from __future__ import annotations

import bisect
import contextvars
import functools
import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from loraplex.adapters.errors import BadRequest, ConfigError
from loraplex.adapters.fingerprint import read_chat_template, read_json

log = logging.getLogger(__name__)

BUILTIN_TEMPLATES = ("chatml", "llama2", "alpaca", "hermes")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "mask_token")
ROLES = ("system", "developer", "user", "assistant", "tool")
# Names the renderer itself passes to a template; `chat_template_kwargs` may not override them.
_RESERVED_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt",
                              "chat_template", "tokenize", *_SPECIAL_KEYS})
IGNORE_INDEX = -100  # the label of tokens the loss skips (PyTorch's cross_entropy default)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# -- the tokenizer ---------------------------------------------------------------------------

class ChatTokenizer:
    """A base model's tokenizer as the chat renderer needs it: the encoding pipeline, the
    special tokens templates see as variables, and per-template stop tokens.

    `tokenizer` is the `tokenizers.Tokenizer` that transformers builds for the directory
    (`AutoTokenizer(...).backend_tokenizer`): transformers may rebuild a family's pre-tokenizer
    from its tokenizer_config (Llama's `legacy` / `add_prefix_space`), and vLLM tokenizes with
    transformers, so this is the pipeline whose ids must be matched.
    """

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, Any], source: str = ""):
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.source = source
        decoder = tokenizer.get_added_tokens_decoder()
        self.added_tokens = [t.content for _, t in sorted(decoder.items()) if t.content]
        self._stops: dict[str, tuple[list[str], bool]] = {}
        self._continuation: Tokenizer | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTokenizer:
        d = Path(model_dir)
        try:
            from transformers import AutoTokenizer
        except ImportError:  # the registry alone may run without transformers
            return cls._from_file(d)
        try:
            hf = AutoTokenizer.from_pretrained(str(d))
        except Exception as exc:  # noqa: BLE001 - any loader failure: say which dir and why
            if (d / "tokenizer.json").is_file():
                log.warning("transformers cannot load the tokenizer of %s (%s); using its "
                            "tokenizer.json as is", d, exc)
                return cls._from_file(d)
            raise ConfigError(f"{d}: cannot load its tokenizer ({exc}); the base model needs a "
                              "fast tokenizer (tokenizer.json)", param="model") from None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ConfigError(f"{d}: {type(hf).__name__} is a slow (Python) tokenizer; loraplex "
                              "needs a fast tokenizer (tokenizer.json)", param="model")
        tok = Tokenizer.from_str(backend.to_str())  # our own copy: no padding/truncation state
        tok.no_padding()
        tok.no_truncation()
        # What apply_chat_template passes to templates: every entry of special_tokens_map.
        specials = {k: [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v)
                    for k, v in hf.special_tokens_map.items()}
        return cls(tok, specials, str(d))

    @classmethod
    def _from_file(cls, d: Path) -> ChatTokenizer:
        file = d / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"{d}: no tokenizer.json; the base model needs a fast tokenizer "
                              "file", param="model")
        return cls(Tokenizer.from_file(str(file)), _special_tokens_from_config(d), str(d))

    # -- encoding
    def encode(self, text: str) -> list[int]:
        """Ids of `text` as `apply_chat_template` tokenizes it (templates write BOS/EOS
        themselves: no special tokens added; added tokens in the text map to their ids)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completion prompt, with the BOS the tokenizer adds (what vLLM's server does)."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, start character of each token)."""
        if not text:
            return [], []
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return enc.ids, [a for a, _ in enc.offsets]

    def _continue(self, text: str) -> tuple[list[int], list[int]]:
        """`text` tokenized as the middle of a longer text (no start-of-input `▁`): up to the
        first added token with the continuation pipeline, the rest as usual (added tokens split
        the input, so what follows one is tokenized the same wherever it stands)."""
        hits = [p for p in (text.find(t) for t in self.added_tokens) if p >= 0]
        cut = min(hits) if hits else len(text)
        if cut == 0:
            return self._offsets(text)
        if self._continuation is None:
            self._continuation = _continuation_tokenizer(self.tokenizer)
        head = self._continuation.encode(text[:cut], add_special_tokens=False)
        ids, starts = head.ids, [a for a, _ in head.offsets]
        rest_ids, rest_starts = self._offsets(text[cut:])
        return ids + rest_ids, starts + [cut + s for s in rest_starts]

    # -- stops
    def stop_tokens(self, template: str) -> list[str]:
        """The token(s) that end an assistant turn in `template`: first the added token the
        template writes right after the content (<|im_end|>, <|eot_id|>, <end_of_turn>, or the
        eos), then the tokenizer's eos if different. Found by rendering a probe conversation."""
        return list(self._stop_info(template)[0])

    def stop_token_ids(self, template: str) -> list[int]:
        out: list[int] = []
        for t in self.stop_tokens(template):
            i = self.token_to_id(t)
            if i is not None and i not in out:
                out.append(i)
        return out

    def _stop_info(self, template: str) -> tuple[list[str], bool]:
        """(stop tokens, whether the template itself writes an end-of-turn token)."""
        if template not in self._stops:
            self._stops[template] = _probe_stops(template, self)
        return self._stops[template]


def _special_tokens_from_config(model_dir: Path) -> dict[str, str]:
    p = model_dir / "tokenizer_config.json"
    out: dict[str, str] = {}
    if p.is_file():
        for key, value in read_json(p).items():
            if key in _SPECIAL_KEYS:
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and value:
                    out[key] = value
    return out


def _continuation_tokenizer(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` that adds nothing at the start of the input: no `Prepend("▁")`
    normalizer (legacy Llama-2/Mistral files), Metaspace with prepend_scheme "never", ByteLevel
    without add_prefix_space."""
    spec = json.loads(tok.to_str())

    def strip_prepend(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if node.get("type") == "Prepend":
            return None
        if node.get("type") == "Sequence":
            key = "normalizers" if "normalizers" in node else "pretokenizers"
            node[key] = [n for n in (strip_prepend(x) for x in node.get(key, [])) if n]
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
            node.pop("add_prefix_space", None)
        if node.get("type") == "ByteLevel":
            node["add_prefix_space"] = False
        return node

    spec["normalizer"] = strip_prepend(spec.get("normalizer"))
    spec["pre_tokenizer"] = strip_prepend(spec.get("pre_tokenizer"))
    spec["post_processor"] = None
    spec["padding"] = spec["truncation"] = None
    return Tokenizer.from_str(json.dumps(spec))


@functools.lru_cache(maxsize=32)
def _load(path: str) -> ChatTokenizer:
    return ChatTokenizer.from_dir(path)


def load_tokenizer(model_dir: str | Path) -> ChatTokenizer:
    """The base model's ChatTokenizer (cached per directory)."""
    return _load(str(Path(model_dir).expanduser().resolve()))


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


# While a render is tracked: [characters rendered so far, marked (start, end) spans].
_TRACK: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = \
    contextvars.ContextVar("loraplex_generation_track", default=None)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF assistant-mask markers): rendered as-is,
    and, in a tracked render, the character span of each block is recorded."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        out = caller()
        track = _TRACK.get()
        if track is not None:
            start = sum(len(b) for b in track[0])
            track[1].append((start, start + len(out)))
        return out


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


def _render_text(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                 specials: dict[str, Any], track: bool = False, tools: list[dict] | None = None,
                 extra: dict[str, Any] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(text, `{% generation %}` spans when `track`). `tools` (OpenAI tool dicts) and `extra`
    (checked `chat_template_kwargs`) are passed to the template as `apply_chat_template` does."""
    compiled = _compile(template)
    kwargs = dict(specials, **(extra or {}), messages=messages, tools=tools or None,
                  documents=None, add_generation_prompt=add_generation_prompt)
    try:
        if not track:
            return compiled.render(**kwargs), []
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        token = _TRACK.set((blocks, spans))
        try:
            for block in compiled.generate(**kwargs):
                blocks.append(block)
        finally:
            _TRACK.reset(token)
        return "".join(blocks), spans
    except jinja2.TemplateError as exc:
        raise BadRequest(f"chat template {template_label(template)} rejected the messages: {exc}",
                         param="messages") from None


@functools.lru_cache(maxsize=64)
def template_variables(template: str) -> frozenset[str]:
    """The variables a template reads from its caller (what `chat_template_kwargs` may set)."""
    env = ImmutableSandboxedEnvironment(extensions=[_GenerationTag, loopcontrols])
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(template)))


def template_kwargs(template: str, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """`chat_template_kwargs` of a request, as vLLM's server takes them: the names the
    renderer sets itself are refused (400), names the template never reads are dropped (clients
    send e.g. `enable_thinking` to every model), the rest pass through."""
    if not kwargs:
        return {}
    bad = sorted(set(kwargs) & _RESERVED_KWARGS)
    if bad:
        raise BadRequest(f"chat_template_kwargs may not set {', '.join(bad)}: send them as "
                         "request fields (messages, tools) instead", param="chat_template_kwargs")
    used = template_variables(template)
    return {k: v for k, v in kwargs.items() if k in used}


# -- messages ------------------------------------------------------------------------------------

def validate_messages(messages: Any, template: str | None = None) -> list[dict[str, Any]]:
    """OpenAI chat messages -> the dicts a chat template sees, as vLLM's server builds them:
    text content parts joined with newlines, `content: null` as "", an assistant's
    `tool_calls` with their JSON `arguments` parsed to objects (HF templates expect dicts),
    a tool result's `tool_call_id` and any `name` kept, and, when the `template` does not
    know the `developer` role, developer messages as one leading system message."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object with role and content", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"{where}.role {role!r} is not supported; use one of "
                             f"{', '.join(ROLES)}", param=f"{where}.role")
        msg: dict[str, Any] = {"role": role, "content": _content_text(m.get("content"), where,
                                                                      nullable=role == "assistant")}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise BadRequest(f"{where} (role tool) needs tool_call_id: the id of the "
                                 "assistant's tool call it answers", param=f"{where}.tool_call_id")
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    if template is not None and any(m["role"] == "developer" for m in out) \
            and not re.search(r"[\"']developer[\"']", template):
        out = _developer_as_system(out)
    return out


def _content_text(content: Any, where: str, nullable: bool) -> str:
    if content is None and nullable:  # an assistant turn that only calls tools
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise BadRequest(f"{where}.content[{j}] must be a text part "
                                 '({"type": "text", "text": ...})', param=f"{where}.content[{j}]")
            parts.append(part["text"])
        content = "\n".join(parts)  # vLLM's server joins text parts with newlines
    if not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or a list of text parts",
                         param=f"{where}.content")
    if not is_encodable(content):
        raise BadRequest(f"{where}.content holds a lone UTF-16 surrogate (an unpaired "
                         "\\ud800-\\udfff escape), which is not text: send valid Unicode",
                         param=f"{where}.content")
    return content


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise BadRequest(f"{where} must be a list of tool calls", param=where)
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or c.get("type", "function") != "function" \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"{where}[{j}] must be {{\"type\": \"function\", \"function\": "
                             "{\"name\": ..., \"arguments\": \"{...}\"}}", param=f"{where}[{j}]")
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                # As vLLM: a model's malformed call stays in the history of every later turn,
                # so refusing it would make the conversation unrecoverable.
                log.warning("%s[%d].function.arguments is not JSON; sent as {}", where, j)
                args = {}
        if not isinstance(args, dict):
            args = {}
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def _developer_as_system(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's `developer` role is the newer name of `system`; for a template that only
    knows system, all system and developer contents become one leading system message
    (templates refuse a system message after the first turn), as vLLM's server does."""
    system = [m["content"] for m in msgs if m["role"] in ("system", "developer") and m["content"]]
    rest = [m for m in msgs if m["role"] not in ("system", "developer")]
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + rest


def is_encodable(text: str) -> bool:
    """False for strings holding lone surrogates (JSON lets "\\ud800" through; no tokenizer or
    UTF-8 stream can carry it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- rendering -----------------------------------------------------------------------------------

@dataclass
class Rendered:
    text: str
    token_ids: list[int]


@dataclass
class TrainingRender:
    text: str
    token_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]]  # labelled character spans of `text`, one per assistant turn
    cuts: int = 0  # label-span starts where the boundary rule cut a merged token
    # Messages whose content the template did not write (Mistral v0.3 drops the system prompt
    # of a conversation that ends with an assistant turn): the model never sees them.
    dropped: list[int] = field(default_factory=list)


def render(template: str, messages: Any, tok: ChatTokenizer, *,
           add_generation_prompt: bool = True, tools: list[dict] | None = None,
           kwargs: dict[str, Any] | None = None) -> Rendered:
    """The prompt: the whole rendered text tokenized at once, as `apply_chat_template` does.
    `tools`: OpenAI tool definitions for the template; `kwargs`: a request's
    `chat_template_kwargs` (see `template_kwargs`)."""
    msgs = validate_messages(messages, template)
    text, _ = _render_text(template, msgs, add_generation_prompt, tok.special_tokens,
                           tools=tools, extra=template_kwargs(template, kwargs))
    if not text:
        raise BadRequest(f"chat template {template_label(template)} renders these messages to "
                         "an empty prompt; add a user message", param="messages")
    return Rendered(text, tok.encode(text))


def render_for_training(template: str, messages: Any, tok: ChatTokenizer,
                        train_on_inputs: bool = False,
                        tools: list[dict] | None = None) -> TrainingRender:
    """Token ids and labels of a whole conversation (see the module doc for spans and cuts);
    with `train_on_inputs`, every token is labelled. `tools` (OpenAI tool definitions) reach
    the template in every render, as in `render`; they are never labelled."""
    msgs = validate_messages(messages, template)
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRequest("a training conversation needs at least one assistant message",
                         param="messages")
    if tools and "tools" not in template_variables(template):
        raise BadRequest(f"chat template {template_label(template)} does not read `tools`: the "
                         "tool definitions would not be in the prompt; use a template with tool "
                         "support (e.g. hermes)", param="chat_template")
    marked = bool(_GENERATION_TAG.search(template))
    text, spans = _render_text(template, msgs, False, tok.special_tokens, track=marked,
                               tools=tools)
    if not marked:
        if not tok._stop_info(template)[1]:
            _warn_no_end_of_turn(template)
        spans = _assistant_spans(template, msgs, text, tok, tools)
    _check_calls_labelled(template, msgs, text, spans)
    ids, starts, cuts = _tokenize_at(tok, text, [s for s, e in spans if e > s])
    if train_on_inputs:
        labels = list(ids)
    else:
        labels = [i if any(s <= c < e for s, e in spans) else IGNORE_INDEX
                  for i, c in zip(ids, starts)]
    dropped = [i for i, m in enumerate(msgs) if m["content"].strip()
               and m["content"].strip() not in text]
    return TrainingRender(text, ids, labels, spans, cuts, dropped)


def _tokenize_at(tok: ChatTokenizer, text: str, bounds: list[int]
                 ) -> tuple[list[int], list[int], int]:
    """(ids, start character of each id, cuts): the whole-text ids, unless the ids of the
    tokens that start before a boundary differ from the ids of the text before it (a token
    merged across it); then the text is cut at those boundaries (the boundary rule)."""
    ids, starts = tok._offsets(text)
    dirty = [b for b in bounds if 0 < b < len(text)
             and ids[:bisect.bisect_left(starts, b)] != tok.encode(text[:b])]
    if not dirty:
        return ids, starts, 0
    out_ids, out_starts = tok._offsets(text[:dirty[0]])
    for a, b in zip(dirty, dirty[1:] + [len(text)]):
        piece_ids, piece_starts = tok._continue(text[a:b])
        out_ids += piece_ids
        out_starts += [a + s for s in piece_starts]
    return out_ids, out_starts, len(dirty)


def _check_calls_labelled(template: str, msgs: list[dict[str, Any]], text: str,
                          spans: list[tuple[int, int]]) -> None:
    """Every tool call's name must be in the labelled text: a template without tool support
    (ChatML writes only the content) would otherwise train an empty answer in its place."""
    labelled = "\0".join(text[s:e] for s, e in spans)
    for i, m in enumerate(msgs):
        for j, call in enumerate(m.get("tool_calls") or []):
            if call["function"]["name"] not in labelled:
                raise BadRequest(f"chat template {template_label(template)} does not write "
                                 f"messages[{i}].tool_calls[{j}] ({call['function']['name']}) "
                                 "into the assistant's turn, so the model would not learn the "
                                 "call; use a template with tool support (e.g. hermes)",
                                 param="chat_template")


def _calls_only(m: dict[str, Any]) -> bool:
    """An assistant turn that only calls tools (OpenAI `content: null`)."""
    return m["role"] == "assistant" and bool(m.get("tool_calls")) and not m["content"]


def _assistant_spans(template: str, msgs: list[dict[str, Any]], text: str,
                     tok: ChatTokenizer, tools: list[dict] | None = None
                     ) -> list[tuple[int, int]]:
    """(start, end) characters of each assistant turn's labels (see the module doc).

    A turn with tool calls is labelled whole, calls included: from the end of its generation
    prompt to the end-of-turn token that closes it. A turn that only calls tools has no
    content to find, so its generation prompt must be a prefix of the text (it is for
    ChatML/Hermes, Llama 3.1, Mistral); otherwise the row is refused with a pointer to
    `{% generation %}` markers."""
    stops, found = tok._stop_info(template)
    eot = stops[0] if found and stops else None
    spans: list[tuple[int, int]] = []
    prev_end = 0
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for i, where in zip(turns, _content_spans(template, msgs, text, tok, tools)):
        try:
            gen, _ = _render_text(template, msgs[:i], True, tok.special_tokens, tools=tools)
        except BadRequest:  # e.g. a template that refuses a conversation ending in a user turn
            gen = None
        stable = gen is not None and text.startswith(gen) and prev_end <= len(gen)
        if where is None:  # tool calls only: the answer starts where the served prompt ends
            if not stable:
                raise BadRequest(f"chat template {template_label(template)} does not render "
                                 f"messages[{i}] (an assistant turn that only calls tools) after "
                                 "the prompt the server would send for it, so the tokens to train "
                                 "on cannot be found; mark them with {% generation %}",
                                 param="chat_template")
            where = (len(gen), len(gen))
        cs, ce = where
        if stable and len(gen) <= cs:
            start = len(gen)
        else:
            # Not prefix-stable here: the content plus the whitespace the template put before it
            # that a generation prompt would not have ended with (Mistral's " " + content).
            before = text[:cs]
            ws = len(before) - len(before.rstrip())
            gws = len(gen) - len(gen.rstrip()) if gen else 0
            start = max(prev_end, cs - max(0, ws - gws))
        end = _turn_end(template, msgs, i, text, ce, eot, tok, tools) if eot else ce
        spans.append((start, end))
        prev_end = end
    return spans


def _turn_end(template: str, msgs: list[dict[str, Any]], i: int, text: str, ce: int, eot: str,
              tok: ChatTokenizer, tools: list[dict] | None) -> int:
    """The end of the end-of-turn token that closes assistant message `i`, whose content ends
    at `ce`: the first `eot` after the content, if only whitespace comes before it, or, when the
    template wrote more of this turn first (its tool calls), if it still lies in the text the
    template writes for the conversation up to this message (before the next message's text).
    Otherwise `ce`: the turn has no end-of-turn token of its own."""
    at = text.find(eot, ce)
    if at < 0:
        return ce
    if not text[ce:at].strip():
        return at + len(eot)
    try:
        through, _ = _render_text(template, msgs[:i + 1], False, tok.special_tokens, tools=tools)
    except BadRequest:
        return ce
    limit = 0
    for a, b in zip(through, text):
        if a != b:
            break
        limit += 1
    return at + len(eot) if at + len(eot) <= limit else ce


def _content_spans(template: str, msgs: list[dict[str, Any]], text: str,
                   tok: ChatTokenizer, tools: list[dict] | None = None
                   ) -> list[tuple[int, int] | None]:
    """Where each assistant message's content lands in `text` (None for a turn that only calls
    tools: `_assistant_spans` places it): render once more with each content replaced by a
    unique marker, then read the text between the literal pieces. Tool-call-only turns keep
    their empty content in that render (a marker would change what the template writes: Qwen
    writes "\\n" + content before the calls only when there is content)."""
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    content_turns = [i for i in turns if not _calls_only(msgs[i])]
    marks = [f"\ue000LPX{k}\ue001" for k in range(len(content_turns))]  # private-use: never real
    probe = [dict(m) for m in msgs]
    for k, i in enumerate(content_turns):
        probe[i]["content"] = marks[k]
    found: dict[int, tuple[int, int]] = {}
    try:
        ptext, _ = _render_text(template, probe, False, tok.special_tokens, tools=tools)
    except BadRequest:
        ptext = ""
    if ptext and all(ptext.count(mk) == 1 for mk in marks):
        pieces = re.split("|".join(map(re.escape, marks)), ptext) if marks else [ptext]
        order = [ptext.index(mk) for mk in marks]
        if order == sorted(order) and text.startswith(pieces[0]) and text.endswith(pieces[-1]):
            pos, ok = len(pieces[0]), True
            for k, i in enumerate(content_turns):
                if k == len(content_turns) - 1:
                    end = len(text) - len(pieces[-1])
                else:
                    end = text.find(pieces[k + 1], pos) if pieces[k + 1] else -1
                if end < pos:
                    ok = False
                    break
                found[i] = (pos, end)
                pos = end + len(pieces[k + 1])
            if ok:
                return [found.get(i) for i in turns]
    # The template treats the marker differently from the content (it parses it): find the
    # content itself, in order.
    found, pos = {}, 0
    for i in content_turns:
        content = msgs[i]["content"]
        needle = content if content and content in text[pos:] else content.strip()
        at = text.find(needle, pos) if needle else -1
        if at < 0:
            raise BadRequest(f"chat template {template_label(template)} does not write "
                             f"messages[{i}] (assistant) into the text as given, so the tokens "
                             "to train on cannot be found; mark them with {% generation %}",
                             param="chat_template")
        found[i] = (at, at + len(needle))
        pos = at + len(needle)
    return [found.get(i) for i in turns]


@functools.lru_cache(maxsize=64)
def _warn_no_end_of_turn(template: str) -> None:
    # lru_cache makes this warn once per template.
    msg = (f"chat template {template_label(template)} emits no end-of-turn token after the "
           "assistant content: the model will not learn to stop; generation will rely on the "
           "eos token or max_tokens")
    warnings.warn(msg, stacklevel=3)
    log.warning(msg)


_PROBE_MARK = "\ue000LORAPLEXPROBE\ue001"


def _probe_stops(template: str, tok: ChatTokenizer) -> tuple[list[str], bool]:
    eos = tok.special_tokens.get("eos_token")
    try:
        full, _ = _render_text(template, [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": _PROBE_MARK}],
                               False, tok.special_tokens)
    except BadRequest:
        full = ""
    pos = full.find(_PROBE_MARK)
    after = full[pos + len(_PROBE_MARK):] if pos >= 0 else ""
    hits = [(after.find(t), t) for t in tok.added_tokens if t.strip() and t in after]
    if hits:
        eot = min(hits)[1]
        return [eot] + ([eos] if eos and eos != eot else []), True
    return ([eos] if eos else []), False
