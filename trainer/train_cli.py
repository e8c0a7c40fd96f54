"""`loraplex train`: flags mirror TrainConfig (see loraplex.trainer.config); --config FILE.yaml
supplies defaults that flags override. torch/transformers/peft load only inside the handler."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  loraplex train --base ./toy-model --data train.jsonl --eval-data heldout.jsonl --output out/a
  loraplex train --config run.yaml --lr 5e-4            # flags override the file
  loraplex train --base ./toy-model --data train.jsonl --inspect 2
  loraplex train --base ./toy-model --data chats.parquet ./saved_dataset --output out/b
  loraplex train --base ./toy-model --data hf:owner/name --eval-data hf:owner/name --output out/c
                                  # a hub dataset from the local HF cache: train and test splits
  loraplex train --config run.yaml --register words --alias canary
  torchrun --nproc-per-node 8 -m loraplex.adapters.cli train --config run.yaml --fsdp
                                  # 8 GPUs, the base sharded over them (FSDP2)
"""


def register(sub: argparse._SubParsersAction) -> None:
    from loraplex.trainer.config import add_arguments

    p = sub.add_parser(
        "train", help="fine-tune a LoRA adapter on instruction data",
        description="Instruction data (Alpaca, ShareGPT, OpenAI messages) -> a PEFT LoRA adapter "
        "with its chat template, stop tokens and a manifest; optionally registered.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML file with the same options (field "
                   "names as keys); command-line flags override it")
    p.add_argument("--print-config", action="store_true", help="print the effective options "
                   "as YAML and exit")
    p.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")
    add_arguments(p)
    p.add_argument("--fsdp", dest="distributed", action="store_const", const="fsdp",
                   default=argparse.SUPPRESS, help="the same as --distributed fsdp: FSDP2 under "
                   "torchrun / accelerate launch, for a base that does not fit one GPU")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from loraplex.trainer.config import load_config, option_names

    overrides = {k: v for k, v in vars(args).items() if k in option_names()}
    cfg = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False), end="")
        return 0

    from loraplex.trainer import distributed
    from loraplex.trainer.train import run

    result = run(cfg)
    if args.json and distributed.launch_rank() == 0:  # one report, not one per process
        json.dump(result, sys.stdout, indent=2)
        print()
    return 0
