"""Pictures for the dashboards (util/run_log.py): HxWx3 uint8 arrays drawn from plain tensors.

- attention_grid: an attentive probe's weights over the patches, overlaid on a fixed few validation images.
- mae_reconstruction_grid: MAE's masked input, reconstruction and original, one row per image.
- curve_picture: a line plot (the pretraining loss per epoch).
Nothing here knows a model: callers pass images (ImageNet-normalised [B, 3, H, W]) and maps/patches.
"""
import io

import numpy as np
import torch
import torch.nn.functional as F

from util.images import IMAGENET_MEAN, IMAGENET_STD
from util.plots import denormalize, plt

FIXED_IMAGES = 4  # the first images of a split drawn at every picture epoch


def pictures_due(epoch, every, epochs):
    """Whether an epoch draws pictures: every `every` epochs and after the last (every 0: never)."""
    return every > 0 and ((epoch + 1) % every == 0 or epoch == epochs - 1)


def fixed_images(dataset, count=FIXED_IMAGES):
    """The first `count` images of a deterministic (val-transform) dataset, stacked: the same every epoch."""
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])

GAP = 2  # white pixels between pictures


def _to_uint8(pictures):
    """[B, H, W, 3] floats in [0, 1] -> uint8."""
    return (np.clip(np.asarray(pictures, dtype=np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)


def _grid(rows, scale):
    """rows: list of lists of [H, W, 3] uint8, all the same size -> one picture, `scale` times larger."""
    h, w = rows[0][0].shape[:2]
    out = np.full((len(rows) * (h + GAP) - GAP, max(map(len, rows)) * (w + GAP) - GAP, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            out[r * (h + GAP):r * (h + GAP) + h, c * (w + GAP):c * (w + GAP) + w] = picture
    return out.repeat(scale, axis=0).repeat(scale, axis=1)


def overlay(picture, weights, alpha=0.5):
    """One [H, W, 3] float picture with a [h, w] map (scaled to its own min..max) upsampled over it in 'jet'."""
    size = picture.shape[:2]
    m = F.interpolate(torch.as_tensor(weights, dtype=torch.float32)[None, None], size=size, mode="nearest")[0, 0]
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    colour = plt.get_cmap("jet")(m.numpy())[..., :3]
    return (1 - alpha) * picture + alpha * colour


def attention_grid(images, maps, scale=1):
    """Row 1: the images; then one row per entry of `maps` ({name: [B, h, w] weights}), overlaid on them; the
    rows named on the left. A [B, Q, h, w] entry (several queries) shows the mean over its queries."""
    pictures = denormalize(images)
    rows = [list(_to_uint8(pictures))]
    for weights in maps.values():
        weights = weights.detach().float().cpu()
        weights = weights.mean(1) if weights.dim() == 4 else weights
        rows.append([_to_uint8(overlay(p, w)) for p, w in zip(pictures, weights)])
    return _labelled(_grid(rows, scale), ["image", *maps])


def _labelled(grid, row_names):
    """The grid with each row's name at its left (matplotlib), as a uint8 picture."""
    height, width = grid.shape[:2]
    fig = plt.figure(figsize=((width + 160) / 100, (height + 20) / 100), dpi=100)
    ax = fig.add_axes([150 / (width + 160), 10 / (height + 20), width / (width + 160), height / (height + 20)])
    ax.imshow(grid, interpolation="nearest")
    step = (height + GAP) / len(row_names)
    ax.set_yticks([step * (i + 0.5) for i in range(len(row_names))], row_names, fontsize=8)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    return _figure_array(fig)


def _figure_array(fig):
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def unpatchify(patches, patch_size, grid):
    """[B, N, p*p*3] (rows, columns, channels inside a patch; MAE's patchify) -> [B, 3, H, W]."""
    B, p, (h, w) = patches.shape[0], patch_size, grid
    x = patches.reshape(B, h, w, p, p, 3)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, 3, h * p, w * p)


def mae_reconstruction_grid(images, patches, pred, mask, patch_size, *, norm_pix_loss, scale=1):
    """One row per image: the masked input (masked patches grey), the reconstruction (visible patches as given,
    masked ones predicted) and the original. patches [B, N, p*p*3]: the images as the model patchifies them;
    pred in the loss's space: with norm_pix_loss each patch is put back on its own mean and variance, as MAE's
    visualisation does."""
    images = images.detach().float().cpu()
    B, _, H, W = images.shape
    grid = (H // patch_size, W // patch_size)
    target = patches.detach().float().cpu()
    pred = pred.detach().float().cpu()
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask.detach().float().cpu()[..., None]
    pixel_mask = unpatchify(m.expand_as(target), patch_size, grid)
    reconstruction = unpatchify(target * (1 - m) + pred * m, patch_size, grid)
    grey = torch.tensor([(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])[None, :, None, None]
    masked = images * (1 - pixel_mask) + grey * pixel_mask
    rows = [[_to_uint8(denormalize(x[None]))[0] for x in (masked[i], reconstruction[i], images[i])] for i in range(B)]
    return _grid(rows, scale)


def curve_picture(values, title, xlabel="epoch"):
    """A small line plot of `values` (x: 0, 1, ...) as a uint8 picture."""
    fig, ax = plt.subplots(figsize=(4, 2.6), dpi=100)
    ax.plot(range(len(values)), values, marker="o", markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_array(fig)
