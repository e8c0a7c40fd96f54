"""`loraplex eval`: evaluate models, adapters and versions side by side through a server.

Heavy or network imports (openai, matplotlib) happen inside the command, so `loraplex --help`
stays fast. `python -m loraplex.trainer.evals.cli eval ...` runs it without the other entry
points.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraplex.trainer.evals.settings import add_endpoint_options

DESCRIPTION = """\
Ask each MODEL (the base's served name, an adapter `name`, `name@3`, `name:alias`) every prompt
of every eval set through a running server, check the answers (exact match, contains, regex,
JSON schema; IFEval-style verifiable instructions; optionally a judge model's 1-10 rating) and
print the figures side by side. A reference that points at one version is pinned to it for the
run and its figures are stored on that version in the registry (metrics.evals.<set>, with the
set's sha256). See docs/eval.md."""

EPILOG = """\
examples:
  loraplex eval toy words words@1 --set golden.jsonl --set ifeval
  loraplex eval words:prod --set trainer/data/words.alpaca.heldout.jsonl --max-tokens 32
  LORAPLEX_EVAL_API_KEY=... loraplex eval words@2 words@3 --set qa=golden.jsonl \\
      --url http://server:8000/v1 --judge-model gpt-judge --judge-url https://api.example.com/v1 \\
      --judge-api-key-env JUDGE_KEY --output out/eval.json --chart out/eval.png
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate models/adapters/versions side by side through "
                       "a server", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="FILE|NAME=FILE",
                   help="an eval set (JSON lines; repeatable); `ifeval`: the bundled "
                   "IFEval-style prompts")
    add_endpoint_options(p)
    o = p.add_argument_group("output")
    o.add_argument("--output", "-o", type=Path, help="write figures and every answer as JSON")
    o.add_argument("--chart", type=Path, help="write a PNG bar chart")
    o.add_argument("--json", action="store_true", help="print the figures as JSON, no table")
    o.add_argument("--no-store", action="store_true", help="do not store the figures on the "
                   "versions in the registry")
    o.add_argument("--registry-url", help="the registry to store in (default: "
                   "LORAPLEX_REGISTRY_URL or sqlite under LORAPLEX_HOME)")
    o.add_argument("--artifacts-url", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from loraplex.trainer.evals import report
    from loraplex.trainer.evals.runner import Sampling, evaluate, store
    from loraplex.trainer.evals.sets import load_sets
    from loraplex.trainer.evals.settings import eval_settings, judge_settings

    sets = load_sets(args.sets, limit=args.limit)
    settings = eval_settings(args)
    sampling = Sampling(max_tokens=args.max_tokens or 256,
                        temperature=args.temperature if args.temperature is not None else 0.0,
                        seed=args.seed, limit=args.limit,
                        judge_max_tokens=args.judge_max_tokens)
    run = evaluate(list(dict.fromkeys(args.models)), sets, settings, sampling,
                   judge_settings(args, settings))
    stored: list[str] = []
    if not args.no_store and any(t.kind == "version" for t in run.targets):
        from loraplex.adapters.registry_cli import open_registry

        with open_registry(args) as reg:
            stored = store(run, reg)
    if args.output:
        report.write_json(run, args.output)
    if args.chart:
        report.chart(run, args.chart)
    if args.json:
        print(json.dumps(run.to_json(items=False), indent=2))
    else:
        print(report.run_table(run))
    for line in stored:
        print(line, file=sys.stderr)
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr)
    if args.chart:
        print(f"wrote {args.chart}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`loraplex eval ...` alone (the `loraplex` command finds it through its entry point)."""
    from loraplex.adapters.cli import run_one

    return run_one(register, argv)


if __name__ == "__main__":
    sys.exit(main())
