"""`loraplex eval` and `loraplex adapters promote`: evaluate models, adapters and versions
through a running server (what users get: template, stop tokens and all), store the figures on
the versions in the registry, and move an alias only when a gate passes. See docs/eval.md.

Modules: `checks` (golden-set checks and the check registry), `ifeval` (verifiable instruction
checks), `sets` (eval set files), `judge` (an optional judge model), `runner` (requests and
figures), `report` (table, JSON, chart), `gate` (promotion rules), `promote`, `cli`.
"""
