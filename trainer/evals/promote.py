"""`loraplex adapters promote NAME --candidate N --to ALIAS --gate gate.yaml [--canary P]`.

The candidate `NAME@N` and the alias's current version (the baseline: the alias's version, or
the heaviest other version of a split) are evaluated side by side through the server on the
gate's sets; the alias moves only if every gate rule passes: to `N`, or with `--canary P` to a
split giving N P% (the other versions keep their proportions of the rest). A new alias has no
baseline: only floors and ceilings apply. Each decision is recorded in the registry (who: --actor
or the OS user; when; both sides' figures; each rule's verdict; the alias before and after),
in the transaction that moves the alias, and shown by `loraplex adapters show NAME`. If the
alias moved while the evaluation ran, nothing moves and the decision is recorded as aborted.
Both versions' figures are also stored on their records (`metrics.evals`).

This verb reaches `loraplex adapters` through the `loraplex.adapters.verbs` entry-point group:
the registry package holds no HTTP client and never names the trainer. Exit status: 0 the alias
moved (or, with --dry-run, the gate passed), 1 the gate refused (or the decision aborted),
2 an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Evaluate the candidate NAME@N and the version ALIAS points at side by side through the server,
on the gate's eval sets, and move the alias (or, with --canary, a weighted split) only if every
gate rule passes. Every decision is recorded in the registry and shown by `loraplex adapters
show NAME`. See docs/eval.md."""


def add_verb(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Entry point of the `loraplex.adapters.verbs` group."""
    from loraplex.trainer.evals.settings import add_endpoint_options

    p = verbs.add_parser("promote", parents=[common], help="move an alias to a candidate "
                         "version only if it passes an evaluation gate",
                         description=DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="adapter name")
    p.add_argument("--candidate", type=int, required=True, metavar="N", help="the version to "
                   "promote")
    p.add_argument("--to", default="prod", metavar="ALIAS", help="the alias (default prod)")
    p.add_argument("--gate", type=Path, required=True, help="gate YAML: sets and rules "
                   "(docs/eval.md)")
    p.add_argument("--canary", type=int, metavar="PERCENT", help="move a weighted split "
                   "giving the candidate PERCENT (1-99) instead of the whole alias")
    p.add_argument("--actor", help="who decides (default: the OS user)")
    p.add_argument("--dry-run", action="store_true", help="evaluate and judge; move and "
                   "record nothing")
    p.add_argument("--output", type=Path, help="write the evaluation and the decision as JSON")
    add_endpoint_options(p)
    p.set_defaults(func=cmd_promote)


def plan(before: list[tuple[int, int]] | None, candidate: int, canary: int | None
         ) -> tuple[int | None, list[tuple[int, int]]]:
    """(baseline version, the alias's weights if the gate passes) for an alias now at
    `before` (None: no such alias)."""
    from loraplex.adapters.errors import BadRequest

    others = [(v, w) for v, w in before or [] if v != candidate]
    if before and not others:
        raise BadRequest(f"the alias already points at version {candidate} only: nothing to "
                         "promote", param="candidate")
    baseline = max(others, key=lambda vw: (vw[1], vw[0]))[0] if others else None
    if canary is None:
        return baseline, [(candidate, 100)]
    if not 1 <= canary <= 99:
        raise BadRequest("--canary is a percentage from 1 to 99", param="canary")
    if not others:
        raise BadRequest("--canary splits the alias's traffic, but the alias does not exist "
                         "yet: promote without --canary first", param="canary")
    rest = 100 - canary
    if len(others) > rest:
        raise BadRequest(f"--canary {canary} leaves {rest}% for {len(others)} versions",
                         param="canary")
    total = sum(w for _, w in others)
    scaled = [(v, max(1, round(w * rest / total))) for v, w in others]
    big = max(range(len(scaled)), key=lambda i: scaled[i][1])
    scaled[big] = (scaled[big][0], scaled[big][1] + rest - sum(w for _, w in scaled))
    return baseline, sorted(scaled) + [(candidate, canary)]


def actor(given: str | None) -> str:
    if given:
        return given
    import getpass
    import os

    try:
        return getpass.getuser()
    except Exception:  # no passwd entry, no LOGNAME (containers)
        return f"uid:{os.getuid()}"


def cmd_promote(args: argparse.Namespace) -> int:
    from loraplex.adapters.errors import Conflict
    from loraplex.adapters.records import PromotionDecision
    from loraplex.adapters.refs import check_alias, check_name
    from loraplex.adapters.registry_cli import open_registry
    from loraplex.trainer.evals import gate as gates
    from loraplex.trainer.evals import report
    from loraplex.trainer.evals.runner import Sampling, Target, evaluate, store
    from loraplex.trainer.evals.sets import load_sets
    from loraplex.trainer.evals.settings import eval_settings, judge_settings

    name, alias = check_name(args.name), check_alias(args.to)
    g = gates.load_gate(args.gate)
    sets = load_sets(g.set_args(), base_dir=args.gate.parent, limit=args.limit)
    gates.check_rule_names(g, [s.name for s in sets])
    settings = eval_settings(args)
    judge = judge_settings(args, settings, g.judge)
    sampling = Sampling(
        max_tokens=args.max_tokens or g.max_tokens or 256,
        temperature=args.temperature if args.temperature is not None else (g.temperature or 0.0),
        seed=args.seed, limit=args.limit, judge_max_tokens=args.judge_max_tokens)
    with open_registry(args) as reg:
        cand = reg.show(f"{name}@{args.candidate}")
        if cand.state != "active":
            raise Conflict(f"{cand.ref} is archived; an alias can only point to active "
                           "versions", param="candidate")
        current = next((a for a in reg.aliases(name) if a.alias == alias), None)
        before = current.weights if current is not None else None
        baseline, target = plan(before, args.candidate, args.canary)
        targets = [Target.pinned(name, args.candidate, label=f"candidate {cand.ref}")]
        if baseline is not None:
            targets.append(Target.pinned(name, baseline, label=f"baseline {name}@{baseline}"))
        run = evaluate(targets, sets, settings, sampling, judge)
        stored = store(run, reg) if not args.dry_run else []
        cand_f = run.flat(0)
        base_f = run.flat(1) if baseline is not None else None
        rules = gates.judge(g, cand_f, base_f)
        passed = all(r.passed for r in rules)
        failed = [f"{r.metric} {r.rule}: {r.detail}" for r in rules if not r.passed]
        decision = PromotionDecision(
            name=name, alias=alias, candidate=args.candidate, baseline=baseline,
            outcome=("canary" if args.canary else "promoted") if passed else "rejected",
            actor=actor(args.actor), before=before, after=before, canary_percent=args.canary,
            rules=rules, figures={"candidate": cand_f, "baseline": base_f or {}},
            evals={s.name: s.describe() for s in sets},
            gate={**g.record(), "run": {"sampling": sampling.as_dict(), "judge": run.judge,
                                        "at": run.at}},
            server=settings.url, note="; ".join(failed))
        if args.dry_run:
            rec = decision.model_copy(update={"after": target if passed else before})
        else:
            rec = reg.record_promotion(decision, target if passed else None, expect=before)
    if args.output:
        report.write_json(run, args.output, {"decision": rec.model_dump(mode="json")})
    if args.json:
        import json

        print(json.dumps(rec.model_dump(mode="json"), indent=2, sort_keys=True))
    else:
        print(render(rec, run, stored, dry_run=args.dry_run))
    return 0 if (passed if args.dry_run else rec.moved) else 1


def render(rec: Any, run: Any, stored: list[str], dry_run: bool = False) -> str:
    from loraplex.adapters.records import weights_text
    from loraplex.trainer.evals import report

    cols = [(t.label, {s.name: run.figures(i, s.name) for s in run.sets})
            for i, t in enumerate(run.targets)]
    lines = [report.comparison(cols), ""]
    lines.append(report.text_table(
        ["RULE", "THRESHOLD", "CANDIDATE", "BASELINE", "RESULT"],
        [[f"{r.metric} {r.rule}", f"{r.threshold:g}", r.candidate, r.baseline,
          ("PASS" if r.passed else "FAIL") + (f" ({r.detail})" if r.detail else "")]
         for r in rec.rules]))
    lines += ["", *stored]
    where = f"{rec.name}:{rec.alias}"
    if dry_run:
        lines.append(f"dry run: the gate {'passes' if rec.moved else 'refuses'}; {where} "
                     f"would be {weights_text(rec.after)} (nothing moved or recorded)")
    elif rec.moved:
        lines.append(f"{rec.outcome}: {where} {weights_text(rec.before)} -> "
                     f"{weights_text(rec.after)} (decision #{rec.id} by {rec.actor})")
    else:
        why = rec.note if rec.outcome == "aborted" else "; ".join(
            f"{r.metric} {r.rule}" for r in rec.failed_rules)
        lines.append(f"{rec.outcome}: {where} stays at {weights_text(rec.before)} "
                     f"(decision #{rec.id} by {rec.actor}): {why}")
    return "\n".join(lines)
