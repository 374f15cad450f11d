"""Results: one row per (task, shots, metric), written as JSON, a markdown table and a
PNG plot of each task's main metric against the number of shots. Every write is atomic."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from .metrics import Score


@dataclass
class Row:
    """One reported number."""

    task: str
    shots: int  # shots requested
    metric: str
    value: float
    n: int
    stderr: float
    primary: bool = False  # the task's headline metric (plotted)
    notes: dict = field(default_factory=dict)  # e.g. {"shots_reduced": 3, "min_shots": 1}

    @classmethod
    def of(cls, task: str, shots: int, metric: str, score: Score, primary: bool = False,
           notes: dict | None = None) -> "Row":
        return cls(task, shots, metric, score.value, score.n, score.stderr, primary, dict(notes or {}))

    def to_json(self) -> dict:
        d = asdict(self)
        for key in ("value", "stderr"):  # JSON has no NaN
            if isinstance(d[key], float) and math.isnan(d[key]):
                d[key] = None
        if not d["notes"]:
            d.pop("notes")
        return d


def results_json(rows: list[Row], meta: dict) -> dict:
    return {**meta, "results": [r.to_json() for r in rows]}


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(rows: list[Row]) -> str:
    """Tasks × metrics down, shot counts across: `value ± stderr (n)`."""
    shots = sorted({r.shots for r in rows})
    keys: list[tuple[str, str]] = []
    cells: dict[tuple[str, str, int], Row] = {}
    for r in rows:
        if (r.task, r.metric) not in keys:
            keys.append((r.task, r.metric))
        cells[(r.task, r.metric, r.shots)] = r
    head = "| task | metric | " + " | ".join(f"{k}-shot" for k in shots) + " |"
    lines = [head, "|" + "---|" * (len(shots) + 2)]
    for task, metric in keys:
        out = []
        for k in shots:
            r = cells.get((task, metric, k))
            if r is None:
                out.append("")
                continue
            text = f"{_fmt(r.value)} ± {_fmt(r.stderr)} (n={r.n})"
            if r.notes.get("shots_reduced"):
                text += f" †{r.notes['shots_reduced']}"
            out.append(text)
        name = f"**{metric}**" if any(cells[(task, metric, k)].primary for k in shots
                                      if (task, metric, k) in cells) else metric
        lines.append(f"| {task} | {name} | " + " | ".join(out) + " |")
    if any(r.notes.get("shots_reduced") for r in rows):
        lines.append("")
        lines.append("† items whose prompt did not fit the model's context with K demonstrations "
                     "were run with fewer (GPT-3 did the same); the number says how many.")
    return "\n".join(lines) + "\n"


def plot_png(rows: list[Row], title: str = "") -> bytes:
    """Each task's primary metric against shots, with ±1 standard error bars (subtasks are
    left to the table)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        # BIG-bench's normalized aggregate is on a 0-100 scale; it stays in the table so
        # the 0-1 grades keep a readable axis
        if r.primary and not r.notes.get("subtask_of") and r.metric != "normalized_aggregate_score":
            series.setdefault((r.task, r.metric), []).append(r)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for (task, metric), rs in series.items():
        rs = sorted(rs, key=lambda r: r.shots)
        err = [0.0 if math.isnan(r.stderr) else r.stderr for r in rs]
        ax.errorbar([r.shots for r in rs], [r.value for r in rs], yerr=err, marker="o", capsize=3,
                    label=f"{task} ({metric})")
    all_shots = sorted({r.shots for r in rows})
    ax.set_xticks(all_shots)
    ax.set_xlabel("shots (K demonstrations in the prompt)")
    ax.set_ylabel("score")
    ax.set_title(title or "few-shot evaluation")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(out: str | Path, rows: list[Row], meta: dict) -> dict[str, Path]:
    """results.json, results.md and results.png in `out`; returns their paths."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "results.json", "markdown": d / "results.md", "plot": d / "results.png"}
    atomic_write_json(paths["json"], results_json(rows, meta))
    title = f"{meta.get('model', '')}".strip()
    header = f"# Evaluation of {title}\n\n" if title else ""
    settings = ", ".join(f"{k}={meta[k]}" for k in ("seed", "limit") if meta.get(k) is not None)
    atomic_write_text(paths["markdown"], header + (f"Settings: {settings}\n\n" if settings else "")
                      + markdown_table(rows))
    atomic_write_bytes(paths["plot"], plot_png(rows, title=title))
    return paths
