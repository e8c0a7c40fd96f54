"""`loraplex adapters ...`: the registry on the command line.

    loraplex adapters base add tiny ./models/tiny
    loraplex adapters base add llama31-8b meta-llama/Llama-3.1-8B-Instruct   # from the HF cache
    loraplex adapters push ./out --name support-bot --alias canary --tag team=support
    loraplex adapters list
    loraplex adapters show support-bot:canary
    loraplex adapters alias set support-bot prod 3:90,4:10
    loraplex adapters alias rm support-bot canary
    loraplex adapters archive support-bot@2
    loraplex adapters pull support-bot@3 ./sb3

Every verb prints a readable table, or JSON with `--json`. Settings come from LORAPLEX_* env
vars (see RegistrySettings); `--registry-url` / `--artifacts-url` override them.

More verbs come from the `loraplex.adapters.verbs` entry-point group: each entry is a function
`add(verbs, common)` that adds a parser to `verbs` (with `common`, the --json/--registry-url/
--artifacts-url parent, among its parents) and sets `func`; it opens the registry with
`open_registry(args)`. `promote` is one (loraplex.trainer.evals.promote): it needs an HTTP
client and the evaluation code, which this package does not hold or name.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from importlib.metadata import entry_points
from typing import Any

from loraplex.adapters.adapter_format import TOOL_FORMATS
from loraplex.adapters.errors import BadRequest


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point of the `loraplex.commands` group: adds `adapters` and its verbs."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--registry-url", help="SQLAlchemy URL (default: LORAPLEX_REGISTRY_URL "
                        "or sqlite under LORAPLEX_HOME)")
    common.add_argument("--artifacts-url", help="artifact store dir or fsspec URL (default: "
                        "LORAPLEX_ARTIFACTS_URL or LORAPLEX_HOME/artifacts)")

    p = subparsers.add_parser("adapters", help="versioned LoRA adapter registry",
                              description="Push, list, alias and pull LoRA adapter versions.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    v = verbs.add_parser("push", parents=[common], help="validate and register an adapter dir")
    v.add_argument("dir", help="PEFT LoRA directory (adapter_config.json + .safetensors)")
    v.add_argument("--name", required=True, help="adapter name, e.g. support-bot")
    v.add_argument("--alias", help="also point this alias at the new version")
    v.add_argument("--base", help="registered base model name (default: inferred)")
    v.add_argument("--chat-template", help="Jinja file, used if the adapter has no template")
    v.add_argument("--tool-format", choices=TOOL_FORMATS,
                   help="how the model writes tool calls (vLLM's --tool-call-parser name); "
                   "default: the adapter's loraplex.json, else the server's base default")
    v.add_argument("--description", default="", help="free text")
    v.add_argument("--tag", action="append", default=[], metavar="K=V", help="repeatable")
    v.set_defaults(func=cmd_push)

    v = verbs.add_parser("list", parents=[common], help="list versions")
    v.add_argument("name", nargs="?", help="only this adapter")
    v.add_argument("--all", action="store_true", help="include archived versions")
    v.set_defaults(func=cmd_list)

    v = verbs.add_parser("show", parents=[common], help="show the version a reference names")
    v.add_argument("ref", help="name, name@VERSION or name:ALIAS")
    v.set_defaults(func=cmd_show)

    alias = verbs.add_parser("alias", help="set, remove or list aliases")
    averbs = alias.add_subparsers(dest="alias_verb", metavar="ACTION", required=True)
    v = averbs.add_parser("set", parents=[common], help="point NAME:ALIAS at versions")
    v.add_argument("name")
    v.add_argument("alias")
    v.add_argument("target", metavar="VERSION[:WEIGHT,...]", help="e.g. 3, or 3:90,4:10")
    v.set_defaults(func=cmd_alias_set)
    v = averbs.add_parser("rm", parents=[common], help="remove an alias")
    v.add_argument("name")
    v.add_argument("alias")
    v.set_defaults(func=cmd_alias_rm)
    v = averbs.add_parser("list", parents=[common], help="list aliases")
    v.add_argument("name", nargs="?")
    v.set_defaults(func=cmd_alias_list)

    v = verbs.add_parser("archive", parents=[common], help="retire a version (name@N)")
    v.add_argument("ref")
    v.set_defaults(func=cmd_archive)

    v = verbs.add_parser("pull", parents=[common], help="download and verify a version")
    v.add_argument("ref")
    v.add_argument("dest", help="new (or empty) directory")
    v.set_defaults(func=cmd_pull)

    base = verbs.add_parser("base", help="register or list base models")
    bverbs = base.add_subparsers(dest="base_verb", metavar="ACTION", required=True)
    v = bverbs.add_parser("add", parents=[common], help="register a base model (directory or hub id)")
    v.add_argument("name")
    v.add_argument("dir", metavar="MODEL", help="model directory, or hub id org/name[@revision] "
                   "resolved from the HF cache (HF_HOME; downloaded unless HF_HUB_OFFLINE=1)")
    v.set_defaults(func=cmd_base_add)
    v = bverbs.add_parser("list", parents=[common], help="list base models")
    v.set_defaults(func=cmd_base_list)

    add_extra_verbs(verbs, common)


VERBS_GROUP = "loraplex.adapters.verbs"


def add_extra_verbs(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Verbs other packages add (the `loraplex.adapters.verbs` entry-point group)."""
    for ep in sorted(entry_points(group=VERBS_GROUP), key=lambda e: e.name):
        try:
            ep.load()(verbs, common)
        except Exception as exc:  # one broken verb must not take the others down
            print(f"loraplex: warning: adapters verb {ep.name!r} unavailable: {exc}",
                  file=sys.stderr)


# -- helpers -------------------------------------------------------------------------------------

def open_registry(args: argparse.Namespace):
    """The registry the `common` options (over LORAPLEX_* variables) name."""
    from loraplex.adapters.registry import Registry
    from loraplex.adapters.settings import RegistrySettings

    s = RegistrySettings()
    update = {k: getattr(args, k) for k in ("registry_url", "artifacts_url")
              if getattr(args, k, None)}
    return Registry.open(s.model_copy(update=update))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d %H:%M") if dt else ""


def _alias_labels(aliases: list) -> dict[tuple[str, int], list[str]]:
    labels: dict[tuple[str, int], list[str]] = {}
    for a in aliases:
        total = sum(w for _, w in a.weights)
        for v, w in a.weights:
            label = a.alias if len(a.weights) == 1 else f"{a.alias}({100 * w / total:.0f}%)"
            labels.setdefault((a.name, v), []).append(label)
    return labels


def _parse_tags(items: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items:
        k, sep, val = item.partition("=")
        if not sep or not k:
            raise BadRequest(f"invalid --tag {item!r}: use KEY=VALUE, e.g. --tag team=support",
                             param="tag")
        tags[k] = val
    return tags


# -- verbs ---------------------------------------------------------------------------------------

def cmd_push(args: argparse.Namespace) -> int:
    tags = _parse_tags(args.tag)
    with open_registry(args) as reg:
        res = reg.push(args.dir, args.name, alias=args.alias, base=args.base,
                       chat_template=args.chat_template, description=args.description, tags=tags,
                       tool_format=args.tool_format)
    if args.json:
        _print_json(res.model_dump(mode="json"))
    else:
        print(res.message)
        for note in res.notes:
            print(f"  note: {note}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        versions = reg.list(args.name, include_archived=args.all)
        aliases = reg.aliases(args.name)
    if args.json:
        _print_json({"versions": [v.model_dump(mode="json") for v in versions],
                     "aliases": [a.model_dump(mode="json") for a in aliases]})
        return 0
    if not versions:
        print("no adapters registered" if args.name is None else f"no versions of {args.name!r}")
        return 0
    labels = _alias_labels(aliases)
    latest = {v.name: v.version for v in versions if v.state == "active"}
    rows = []
    for v in versions:
        names = list(labels.get((v.name, v.version), []))
        if latest.get(v.name) == v.version:
            names.append("latest")
        rows.append([v.name, v.version, ",".join(names), v.base_name, v.rank, _size(v.total_size),
                     v.state, _when(v.created_at), v.description[:40]])
    print(_table(["NAME", "VERSION", "ALIASES", "BASE", "RANK", "SIZE", "STATE", "CREATED",
                  "DESCRIPTION"], rows))
    return 0


SHOW_PROMOTIONS = 10  # decisions `show` prints (the newest); --json has them all


def cmd_show(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        v = reg.show(args.ref)
        aliases = [a for a in reg.aliases(v.name) if any(n == v.version for n, _ in a.weights)]
        decisions = reg.promotions(v.name)
    if args.json:
        _print_json({**v.model_dump(mode="json"), "aliases": [a.alias for a in aliases],
                     "lora_int_id": v.lora_int_id,
                     "promotions": [d.model_dump(mode="json") for d in decisions]})
        return 0
    metrics = {k: val for k, val in v.metrics.items() if k != "evals"}
    evals = v.metrics.get("evals") or {}
    fields = [
        ("ref", v.ref), ("state", v.state), ("aliases", ", ".join(a.alias for a in aliases)),
        ("base", f"{v.base_name} ({v.base_fingerprint})"), ("peft_type", v.peft_type),
        ("rank", v.rank), ("alpha", v.alpha), ("target_modules", ", ".join(v.target_modules)),
        ("stop_tokens", ", ".join(v.stop_tokens)), ("chat_template_sha256", v.chat_template_sha256),
        ("artifact_uri", v.artifact_uri), ("size", _size(v.total_size)),
        ("created_at", v.created_at.isoformat()), ("description", v.description),
        ("tags", ", ".join(f"{k}={val}" for k, val in sorted(v.tags.items()))),
        ("training", json.dumps(v.training) if v.training else ""),
        ("metrics", json.dumps(metrics) if metrics else ""), ("lora_int_id", v.lora_int_id),
    ]
    print(_table(["FIELD", "VALUE"], [list(f) for f in fields]))
    print()
    print(_table(["FILE", "SHA256"], [[k, sha] for k, sha in sorted(v.files.items())]))
    if evals:
        print()
        print(_table(["EVAL SET", "FIGURES", "SET SHA256", "WHEN", "SERVED AS"],
                    [_eval_row(k, e) for k, e in sorted(evals.items())]))
    if decisions:
        print()
        print(f"promotions of {v.name} (newest first):")
        print(_table(["WHEN", "ALIAS", "CANDIDATE", "BASELINE", "OUTCOME", "ALIAS BEFORE -> AFTER",
                     "ACTOR", "FAILED RULES"],
                    [_decision_row(d) for d in decisions[:SHOW_PROMOTIONS]]))
        if len(decisions) > SHOW_PROMOTIONS:
            print(f"  ... {len(decisions) - SHOW_PROMOTIONS} older (--json shows all)")
    return 0


def _figure(x: Any) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".") if isinstance(x, float) else str(x)


def _eval_row(name: str, e: Any) -> list[Any]:
    if not isinstance(e, dict):
        return [name, json.dumps(e), "", "", ""]
    figs = e.get("figures") or {}
    shown = ", ".join(f"{k}={_figure(val)}" for k, val in figs.items()
                      if not str(k).startswith("if_"))
    return [name, shown, str(e.get("sha256", ""))[:12],
            str(e.get("at", ""))[:16].replace("T", " "), e.get("served_as", "")]


def _decision_row(d: Any) -> list[Any]:
    from loraplex.adapters.records import weights_text

    failed = "; ".join(f"{r.metric} {r.rule} {r.detail}".strip() for r in d.failed_rules)
    return [_when(d.created_at), d.alias, d.candidate, d.baseline or "-", d.outcome,
            f"{weights_text(d.before)} -> {weights_text(d.after)}", d.actor,
            failed or ("" if d.moved else d.note)]


def cmd_alias_set(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        a = reg.set_alias(args.name, args.alias, args.target)
    if args.json:
        _print_json(a.model_dump(mode="json"))
    else:
        print(f"{a.name}:{a.alias} -> {a.target}")
    return 0


def cmd_alias_rm(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        reg.remove_alias(args.name, args.alias)
    if args.json:
        _print_json({"name": args.name, "alias": args.alias, "removed": True})
    else:
        print(f"removed {args.name}:{args.alias}")
    return 0


def cmd_alias_list(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        aliases = reg.aliases(args.name)
    if args.json:
        _print_json([a.model_dump(mode="json") for a in aliases])
    else:
        print(_table(["NAME", "ALIAS", "TARGET", "UPDATED"],
                     [[a.name, a.alias, a.target, _when(a.updated_at)] for a in aliases]))
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        v = reg.archive(args.ref)
    if args.json:
        _print_json(v.model_dump(mode="json"))
    else:
        print(f"archived {v.ref}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        v = reg.pull(args.ref, args.dest)
    if args.json:
        _print_json({"ref": v.ref, "dest": args.dest, "files": v.files})
    else:
        print(f"pulled {v.ref} into {args.dest} ({len(v.files)} files, sha256 verified)")
    return 0


def cmd_base_add(args: argparse.Namespace) -> int:
    from loraplex.adapters.models import resolve_model

    model = resolve_model(args.dir)  # a hub id: the snapshot's files are fingerprinted
    with open_registry(args) as reg:
        b = reg.register_base(args.name, model)
    if args.json:
        _print_json(b.model_dump(mode="json"))
    else:
        print(f"base {b.name}: {b.architecture}, {b.num_layers} layers, "
              f"{len(b.modules)} linear modules, fingerprint {b.fingerprint}")
    return 0


def cmd_base_list(args: argparse.Namespace) -> int:
    with open_registry(args) as reg:
        bases = reg.list_bases()
    if args.json:
        _print_json([b.model_dump(mode="json") for b in bases])
    else:
        print(_table(["NAME", "ARCHITECTURE", "LAYERS", "MODULES", "FINGERPRINT"],
                     [[b.name, b.architecture, b.num_layers, ",".join(
                         m.rsplit(".", 1)[-1] for m in b.modules), b.fingerprint[:19]]
                      for b in bases]))
    return 0
