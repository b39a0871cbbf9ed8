"""Reports: results as JSON and markdown tables, mel-spectrogram figures, bootstrap confidence intervals.

A table has one row per condition (test_seen, test_unseen, librivox, a checkpoint, ...) and one column per
metric; `summarize` turns per-clip values into such a row (means and the clip count n).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _jsonable(value: Any) -> Any:
    """NumPy scalars and arrays, tuples and paths as plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(results: dict[str, Any], path: Path) -> Path:
    """Write `results` as indented JSON. Non-finite floats are kept as NaN / Infinity (Python's json reads
    them back as floats): an infinite SNR is a real result (identical audio), not a missing one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    return path


def summarize(records: list[dict[str, float]]) -> dict[str, float]:
    """One table row from per-clip metric dicts: the mean of each metric (NaNs ignored) and n clips."""
    if not records:
        return {"n": 0}
    names = list(dict.fromkeys(name for record in records for name in record))
    row: dict[str, float] = {}
    for name in names:
        values = np.array([record.get(name, math.nan) for record in records], dtype=np.float64)
        finite = values[~np.isnan(values)]
        row[name] = float(finite.mean()) if finite.size else math.nan
    row["n"] = len(records)
    return row


def _format(value: Any) -> str:
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: dict[str, dict[str, Any]], columns: list[str] | None = None,
                   row_label: str = "condition") -> str:
    """Rows are conditions (e.g. test_seen, test_unseen) or whatever `row_label` names, columns are metrics
    (default: all, in order)."""
    columns = columns or list(dict.fromkeys(key for row in rows.values() for key in row))
    lines = [f"| {row_label} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_format(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_markdown_table(rows: dict[str, dict[str, Any]], path: Path, title: str = "",
                         columns: list[str] | None = None) -> Path:
    """Write `markdown_table(rows)` to a .md file, under a `# title` heading when one is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# {title}\n\n" if title else "") + markdown_table(rows, columns) + "\n"
    path.write_text(text)
    return path


def plot_mel_pairs(pairs: list[tuple[str, np.ndarray, np.ndarray]], sample_rate: int, path: Path) -> Path:
    """A PNG with one row per clip (name, original, reconstruction): log-mel spectrograms side by side,
    on one shared color scale so a loss of detail shows as a loss of contrast."""
    # A bare Figure renders with Agg without touching pyplot's global backend or figure registry.
    from matplotlib.figure import Figure

    from voxlm.eval.audio_metrics import log_mel

    if not pairs:
        raise ValueError("no clips to plot")
    fig = Figure(figsize=(12, 2.6 * len(pairs)), layout="tight")
    axes = fig.subplots(len(pairs), 2, squeeze=False)
    for row, (name, original, reconstruction) in enumerate(pairs):
        for col, (label, audio) in enumerate((("original", original), ("reconstruction", reconstruction))):
            image = axes[row, col].imshow(log_mel(audio, sample_rate), origin="lower", aspect="auto",
                                          cmap="magma", vmin=-5, vmax=1.5)
            axes[row, col].set_title(f"{name}: {label}", fontsize=9)
            axes[row, col].set_xlabel("frame")
            axes[row, col].set_ylabel("mel bin")
        fig.colorbar(image, ax=axes[row, 1], label="log10 mel")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def bootstrap_ci(values: list[float] | np.ndarray, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a percentile bootstrap confidence interval: (mean, low, high). NaNs are dropped."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n_resamples, values.size), replace=True).mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
