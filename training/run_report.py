"""The training-curve figure written beside each model artefact."""

from __future__ import annotations

import io

import matplotlib

# Agg renders to files without a display, as on cluster workers and CI.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def training_curve_png(history: list[dict], baselines: dict[str, dict], best_epoch: int) -> bytes:
    """Draw train loss and validation NDCG@10 / HR@10 by epoch; return the PNG bytes.

    ``history`` contains one entry per epoch with ``epoch``, ``train_loss`` and ``validation``;
    ``baselines`` maps a baseline's name to its ``validation`` metrics, drawn as flat lines.
    """
    epochs = [entry["epoch"] for entry in history]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))

    loss_axis.plot(epochs, [entry["train_loss"] for entry in history], marker="o")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("train loss")
    loss_axis.set_title("Training loss")

    for name in ("ndcg@10", "hr@10"):
        metric_axis.plot(epochs, [entry["validation"][name] for entry in history], marker="o", label=f"SASRec {name}")
    for color, (baseline, metrics) in enumerate(baselines.items(), start=2):
        if metrics:
            metric_axis.axhline(
                metrics["ndcg@10"], color=f"C{color}", linestyle="--", linewidth=1, label=f"{baseline} ndcg@10"
            )
    if best_epoch > 0:
        metric_axis.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    metric_axis.set_xlabel("epoch")
    metric_axis.set_ylabel("validation metric (full ranking)")
    metric_axis.set_title("Validation")
    metric_axis.legend(fontsize="small")

    for axis in (loss_axis, metric_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
