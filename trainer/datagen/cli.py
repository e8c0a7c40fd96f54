"""`loraplex data generate` and `loraplex data filter`.

Heavy or network imports (openai, datasketch, tqdm) happen inside the commands, so
`loraplex --help` stays fast. `python -m loraplex.trainer.datagen.cli data ...` runs the same
commands without the other entry points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from loraplex.trainer.datagen.prompts import EVOL_OPS, METHODS

DESCRIPTION = """\
Build instruction data through any OpenAI-compatible endpoint (a loraplex server's base or an
adapter by default), then filter it. `generate` writes OUTPUT/raw.jsonl as it goes (append-only:
run the same command again to continue a stopped or killed run) and, at the end, the filtered
OUTPUT/data.jsonl (train on this file), OUTPUT/dropped.jsonl and OUTPUT/report.json.
`filter` runs the same filter on any instruction data the trainer reads. See docs/data.md."""

EPILOG = """\
examples:
  loraplex data generate --method self-instruct -n 200 --model words --output out/si
  loraplex data generate --method evol-instruct --input prompts.jsonl --rounds 2 --output out/evol
  LORAPLEX_DATA_API_KEY=... loraplex data generate --method distill --input prompts.txt \\
      --url http://gpu-box:8000/v1 --model words:prod --eval heldout.jsonl --output out/distill
  loraplex data filter a.jsonl b.jsonl --eval heldout.jsonl --output clean.jsonl
"""


OFF = "off"


def _threshold(value: str) -> float | str:
    if value.lower() in ("off", "none"):
        return OFF
    x = float(value)
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError("a threshold is in (0, 1], or off")
    return x


def _limit(value: str) -> int | None:
    return None if value.lower() in ("off", "none") else int(value)


def _filter_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("filter")
    g.add_argument("--eval", action="append", type=Path, default=[], metavar="FILE",
                   help="eval data (any trainer format, or JSON lines of strings): rows sharing "
                   "an n-gram with it are dropped (repeatable)")
    g.add_argument("--ngram", type=int, default=13, help="contamination n-gram size in words "
                   "(default 13, as GPT-3's analysis; lower it for short rows)")
    g.add_argument("--min-ngram", type=int, default=8, help="eval texts shorter than --ngram "
                   "but at least this many words are matched whole (default 8)")
    g.add_argument("--rouge-threshold", type=_threshold, metavar="X|off",
                   help="drop an instruction whose ROUGE-L with a kept one is >= X (default 0.7; "
                   "off for generate's evol-instruct and distill, whose rows descend from "
                   "one another or from chosen prompts)")
    g.add_argument("--near-dup-threshold", type=_threshold, default=0.8, metavar="X|off",
                   help="MinHash LSH near-duplicates: Jaccard of word 3-shingles >= X (default 0.8)")
    g.add_argument("--min-instruction-words", type=int, default=3)
    g.add_argument("--max-instruction-words", type=int, default=150)
    g.add_argument("--min-answer-words", type=int, default=1)
    g.add_argument("--max-answer-words", type=_limit, default=2000, metavar="N|off")
    g.add_argument("--keep-refusals", action="store_true",
                   help="keep answers that look like refusal boilerplate")
    g.add_argument("--keep-truncated", action="store_true",
                   help="keep answers the teacher cut at --max-tokens")
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate instruction data through an OpenAI endpoint; "
                       "filter it", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    filt = _filter_options()

    g = verbs.add_parser("generate", parents=[filt], help="build a dataset with a teacher model",
                         description=DESCRIPTION, epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--method", required=True, choices=METHODS)
    g.add_argument("--input", "-i", action="append", type=Path, default=[], metavar="FILE",
                   help="prompts (distill), seed prompts (evol-instruct) or seed tasks "
                   "(self-instruct; default: the bundled seed_tasks.alpaca.jsonl): .txt, one per "
                   "line, or trainer data (messages/conversations without the answer, Alpaca, "
                   "{\"prompt\"}); repeatable")
    g.add_argument("--output", "-o", required=True, type=Path, metavar="DIR")
    g.add_argument("-n", "--num", type=int, help="self-instruct: instructions to make (default "
                   "100); distill, evol-instruct: use the first N prompts (default all)")
    g.add_argument("--rounds", type=int, default=1, help="evol-instruct: rewrites per prompt, "
                   "each of the one before")
    g.add_argument("--ops", default=",".join(EVOL_OPS),
                   help=f"evol-instruct: operations to draw from (default {','.join(EVOL_OPS)})")
    g.add_argument("--examples", type=int, default=8,
                   help="self-instruct: tasks shown per request (default 8)")
    s = g.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=512, help="answers (default 512)")
    s.add_argument("--temperature", type=float, default=0.0, help="answers (default 0)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--instruction-max-tokens", type=int, default=256,
                   help="task lists and rewrites (default 256)")
    s.add_argument("--instruction-temperature", type=float, default=0.7,
                   help="task lists and rewrites (default 0.7)")
    s.add_argument("--seed", type=int, default=0, help="sampling of examples and operations; "
                   "each request's seed derives from it")
    s.add_argument("--system", help="a system prompt for the answers")
    t = g.add_argument_group("teacher (also LORAPLEX_DATA_* variables; flags win)")
    t.add_argument("--url", help="OpenAI-compatible base URL (default http://127.0.0.1:8000/v1)")
    t.add_argument("--model", help="served name: the base, an adapter (name, name@3, name:prod) "
                   "or any model of the endpoint (default: base)")
    t.add_argument("--api-key-env", metavar="NAME",
                   help="read the API key from this variable (default: LORAPLEX_DATA_API_KEY)")
    t.add_argument("--concurrency", type=int, help="requests in flight (default 8)")
    t.add_argument("--max-retries", type=int, help="per request (default 6)")
    t.add_argument("--timeout", type=float, dest="timeout_s", help="seconds per request")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (there is none "
                   "when stderr is not a terminal)")
    g.add_argument("--no-filter", action="store_true", help="stop after raw.jsonl")
    g.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: stop as if killed
    g.set_defaults(func=cmd_generate)

    f = verbs.add_parser("filter", parents=[filt], help="drop duplicates, near-duplicates, "
                         "eval overlaps and bad rows; report why")
    f.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                   help="files or directories of trainer data")
    f.add_argument("--output", "-o", required=True, type=Path, help="kept rows (JSON lines)")
    f.add_argument("--report", type=Path, help="default: OUTPUT with .report.json")
    f.add_argument("--dropped", type=Path, help="default: OUTPUT with .dropped.jsonl")
    f.set_defaults(func=cmd_filter)


def filter_config(args: argparse.Namespace, rouge_default: float | None = 0.7) -> Any:
    from loraplex.trainer.datagen.filter import FilterConfig

    def threshold(value: float | str | None, default: float | None) -> float | None:
        return default if value is None else None if value == OFF else float(value)

    return FilterConfig(
        min_instruction_words=args.min_instruction_words,
        max_instruction_words=args.max_instruction_words,
        min_answer_words=args.min_answer_words, max_answer_words=args.max_answer_words,
        drop_refusals=not args.keep_refusals, drop_truncated=not args.keep_truncated,
        near_dup_threshold=threshold(args.near_dup_threshold, None),
        rouge_threshold=threshold(args.rouge_threshold, rouge_default),
        eval_files=list(args.eval), ngram=args.ngram, min_ngram=args.min_ngram)


def load_settings(args: argparse.Namespace) -> Any:
    """DataSettings from flags over LORAPLEX_DATA_* variables; ConfigError naming the option."""
    from pydantic import ValidationError

    from loraplex.adapters.errors import ConfigError
    from loraplex.trainer.datagen.settings import DataSettings

    given = {k: getattr(args, k, None) for k in DataSettings.model_fields}
    given = {k: v for k, v in given.items() if v is not None}
    try:
        return DataSettings(**given)
    except ValidationError as exc:
        e = exc.errors()[0]
        name = str(e["loc"][0]) if e["loc"] else "api_key_env"
        flag = "--timeout" if name == "timeout_s" else "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} / LORAPLEX_DATA_{name.upper()}: {e['msg']}",
                          param=name) from None


def cmd_generate(args: argparse.Namespace) -> int:
    import asyncio

    from loraplex.trainer.datagen.client import Teacher
    from loraplex.trainer.datagen.filter import filter_files, summary
    from loraplex.trainer.datagen.generate import GenerateJob, GenParams, generate
    from loraplex.trainer.datagen.journal import RAW

    settings = load_settings(args)
    cfg = filter_config(args, rouge_default=0.7 if args.method == "self-instruct" else None)
    job = GenerateJob(
        method=args.method, output_dir=args.output, inputs=list(args.input), n=args.num,
        rounds=args.rounds, ops=[o.strip() for o in args.ops.split(",") if o.strip()],
        examples=args.examples, min_instruction_words=cfg.min_instruction_words,
        max_instruction_words=cfg.max_instruction_words, rouge_threshold=cfg.rouge_threshold,
        params=GenParams(max_tokens=args.max_tokens, temperature=args.temperature,
                         top_p=args.top_p, instruction_max_tokens=args.instruction_max_tokens,
                         instruction_temperature=args.instruction_temperature, seed=args.seed,
                         system=args.system),
        stop_after=args.stop_after, progress=not args.no_progress and sys.stderr.isatty())
    teacher = Teacher(settings)
    stats = asyncio.run(generate(job, teacher))
    gen = {**stats.as_dict(), "client": teacher.stats.as_dict()}
    failed = sum(stats.failed.values())

    def counts(c: Any) -> str:
        return f"{sum(c.values())}" + (f" ({', '.join(f'{k}: {v}' for k, v in c.items())})"
                                       if c else "")

    print(f"generate: {stats.written} new rows, {stats.resumed} already done, "
          f"{counts(stats.skipped)} eliminated, {counts(stats.failed)} failed; "
          f"{teacher.stats.requests} requests, {counts(teacher.stats.retries)} retries",
          file=sys.stderr)
    if stats.proposed:
        print(f"  self-instruct: {stats.proposed} instructions proposed, "
              f"{counts(stats.rejected)} not pooled", file=sys.stderr)
    if stats.stopped:
        print(f"  stopped ({stats.stopped}); run the same command again to continue",
              file=sys.stderr)
    if failed or stats.blocked:
        print(f"  {failed} items failed, {stats.blocked} wait on them: run the same command "
              "again to retry them", file=sys.stderr)
    if not args.no_filter and not (stats.stopped or "").startswith("stop_after"):
        out = args.output
        report = filter_files([out / RAW], out / "data.jsonl", cfg,
                              report_path=out / "report.json", dropped_path=out / "dropped.jsonl",
                              extra={"generation": gen})
        print(summary(report), file=sys.stderr)
        print(f"data: {out / 'data.jsonl'} ({report['kept']} rows); report: "
              f"{out / 'report.json'}", file=sys.stderr)
    return 1 if (failed or stats.blocked or stats.stopped) else 0


def cmd_filter(args: argparse.Namespace) -> int:
    from loraplex.trainer.datagen.filter import filter_files, summary

    out: Path = args.output
    stem = out.name[:-len(out.suffix)] if out.suffix else out.name
    report_path = args.report or out.with_name(stem + ".report.json")
    dropped_path = args.dropped or out.with_name(stem + ".dropped.jsonl")
    if out.resolve() in {p.resolve() for p in args.inputs}:
        from loraplex.adapters.errors import BadRequest

        raise BadRequest(f"--output {out} is also an input: write the kept rows elsewhere",
                         param="output")
    report = filter_files(list(args.inputs), out, filter_config(args), report_path=report_path,
                          dropped_path=dropped_path)
    print(summary(report), file=sys.stderr)
    print(json.dumps({"kept": report["kept"], "dropped": report["dropped"],
                      "output": str(out), "report": str(report_path)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`loraplex data ...` alone (the `loraplex` command finds it through its entry point)."""
    from loraplex.adapters.cli import run_one

    return run_one(register, argv)


if __name__ == "__main__":
    sys.exit(main())
