"""PNG plots of training curves, confusion matrices and DET curves (matplotlib), as bytes: callers
write them with ``files.write_files`` (an export in one set with the files the plot describes)."""

from __future__ import annotations

import io

import numpy as np

DPI = 110


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(plt, fig) -> bytes:
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return png.getvalue()


def training_curves(history: list[dict]) -> bytes:
    """Loss and accuracy per epoch, training and validation."""
    plt = _figure()
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["loss"] for h in history], label="training")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.plot(epochs, [h["accuracy"] for h in history], label="training")
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(plt, fig)


def confusion(result: dict, title: str = "confusion") -> bytes:
    """A ``kws.evaluate.report`` confusion matrix, rows normalised, counts written in."""
    plt = _figure()
    labels = result["confusion"]["labels"]
    matrix = np.array(result["confusion"]["matrix"])
    rates = matrix / np.maximum(1, matrix.sum(axis=1, keepdims=True))
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(labels), 1 + 0.6 * len(labels)))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} (accuracy {result['accuracy']:.2%})")
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            ax.text(
                col,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rates[row, col] > 0.5 else "black",
            )
    return _png(plt, fig)


def det_curve(points: list[dict], operating: dict, operating_label: str) -> bytes:
    """Miss rate against false accepts per hour as one threshold sweeps all keywords (log x), and
    the ``operating`` point the thresholds in use give."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    miss = [100 * (1 - p["recall"]) for p in points]
    floor = 0.1  # zero false accepts, drawn at the left edge of the log axis
    ax.plot([max(floor, p["stream_fa_per_hour"]) for p in points], miss, label="test stream")
    if points and points[0]["speech_fa_per_hour"] is not None:
        ax.plot([max(floor, p["speech_fa_per_hour"]) for p in points], miss, "--", label="real speech only")
    ax.plot(
        [max(floor, operating["false_accepts_per_hour"])],
        [100 * (1 - operating["recall"])],
        "o",
        label=operating_label,
    )
    ax.set_xscale("log")
    ax.set(
        xlabel=f"false accepts per hour (none: drawn at {floor:g})",
        ylabel="miss rate (%)",
        title="DET: every keyword, one threshold",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _png(plt, fig)
