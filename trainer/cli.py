"""`loraplex toy-model`: build the offline toy base model (see loraplex.trainer.toy)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register_toy_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "toy-model",
        help="build the tiny offline Llama base model used by the demo and the tests",
        description="Build a small Llama-architecture model, its BPE tokenizer and a ChatML "
        "template offline and deterministically from --seed and the bundled corpus.",
    )
    p.add_argument("out_dir", type=Path, help="directory to write the model into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the spec's)")
    p.set_defaults(func=_toy_model)


def _toy_model(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from loraplex.trainer.toy import ToySpec, build_toy_model, spec_digest

    spec = ToySpec(seed=args.seed)
    if args.steps is not None:
        spec = replace(spec, pretrain_steps=args.steps)
    # The build is deterministic: a directory that already holds this very spec's model is kept
    # (a rerun of a script or the README's commands costs nothing).
    marker = args.out_dir / "loraplex_toy.json"
    if marker.is_file() and json.loads(marker.read_text()).get("digest") == spec_digest(spec):
        print(f"toy model in {args.out_dir} is already built from this spec; kept")
        return 0
    build_toy_model(args.out_dir, spec)
    return 0
