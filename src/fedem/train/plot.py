"""The PNG every training run leaves beside its `metrics.jsonl`: loss, and bits-per-byte per language."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from fedem.train.trainer import read_metrics  # noqa: E402


def plot_metrics(out: Path, filename: str = "metrics.png") -> Path | None:
    """Plot training/eval loss and per-language eval bits-per-byte against step; None if nothing logged."""
    rows = read_metrics(out)
    if not rows:
        return None
    languages = sorted(
        {key[5:-4] for row in rows for key in row if key.startswith("eval_") and key.endswith("_bpb")} - {""}
    )
    figure, axes = plt.subplots(1, 2 if languages else 1, figsize=(12 if languages else 6, 4), squeeze=False)
    loss_axis = axes[0][0]
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(row["step"], row[key]) for row in rows if key in row]
        if points:
            loss_axis.plot(*zip(*points, strict=True), label=label)
    loss_axis.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    if loss_axis.lines:  # a run shorter than its logging interval has nothing to label
        loss_axis.legend()
    if languages:
        bpb_axis = axes[0][1]
        for lang in languages:
            points = [(row["step"], row[f"eval_{lang}_bpb"]) for row in rows if f"eval_{lang}_bpb" in row]
            bpb_axis.plot(*zip(*points, strict=True), marker=".", label=lang)
        bpb_axis.set(xlabel="step", ylabel="bits per byte", title="held-out bits-per-byte per language")
        bpb_axis.legend(ncol=2, fontsize="small")
    figure.tight_layout()
    path = out / filename
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
