"""Training metrics: one JSON object per line in metrics.jsonl, and a loss-curve plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from septet.errors import DataError
from septet.fileio import atomic_path, atomic_write_text


def _plain(value):
    """Tensors / numpy scalars -> Python numbers so rows stay JSON."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl. A torn last line (a crash mid-write) is ignored;
    a bad line elsewhere is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; train a model first or point to its metrics.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path} line {i + 1} is not JSON; delete that line or the file") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {i + 1} is not a JSON object; delete that line or the file")
        rows.append(row)
    return rows


class MetricsLog:
    """Appends rows to metrics.jsonl, flushing each one.

    resume_step=None starts a fresh log (an existing file is replaced); an int keeps the
    rows with step <= resume_step and drops the later ones, which the resumed run will
    write again, so the file never holds a step twice.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            kept = []
            if self.path.exists():
                kept = [r for r in read_metrics(self.path) if r.get("step", -math.inf) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, row: dict) -> None:
        if self._file.closed:
            raise ValueError(f"MetricsLog for {self.path} is closed")
        line = json.dumps({k: _plain(v) for k, v in row.items()})
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> None:
    """Train loss ("loss" or "train_loss") vs step, plus "val_loss" rows, as a PNG."""
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    train = [(r["step"], r.get("loss", r.get("train_loss"))) for r in rows
             if "step" in r and r.get("loss", r.get("train_loss")) is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if "step" in r and r.get("val_loss") is not None]
    if not train and not val:
        raise DataError(f"{metrics_path} has no rows with 'step' and 'loss'/'val_loss'; nothing to plot")

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="val loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")


__all__ = ["MetricsLog", "plot_loss_curve", "read_metrics"]
