"""Scoring a classifier on labelled examples: accuracy, per-class precision/recall, confusion."""

from __future__ import annotations

import numpy as np


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_labels: int) -> np.ndarray:
    """Rows are true labels, columns predicted labels."""
    flat = np.asarray(targets) * num_labels + np.asarray(predictions)
    return np.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def report(labels: list[str], targets: np.ndarray, predictions: np.ndarray, sources=None) -> dict:
    """The ``kws eval --json`` object: accuracy, per_class, confusion (and recall by source)."""
    matrix = confusion_matrix(targets, predictions, len(labels))
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    hits = np.diag(matrix)
    per_class = {
        label: {
            "precision": float(hits[i] / predicted[i]) if predicted[i] else 0.0,
            "recall": float(hits[i] / support[i]) if support[i] else 0.0,
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    result = {
        "accuracy": float(hits.sum() / max(1, matrix.sum())),
        "examples": int(matrix.sum()),
        "per_class": per_class,
        "confusion": {"labels": list(labels), "matrix": matrix.tolist()},
    }
    if sources is not None:
        correct = np.asarray(targets) == np.asarray(predictions)
        result["accuracy_by_source"] = {
            str(source): {
                "accuracy": float(correct[sources == source].mean()),
                "examples": int((sources == source).sum()),
            }
            for source in sorted(set(sources))
        }
    return result


def format_report(result: dict) -> str:
    """Human-readable text of ``report``."""
    labels = result["confusion"]["labels"]
    width = max(9, *(len(label) for label in labels))
    lines = [f"accuracy {result['accuracy']:.2%} on {result['examples']} examples", ""]
    lines.append(f"{'class':<{width}}  precision  recall  support")
    for label, row in result["per_class"].items():
        lines.append(f"{label:<{width}}  {row['precision']:9.2%}  {row['recall']:6.2%}  {row['support']:7d}")
    if "accuracy_by_source" in result:
        lines += ["", "accuracy by where examples come from:"]
        for source, row in result["accuracy_by_source"].items():
            lines.append(f"  {source:<16} {row['accuracy']:7.2%} of {row['examples']}")
    lines += ["", "confusion (rows: true, columns: predicted)"]
    short = [label[:6] for label in labels]
    lines.append(" " * width + "".join(f"{s:>7}" for s in short))
    for label, row in zip(labels, result["confusion"]["matrix"], strict=True):
        lines.append(f"{label:<{width}}" + "".join(f"{v:7d}" for v in row))
    return "\n".join(lines)
