#!/usr/bin/env bash
# `loraplex train` beside TRL's SFTTrainer on one NVIDIA GPU (bf16 + gradient checkpointing,
# QLoRA 4-bit, packing) on a ~0.9B random-init Llama built offline: benchmarks/gpu_train_check.py
# does the work; this wrapper readies a bare GPU machine for it and keeps the results.
#
#   benchmarks/gpu_train_check.sh [--wheels DIR] [--out PREFIX] [--python PY] [-- ARGS...]
#
#   --wheels DIR  *.whl to install first, offline and without their dependencies (default: ./.whl
#                 when it exists). Nothing else is installed from an index, and torch is never
#                 touched. For a machine that has torch/transformers/peft/accelerate but not TRL
#                 or bitsandbytes (about 46 MB for Python 3.12 on x86_64):
#                   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                     --implementation cp --platform manylinux_2_28_x86_64 \
#                     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#                     --platform manylinux_2_24_x86_64 -d .whl trl==1.16.0 bitsandbytes \
#                     datasets dill multiprocess pydantic pydantic-core annotated-types \
#                     typing-inspection
#                 (trl needs datasets, which needs dill and multiprocess; loraplex's trainer
#                 needs pydantic; leave out what the machine already has).
#   --out PREFIX  results go to PREFIX.md (the log and the table) and PREFIX.json
#                 (default: gpu-train-check-<UTC date and time> in the current directory)
#   --python PY   the interpreter that holds torch (default: $PYTHON, else python3)
#   ARGS          passed to gpu_train_check.py (default: --steps 200 --repeats 1; e.g.
#                 `-- --steps 300 --configs gc packing --work-dir /scratch/gpu-check`)
#
# Exit status: that of gpu_train_check.py (1 when a run failed; skipped configs are not
# failures), or 2 when there is no usable NVIDIA GPU.
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS=""
[ -d .whl ] && WHEELS=.whl
OUT="gpu-train-check-$(date -u +%Y%m%d-%H%M%S)"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --) shift; ARGS=("$@"); break ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help; arguments for the Python script go after --)" >&2
       exit 2 ;;
  esac
done
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--steps 200 --repeats 1)

say() { echo "gpu_train_check.sh: $*" >&2; }

# 1. an NVIDIA GPU that torch can use
if ! command -v nvidia-smi >/dev/null 2>&1; then
  say "nvidia-smi not found: this check needs an NVIDIA GPU and its driver."
  say "On a CPU, the same plumbing runs as: $PY benchmarks/gpu_train_check.py --device cpu --size tiny --steps 8"
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || {
  say "nvidia-smi failed: no usable GPU"; exit 2; }
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "$PY's torch sees no CUDA GPU (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing))"
  exit 2
fi
TORCH_BEFORE="$("$PY" -c 'import torch; print(torch.__version__)')"

# 2. wheels brought along (offline, no dependency resolution: torch stays as it is)
if [ -n "$WHEELS" ]; then
  shopt -s nullglob
  whls=("$WHEELS"/*.whl)
  shopt -u nullglob
  if [ ${#whls[@]} -gt 0 ]; then
    say "installing ${#whls[@]} wheel(s) from $WHEELS (--no-deps, --no-index)"
    "$PY" -m pip install --quiet --no-deps --no-index "${whls[@]}" \
      || say "warning: installing the wheels failed; configs that need them will be skipped"
  else
    say "no *.whl in $WHEELS"
  fi
fi

# 3. the checkout itself, without touching torch or anything else
if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null; then
  # No setuptools/wheel (or no write access): put the three folders on the path under the
  # `loraplex` namespace instead (what the editable install maps: pyproject.toml package-dir).
  SHIM="$(mktemp -d)/loraplex-src"
  mkdir -p "$SHIM/loraplex"
  for d in adapters trainer server; do ln -s "$PWD/$d" "$SHIM/loraplex/$d"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  say "pip install -e . failed; using $SHIM on PYTHONPATH instead"
fi
TORCH_AFTER="$("$PY" -c 'import torch; print(torch.__version__)')"
[ "$TORCH_BEFORE" = "$TORCH_AFTER" ] || say "warning: torch changed: $TORCH_BEFORE -> $TORCH_AFTER"

# 4. what the two sides import, imported once up front so a missing package or a version
#    clash is named here (gpu_train_check.py skips a config whose package is absent; a side
#    whose import breaks fails with its traceback, and the other runs go on)
"$PY" - <<'EOF' >&2
import importlib
need = {"loraplex trainer": ["loraplex.trainer.train", "loraplex.trainer.output", "matplotlib"],
        "TRL side": ["datasets", "trl"], "QLoRA (both sides)": ["bitsandbytes"],
        "flash_attention_2 for packing (else sdpa)": ["flash_attn"]}
for what, mods in need.items():
    problems = []
    for m in mods:
        try:
            importlib.import_module(m)
        except Exception as exc:  # ImportError, or a version check failing at import
            problems.append(f"{m} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    print(f"gpu_train_check.sh: {what}: " + ("ok" if not problems else "; ".join(problems)))
EOF

# 5. the check
say "running: $PY benchmarks/gpu_train_check.py ${ARGS[*]} --json $OUT.json (log and table: $OUT.md)"
"$PY" benchmarks/gpu_train_check.py "${ARGS[@]}" --json "$OUT.json" 2>&1 | tee "$OUT.md"
rc=${PIPESTATUS[0]}
say "exit $rc; results in $OUT.md and $OUT.json"
exit "$rc"
