"""`loraplex data`: build instruction data through an OpenAI-compatible endpoint, then filter it.

- `settings.py`: the one settings object of the command (`LORAPLEX_DATA_*`, flags win).
- `client.py`: the teacher, an `openai.AsyncOpenAI` client with bounded concurrency and retries
  (exponential backoff on 429, 5xx and connection errors, honouring Retry-After).
- `prompts.py`: the fixed prompts (Self-Instruct's task list, Evol-Instruct's rewrites), the
  reading of prompt and seed files, and the parsing of what the teacher writes.
- `journal.py`: the append-only JSONL journal that makes a run resumable, stable ids, provenance.
- `generate.py`: the three methods (self-instruct, evol-instruct, distill).
- `textsim.py`: words, ROUGE-L (exact, bit-parallel LCS), n-grams.
- `filter.py`: duplicates, near-duplicates, ROUGE-L, length/format rules, eval-set overlap, and
  the report of what was dropped and why.
- `cli.py`: `loraplex data generate` and `loraplex data filter`.

Rows are written in the OpenAI messages format the trainer reads; provenance goes under the
top-level `provenance` key, which the trainer's parsers ignore. See docs/data.md.
"""
