"""Reports: results as JSON and markdown tables, mel-spectrogram figures, bootstrap confidence intervals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False, default=float) + "\n")
    return path


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: dict[str, dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows are conditions (e.g. test_seen, test_unseen), columns are metrics."""
    columns = columns or list(dict.fromkeys(key for row in rows.values() for key in row))
    lines = ["| condition | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_format(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_markdown_table(rows: dict[str, dict[str, Any]], path: Path, title: str = "",
                         columns: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# {title}\n\n" if title else "") + markdown_table(rows, columns) + "\n"
    path.write_text(text)
    return path


def plot_mel_pairs(pairs: list[tuple[str, np.ndarray, np.ndarray]], sample_rate: int, path: Path) -> Path:
    """A figure with one row per clip: original and reconstruction log-mel spectrograms side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from voxlm.eval.audio_metrics import log_mel

    fig, axes = plt.subplots(len(pairs), 2, figsize=(12, 2.6 * len(pairs)), squeeze=False)
    for row, (name, original, reconstruction) in enumerate(pairs):
        for col, (label, audio) in enumerate((("original", original), ("reconstruction", reconstruction))):
            axes[row, col].imshow(log_mel(audio, sample_rate), origin="lower", aspect="auto", cmap="magma",
                                  vmin=-5, vmax=1.5)
            axes[row, col].set_title(f"{name}: {label}", fontsize=9)
            axes[row, col].set_xlabel("frame")
            axes[row, col].set_ylabel("mel bin")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def bootstrap_ci(values: list[float] | np.ndarray, n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a percentile bootstrap confidence interval: (mean, low, high)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n_resamples, values.size), replace=True).mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
