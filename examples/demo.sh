#!/usr/bin/env bash
# The loraplex loop on a toy model, as the commands a user types. Offline: no model hub, no GPU.
#
#   toy base -> train `words` on human-labelled data (words@1, prod) -> serve -> ask the base and
#   the adapters side by side -> distill a new dataset from `words` on fresh prompts -> train
#   words@2 on it -> evaluate the base, words@1 and words@2 -> promote words@2 to prod only if
#   the gate passes.
#
# Run it from anywhere with loraplex on PATH (`make demo` sets up .venv and runs it). Settings,
# all optional, as environment variables:
#   WORK=demo-out   where everything goes (relative to the repository root); the toy model
#                   is reused, the rest is made anew
#   STEPS=300       training steps of `words` and of words@2 (tests/server/test_demo.py: 40)
#   LISTS_STEPS=150 training steps of `lists`; LISTS=0 leaves `lists` out
#   PORT=8000       the server's port
# docs/loop.md walks through the same loop; docs/data.md and docs/eval.md have every option.
set -euo pipefail
cd "$(dirname "$0")/.."    # the repository root: the bundled data is in trainer/data

WORK=${WORK:-demo-out}
STEPS=${STEPS:-300}
LISTS=${LISTS:-1}
LISTS_STEPS=${LISTS_STEPS:-150}
PORT=${PORT:-8000}
DATA=trainer/data
URL=http://127.0.0.1:$PORT/v1

export LORAPLEX_HOME=$WORK/home           # the registry (SQLite + artifacts) all commands share
export LORAPLEX_DATA_URL=$URL             # the server `loraplex data` asks ...
export LORAPLEX_EVAL_URL=$URL             # ... and the one `eval` and `promote` ask
export HF_HUB_OFFLINE=1                   # never reach a model hub

command -v loraplex >/dev/null || { echo "loraplex is not on PATH: source .venv/bin/activate" >&2; exit 1; }
step() { printf '\n=== %s\n' "$*"; }

# A fresh registry each run, so the versions below are words@1 and words@2. The toy model is
# deterministic (per CPU kind) and takes a minute or two to build, so a second run reuses it.
rm -rf "$WORK/home" "$WORK/adapters" "$WORK/data" "$WORK/eval"
mkdir -p "$WORK"

step "1. a toy base model: Llama architecture, 5M parameters, pre-trained on a bundled corpus"
[ -f "$WORK/toy-model/config.json" ] || loraplex toy-model "$WORK/toy-model"
loraplex adapters base add toy "$WORK/toy-model"

step "2. start the server in the background: adapters pushed later are served on first request"
if curl -s "http://127.0.0.1:$PORT/" >/dev/null; then echo "port $PORT is taken: set PORT" >&2; exit 1; fi
loraplex serve --model "$WORK/toy-model" --served-model-name toy --port "$PORT" \
    --dtype float32 --max-model-len 1024 --max-lora-rank 16 --gpu-memory-utilization 0.1 \
    --cpu-kvcache-space-gib 1 --enforce-eager --log-level warning >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null && wait $SERVER 2>/dev/null || true' EXIT   # stopped however we exit,
trap 'exit 130' INT TERM                                                   # Ctrl-C included
echo "loraplex serve on port $PORT (pid $SERVER, log $WORK/server.log)"

# The toy learns these closed-answer tasks in minutes at a LoRA-sized learning rate (see
# docs/trainer.md); the trainer's general defaults are gentler. Every run evaluates the held-out
# questions at its end (exact match, base -> adapter) and writes it to report.json.
TRAIN=(--base "$WORK/toy-model" --lr 1e-3 --lora-r 16 --lora-alpha 32 --batch-size 16
       --max-new-tokens 16 --overwrite --no-progress-bar)

step "3. train words@1 on human-labelled Alpaca data (ChatML) and make it prod"
loraplex train "${TRAIN[@]}" --max-steps "$STEPS" --eval-steps "$STEPS" --chat-template chatml \
    --data $DATA/words.alpaca.jsonl --eval-data $DATA/words.alpaca.heldout.jsonl \
    --output "$WORK/adapters/words" --register words --alias prod

if [ "$LISTS" = 1 ]; then
  step "   and a second adapter, lists, on ShareGPT data with the Llama-2 template"
  # The server renders each adapter's prompts with the template it was trained with.
  loraplex train "${TRAIN[@]}" --max-steps "$LISTS_STEPS" --eval-steps "$LISTS_STEPS" \
      --chat-template llama2 --data $DATA/lists.sharegpt.jsonl \
      --eval-data $DATA/lists.sharegpt.heldout.jsonl --eval-exact-match 20 \
      --output "$WORK/adapters/lists" --register lists --alias prod
fi

step "4. wait for the server, then ask the base and the adapters the same held-out questions"
until curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; do
  kill -0 $SERVER 2>/dev/null || { tail -30 "$WORK/server.log"; echo "the server exited" >&2; exit 1; }
  sleep 1
done
ask() {  # ask MODEL QUESTION: one greedy chat completion, as any OpenAI client sends it
  curl -sf "$URL/chat/completions" -H 'Content-Type: application/json' -d "{\"model\": \"$1\",
    \"messages\": [{\"role\": \"user\", \"content\": \"$2\"}], \"max_tokens\": 16, \"temperature\": 0}" \
  | python -c 'import json, sys; print(repr(json.load(sys.stdin)["choices"][0]["message"]["content"]))'
}
models=(toy words); [ "$LISTS" = 1 ] && models+=(lists)
questions=("What kind of word is goat?" "Tell me what cherry is: a fruit, an animal or a color."
           "What kind of word is red?")
[ "$LISTS" = 1 ] && questions+=("What kind of word is every item in this list: rabbit, cow"
                                "What kind of word is every item in this list: peach, banana, berry, kiwi")
for q in "${questions[@]}"; do
  echo "Q: $q"
  for m in "${models[@]}"; do printf '   %-6s %s\n' "$m" "$(ask "$m" "$q")"; done
done

step "5. distill: words@1 answers fresh prompts (new phrasings of words it was trained on)"
# examples/words.prompts.txt: the 37 training words in six phrasings the training data never
# uses, and two questions copied from the held-out set, as collected prompts often hold: the
# filter that `generate` runs at the end drops those (eval_overlap), so words@2 never trains on
# an eval question. Near-duplicate search is off: these one-line questions differ in the one word
# that matters, and word-shingle similarity calls "Is cat a fruit, ...?" and "Is dog a fruit,
# ...?" near-duplicates.
loraplex data generate --method distill --model words@1 --input examples/words.prompts.txt \
    --eval $DATA/words.alpaca.heldout.jsonl --near-dup-threshold off --max-tokens 16 \
    --output "$WORK/data/distilled"

# The teacher's own answers to the held-out questions: an eval set that measures how often a
# student says what words@1 says (right or wrong), beside the held-out set's true answers.
loraplex data generate --method distill --model words@1 --input $DATA/words.alpaca.heldout.jsonl \
    --max-tokens 16 --keep-truncated --near-dup-threshold off --output "$WORK/data/teacher"

step "6. train words@2 on the distilled data alone (no human labels) and push it (not prod yet)"
loraplex train "${TRAIN[@]}" --max-steps "$STEPS" --eval-steps "$STEPS" --chat-template chatml \
    --data "$WORK/data/distilled/data.jsonl" --eval-data $DATA/words.alpaca.heldout.jsonl \
    --output "$WORK/adapters/words-2" --register words

step "7. evaluate the base, words@1 and words@2 through the server, side by side"
# Two eval sets: heldout, the held-out questions with their true answers (what users want), and
# teacher, the same questions with words@1's answers (how often a version says what its teacher
# says, right or wrong). Each set is named by its file name; its sha256 is stored with the figures.
mkdir -p "$WORK/eval"
cp $DATA/words.alpaca.heldout.jsonl "$WORK/eval/heldout.jsonl"
cp "$WORK/data/teacher/data.jsonl" "$WORK/eval/teacher.jsonl"
loraplex eval toy words@1 words@2 --set "$WORK/eval/heldout.jsonl" --set "$WORK/eval/teacher.jsonl" \
    --max-tokens 16 --output "$WORK/eval/eval.json"

step "8. promote words@2 to prod only if the gate passes"
# The gate: no regression on the held-out questions beyond one question in 27, and a distilled
# version must say what its teacher says on at least 4 in 5 of them. Set paths are relative to
# the gate file.
cat >"$WORK/eval/gate.yaml" <<'EOF'
sets: [heldout.jsonl, teacher.jsonl]
rules:
  heldout.exact_match: {max_regression: 0.04}
  teacher.exact_match: {min: 0.8}
  heldout.errors: {max: 0}
max_tokens: 16
EOF
# Exit status 0: prod moved; 1: the gate refused and prod stays where it was (a decision, not a
# failure of the demo); 2: an error.
rc=0
loraplex adapters promote words --candidate 2 --to prod --gate "$WORK/eval/gate.yaml" --actor demo || rc=$?
[ $rc -le 1 ] || exit $rc

echo
echo "Done. The registry is in $LORAPLEX_HOME: try \`LORAPLEX_HOME=$LORAPLEX_HOME loraplex adapters show words\`."
