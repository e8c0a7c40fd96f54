"""`loraplex render`: chat messages in, the exact prompt text and token ids out, as JSON lines.

The same `loraplex.adapters.chat` rendering the trainer and the server use, for scripts: what
would the server send to the engine for these messages, what would the trainer train on? Only
JSON lines go to stdout (one per input line, in order); logs and warnings go to stderr.
The tokenizer is loaded inside the command, so importing this module stays light.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import IO, Any

DESCRIPTION = """\
Read JSON lines {"messages": [...], "add_generation_prompt": true|false} (stdin, or --input
FILE) and write one JSON line per input line to stdout, in the same order:

  {"text": ..., "token_ids": [...], "stop_tokens": [...]}                 rendered
  {"text": ..., "token_ids": [...], "labels": [...], "stop_tokens": [...]} with --train
  {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}      not rendered

"messages" holds OpenAI-style {"role", "content"} objects; "add_generation_prompt" defaults to
true (the assistant header a server prompt ends with). With --train the whole conversation is
rendered as the trainer sees it (add_generation_prompt is ignored) and "labels" has the token id
where the loss is taken (assistant turns) and -100 elsewhere. Other keys are ignored.

A line the template refuses (e.g. a role it does not support) or that is not a JSON object with
"messages" (bad JSON, a blank line) gets an error line, shaped like the server's OpenAI errors,
and the next line is rendered as usual. Nothing but these lines is written to stdout."""

EPILOG = """\
exit status: 0 when every input line got its output line (error lines included); 2 when the
command could not start (an unknown --model, an unreadable --chat-template or --input); 1 when
stdout was closed early.

examples:
  echo '{"messages": [{"role": "user", "content": "hi"}]}' | loraplex render --model ./toy
  loraplex render --model ./toy --chat-template llama2 --train --input data.jsonl
  loraplex render --model ./toy --chat-template ./out/support < conversations.jsonl
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render", help="render chat messages to prompt text and token ids (JSON lines)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR_OR_ID",
                   help="base model: a local Hugging Face directory or a hub id (its tokenizer "
                   "and, by default, its chat template)")
    p.add_argument("--chat-template", metavar="SPEC",
                   help="a built-in (chatml, llama2, alpaca), a .jinja file, or an adapter "
                   "directory (its own template); default: the model's template")
    p.add_argument("--train", action="store_true",
                   help="render whole conversations as the trainer does and add \"labels\"")
    p.add_argument("--input", metavar="FILE", type=Path,
                   help="read JSON lines from FILE instead of stdin ('-': stdin)")
    p.set_defaults(func=_render)


def _template_of(spec: str | None, model_dir: Path) -> str:
    """--chat-template as text: an adapter directory's own template, else chat.resolve_template."""
    from loraplex.adapters.chat import BUILTIN_TEMPLATES, resolve_template
    from loraplex.adapters.errors import ConfigError
    from loraplex.adapters.fingerprint import read_chat_template

    if spec and spec not in BUILTIN_TEMPLATES and Path(spec).expanduser().is_dir():
        # The registry reads an adapter's template the same way when it is pushed.
        template, _ = read_chat_template(Path(spec).expanduser())
        if template is None:
            raise ConfigError(f"adapter directory {spec!r} has no chat template "
                              "(chat_template.jinja or tokenizer_config.json)",
                              param="chat_template")
        return template
    return resolve_template(spec or None, model_dir)


def _error(message: str) -> dict:
    from loraplex.adapters.errors import BadRequest

    return BadRequest(message).to_openai()


def _one(raw: bytes, lineno: int, template: str, tok: Any, stops: list[str], train: bool) -> dict:
    """The output object for one input line (an error object instead of raising)."""
    from loraplex.adapters.chat import render, render_for_training
    from loraplex.adapters.errors import LoraplexError

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _error(f"line {lineno}: not UTF-8 ({exc.reason} at byte {exc.start})")
    if not line.strip():
        return _error(f"line {lineno}: empty line; expected a JSON object with \"messages\"")
    try:
        req = json.loads(line)
    except json.JSONDecodeError as exc:
        return _error(f"line {lineno}: invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(req, dict):
        return _error(f"line {lineno}: expected a JSON object with \"messages\", got a "
                      f"{type(req).__name__}")
    if "messages" not in req:
        return _error(f"line {lineno}: no \"messages\" (keys: {', '.join(sorted(req)) or 'none'})")
    agp = req.get("add_generation_prompt", True)
    if not isinstance(agp, bool):
        return _error(f"line {lineno}: \"add_generation_prompt\" must be true or false, "
                      f"not {agp!r}")
    try:
        if train:
            t = render_for_training(template, req["messages"], tok)
            return {"text": t.text, "token_ids": list(t.token_ids), "labels": list(t.labels),
                    "stop_tokens": stops}
        r = render(template, req["messages"], tok, add_generation_prompt=agp)
        return {"text": r.text, "token_ids": list(r.token_ids), "stop_tokens": stops}
    except LoraplexError as exc:  # the template refused the conversation, or bad messages
        return exc.to_openai()


def _lines(path: Path | None) -> contextlib.AbstractContextManager[IO[bytes]]:
    if path is None or str(path) == "-":
        return contextlib.nullcontext(sys.stdin.buffer)
    from loraplex.adapters.errors import BadRequest

    try:
        return path.expanduser().open("rb")
    except OSError as exc:
        raise BadRequest(f"cannot read --input {str(path)!r}: {exc.strerror}",
                         param="input") from None


def _render(args: argparse.Namespace) -> int:
    out = sys.stdout
    # Anything a library prints while we run goes to stderr: stdout carries JSON lines only.
    with contextlib.redirect_stdout(sys.stderr):
        from loraplex.adapters.chat import load_tokenizer
        from loraplex.adapters.models import resolve_model

        model_dir = resolve_model(args.model)
        tok = load_tokenizer(model_dir)
        template = _template_of(args.chat_template, model_dir)
        stops = list(tok.stop_tokens(template))
        # Non-ASCII text as is where stdout is UTF-8, \u escapes where it is not.
        ascii_only = (getattr(out, "encoding", None) or "").lower().replace("-", "") != "utf8"
        with _lines(args.input) as f:
            try:
                for lineno, raw in enumerate(f, 1):
                    obj = _one(raw, lineno, template, tok, stops, args.train)
                    out.write(json.dumps(obj, ensure_ascii=ascii_only) + "\n")
                    out.flush()
            except BrokenPipeError:
                # The reader went away (e.g. `| head`): stop quietly, and keep Python's
                # exit-time flush from failing on the closed pipe again.
                import os

                os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
                return 1
    return 0
