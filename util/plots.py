"""Figures of the attention-statistics script: metric vs depth (one or several runs), [cls]-attention overlays
and t-SNE scatters. Matplotlib's Agg backend only, so it runs on machines without a display."""
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from util.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

MAX_LEGEND_CLASSES = 20


def read_stats_csv(path):
    """(metric names, {metric: [value per block]}) from an attention_stats.csv; ValueError if it holds no
    statistics or a value is not a number."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = [name for name in (rows[0].keys() if rows else []) if name not in ("block", None)]
    if not rows or not metrics:
        raise ValueError(f"{path} holds no statistics")
    try:
        return metrics, {name: [float(row[name]) for row in rows] for name in metrics}
    except (TypeError, ValueError):
        raise ValueError(f"{path} is not an attention_stats.csv: a value is missing or not a number") from None


def plot_metric_vs_depth(runs, metric, path):
    """One line per run: runs = {label: [value per block]}."""
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for label, values in runs.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=label)
    ax.set_xlabel("block")
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def denormalize(images):
    """[B, 3, H, W] ImageNet-normalised tensors -> [B, H, W, 3] floats in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def plot_attention_overlays(images, maps, path, title):
    """Top row: the images; bottom row: each map [h, w] upsampled over its image."""
    count = len(images)
    pictures = denormalize(images)
    size = images.shape[-2:]
    upsampled = F.interpolate(maps.float().cpu()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    fig, axes = plt.subplots(2, count, figsize=(2 * count, 4.2), dpi=120, squeeze=False)
    for i in range(count):
        axes[0, i].imshow(pictures[i])
        axes[1, i].imshow(pictures[i])
        axes[1, i].imshow(upsampled[i].numpy(), cmap="jet", alpha=0.5)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_embedding_2d(points, labels, class_names, path, title):
    """Scatter of 2-D points coloured by label (legend with class names when there are few)."""
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    cmap = plt.get_cmap("tab20" if len(class_names) > 10 else "tab10")
    for label in np.unique(labels):
        chosen = labels == label
        name = class_names[label] if label < len(class_names) else str(label)
        ax.scatter(points[chosen, 0], points[chosen, 1], s=8, color=cmap(int(label) % cmap.N), label=name)
    if len(np.unique(labels)) <= MAX_LEGEND_CLASSES:
        ax.legend(fontsize=6, markerscale=1.5, loc="best")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
