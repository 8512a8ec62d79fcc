"""Scoring a classifier on labelled examples: accuracy, per-class precision/recall, confusion."""

from __future__ import annotations

from collections import Counter

import numpy as np

from kws.stream import UNKNOWN

# Under this many clips of a keyword, one clip moves its accuracy or recall by over 5 points,
# and what is tuned on them (a best epoch, a threshold) fits a handful of speakers.
FEW_CLIPS = 20


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_labels: int) -> np.ndarray:
    """Rows are true labels, columns predicted labels."""
    flat = np.asarray(targets) * num_labels + np.asarray(predictions)
    return np.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def report(labels: list[str], targets: np.ndarray, predictions: np.ndarray, sources=None, words=None) -> dict:
    """The ``kws eval --json`` object: accuracy, per_class, confusion (and accuracy_by_source; with
    ``words``, each other word's clips: how many were rejected and what the rest were taken for)."""
    matrix = confusion_matrix(targets, predictions, len(labels))
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    hits = np.diag(matrix)
    per_class = {
        label: {
            # None (JSON null) where undefined: a class never predicted, or never present.
            "precision": float(hits[i] / predicted[i]) if predicted[i] else None,
            "recall": float(hits[i] / support[i]) if support[i] else None,
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    result = {
        "accuracy": float(hits.sum() / max(1, matrix.sum())),
        "accuracy_interval": accuracy_interval(int(hits.sum()), int(matrix.sum())),
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
    if sources is not None and words is not None:
        other = np.asarray(sources) == "other word"
        result["other_words"] = other_words(labels, np.asarray(words)[other], np.asarray(predictions)[other])
    return result


def accuracy_interval(correct: int, examples: int) -> list[float] | None:
    """The 95 % confidence interval of an accuracy of ``correct`` in ``examples`` (Wilson's, which
    stays within [0, 1] for few examples or all right): the accuracies that many examples cannot
    tell apart. None for no examples. Clips by one speaker fail together, so the true spread is
    wider still."""
    if not examples:
        return None
    from scipy.stats import binomtest  # 0.7 s to import: only for the commands that score

    interval = binomtest(correct, examples).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(float(interval.low), 5), round(float(interval.high), 5)]


def other_words(labels: list[str], words: np.ndarray, predictions: np.ndarray) -> dict:
    """Clips of words that are not keywords, by word, worst rejected first: how many the model
    called ``_unknown_`` and which labels it gave the others (most often first)."""
    unknown = labels.index(UNKNOWN)
    result = {}
    for word in sorted(set(words)):
        predicted = np.asarray(predictions)[words == word]
        wrong = Counter(labels[i] for i in predicted if i != unknown)
        result[str(word)] = {
            "examples": len(predicted),
            "rejected": int((predicted == unknown).sum()),
            "taken_for": dict(wrong.most_common()),
        }
    return dict(sorted(result.items(), key=lambda item: item[1]["rejected"] / item[1]["examples"]))


def few_clips(counts: dict[str, int]) -> dict[str, int]:
    """The keywords of ``counts`` (keyword -> clips) that have clips, but fewer than FEW_CLIPS."""
    return {keyword: count for keyword, count in counts.items() if 0 < count < FEW_CLIPS}


def clip_counts(counts: dict[str, int]) -> str:
    """Keywords and their clips as warnings name them: "'yes' (3), 'no' (4)"."""
    return ", ".join(f"{keyword!r} ({count})" for keyword, count in counts.items())


def tally(counts: Counter) -> str:
    """Counts as "a 3, b 1", the most first."""
    return ", ".join(f"{key} {count}" for key, count in counts.most_common())


def percent(value: float | None, places: int = 1) -> str:
    """A share as a percentage; "n/a" where it is undefined (None: nothing to count it on)."""
    return "n/a" if value is None else f"{value:.{places}%}"


def _interval(result: dict) -> str:
    interval = result.get("accuracy_interval")
    return f" (95 % interval {interval[0]:.1%} to {interval[1]:.1%})" if interval else ""


def format_report(result: dict) -> str:
    """Human-readable text of ``report``."""
    labels = result["confusion"]["labels"]
    width = max(9, *(len(label) for label in labels))
    lines = [f"accuracy {result['accuracy']:.2%} on {result['examples']} examples{_interval(result)}", ""]
    lines.append(f"{'class':<{width}}  precision  recall  support")
    for label, row in result["per_class"].items():
        precision, recall = percent(row["precision"], 2), percent(row["recall"], 2)
        lines.append(f"{label:<{width}}  {precision:>9}  {recall:>6}  {row['support']:7d}")
    if "accuracy_by_source" in result:
        lines += ["", "accuracy by where examples come from:"]
        for source, row in result["accuracy_by_source"].items():
            lines.append(f"  {source:<16} {row['accuracy']:7.2%} of {row['examples']}")
    if result.get("other_words"):
        lines += [
            "",
            "other words (each should be _unknown_): clips rejected, and what the rest were taken for",
        ]
        for word, row in result["other_words"].items():
            taken = ", ".join(f"{label} {count}" for label, count in row["taken_for"].items())
            rejected = f"{row['rejected']}/{row['examples']}"
            lines.append(f"  {word:<16} {rejected:>7}" + (f"   {taken}" if taken else ""))
    lines += ["", "confusion (rows: true, columns: predicted)"]
    matrix = result["confusion"]["matrix"]
    # Each column as wide as its label, whole: a cut "_silen" or "backwa" has to be guessed at.
    columns = [
        1 + max(6, len(label), *(len(str(row[i])) for row in matrix)) for i, label in enumerate(labels)
    ]
    lines.append(" " * width + "".join(f"{label:>{w}}" for label, w in zip(labels, columns, strict=True)))
    for label, row in zip(labels, matrix, strict=True):
        lines.append(f"{label:<{width}}" + "".join(f"{v:{w}d}" for v, w in zip(row, columns, strict=True)))
    return "\n".join(lines)
