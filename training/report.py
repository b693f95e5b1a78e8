"""The evaluation report: report/metrics.json, a confusion matrix and a loss curve (PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from training.layout import (  # noqa: E402
    CONFUSION_MATRIX_PNG, LOSS_CURVE_PNG, METRICS_FILE, REPORT_METRICS_FILE, read_metrics_log,
)


def write_report(run_dir: Path, report_dir: Path, manifest: dict[str, Any], checkpoint: str,
                 extras: dict[str, Any] | None = None) -> dict[str, Any]:
    report_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics_log(run_dir / METRICS_FILE)
    summary = {
        "best_checkpoint": checkpoint,
        "step": manifest["step"],
        "metrics": manifest["metrics"],
        "labels": manifest.get("labels"),
        **manifest.get("details", {}),
        "evaluations": [r for r in records if r.get("event") == "eval"],
        **(extras or {}),
    }
    (report_dir / REPORT_METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    _loss_curve(records, report_dir / LOSS_CURVE_PNG)
    matrix = manifest.get("details", {}).get("confusion_matrix")
    if matrix:
        _confusion_matrix(matrix, manifest["labels"], report_dir / CONFUSION_MATRIX_PNG)
    return summary


def _loss_curve(records: list[dict[str, Any]], path: Path) -> None:
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval" and "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    size = max(4, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
