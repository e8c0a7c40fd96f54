"""What `loraplex eval` prints and writes: a side-by-side table, JSON, a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraplex.trainer.evals.runner import EvalRun

# Figures the chart draws (per set, when present): rates in [0, 1], the judge's mean over 10.
CHART_FIGURES = ("pass_rate", "check_rate", "judge_mean")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def text_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[fmt(c) if not isinstance(c, str) else c for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def comparison(columns: list[tuple[str, dict[str, dict[str, Any]]]]) -> str:
    """Rows `set.figure`, one column per model: [(label, {set: figures})]."""
    keys: list[tuple[str, str]] = []
    for _, by_set in columns:
        for set_name, figs in by_set.items():
            for k in figs:
                if (set_name, k) not in keys:
                    keys.append((set_name, k))
    rows = [[f"{s}.{k}", *[by_set.get(s, {}).get(k) for _, by_set in columns]] for s, k in keys]
    return text_table(["FIGURE", *[label for label, _ in columns]], rows)


def run_table(run: EvalRun) -> str:
    cols = [(t.label, {s.name: run.figures(i, s.name) for s in run.sets})
            for i, t in enumerate(run.targets)]
    lines = [comparison(cols), ""]
    for s in run.sets:
        lines.append(f"set {s.name}: {len(s.items)} rows, sha256 {s.sha256[:16]}, {s.path}")
    for t in run.targets:
        if t.note:
            lines.append(f"{t.label}: {t.note}")
    if run.judge:
        lines.append(f"judge: {run.judge['model']} at {run.judge['url']} (1-10, rubric sha256 "
                     f"{run.judge['rubric_sha256'][:16]})")
    return "\n".join(lines)


def write_json(run: EvalRun, path: Path, extra: dict[str, Any] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**run.to_json(), **(extra or {})}, indent=2) + "\n")


def chart(run: EvalRun, path: Path, title: str | None = None) -> Path:
    """Grouped bars: per set and headline figure, one bar per model (judge_mean / 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: list[tuple[str, str]] = []
    for s in run.sets:
        for k in CHART_FIGURES:
            if any(run.figures(i, s.name).get(k) is not None for i in range(len(run.targets))):
                groups.append((s.name, k))
    n = max(1, len(run.targets))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 1.1 * len(groups) * max(1, n / 2)), 4.2))
    for i, t in enumerate(run.targets):
        values = []
        for s_name, k in groups:
            v = run.figures(i, s_name).get(k)
            values.append(0.0 if v is None else (v / 10 if k == "judge_mean" else v))
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=t.label)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}\n{k}" + (" /10" if k == "judge_mean" else "")
                        for s, k in groups], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score")
    ax.set_title(title or f"loraplex eval ({run.at[:16].replace('T', ' ')})", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
