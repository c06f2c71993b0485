"""util/dashboard.py: the pictures' pixels against hand-made inputs (MAE reconstructions, attention overlays)."""
import numpy as np
import pytest
import torch

from util.dashboard import GAP, attention_grid, mae_reconstruction_grid, overlay, pictures_due, unpatchify
from util.images import IMAGENET_MEAN, IMAGENET_STD
from util.plots import denormalize


def _panels(grid, rows, cols, size):
    """The [rows, cols] pictures of a _grid at scale 1."""
    return [[grid[r * (size + GAP):r * (size + GAP) + size, c * (size + GAP):c * (size + GAP) + size]
             for c in range(cols)] for r in range(rows)]


def _uint8(images):
    return (denormalize(images) * 255 + 0.5).astype(np.uint8)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_a_perfect_prediction_reconstructs_the_original_and_the_masked_input_is_grey_where_masked(norm_pix_loss):
    torch.manual_seed(0)
    images, p = torch.randn(2, 3, 16, 16) * 0.5, 4
    patches = torch.einsum("bchpwq->bhwpqc", images.reshape(2, 3, 4, p, 4, p)).reshape(2, 16, p * p * 3)
    target = patches
    if norm_pix_loss:  # what the model predicts: each patch on its own mean and variance (forward_loss)
        target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.zeros(2, 16)
    mask[0, [0, 5, 15]] = 1
    mask[1, :8] = 1
    grid = mae_reconstruction_grid(images, patches, target, mask, p, norm_pix_loss=norm_pix_loss)
    panels = _panels(grid, 2, 3, 16)
    originals = _uint8(images)
    for i in range(2):
        masked, reconstruction, original = panels[i]
        assert np.array_equal(original, originals[i])
        assert np.abs(reconstruction.astype(int) - originals[i]).max() <= 1
        pixel_mask = unpatchify(mask[i, :, None].expand(16, p * p * 3)[None], p, (4, 4))[0, 0].bool().numpy()
        assert np.array_equal(masked[~pixel_mask], originals[i][~pixel_mask])
        assert (masked[pixel_mask] == 128).all()  # mid grey


def test_a_wrong_prediction_shows_only_on_masked_patches():
    images = torch.zeros(1, 3, 8, 8)
    mask = torch.tensor([[1.0, 0, 0, 0]])
    pred = torch.full((1, 4, 48), 3.0)  # far from the image everywhere
    grid = mae_reconstruction_grid(images, torch.zeros(1, 4, 48), pred, mask, 4, norm_pix_loss=False)
    reconstruction, original = _panels(grid, 1, 3, 8)[0][1:]
    assert not np.array_equal(reconstruction[:4, :4], original[:4, :4])
    assert np.array_equal(reconstruction[4:], original[4:]) and np.array_equal(reconstruction[:, 4:], original[:, 4:])


def test_the_overlay_is_hot_where_the_weight_is():
    picture = np.zeros((8, 8, 3))
    weights = torch.zeros(2, 2)
    weights[1, 0] = 1.0  # bottom-left patch
    out = overlay(picture, weights)
    hot, cold = out[6, 1], out[1, 6]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red at the top of the scale, blue at the bottom
    assert np.allclose(out[4:, :4], out[6, 1]) and np.allclose(out[:4], out[1, 6])


def test_attention_grid_has_a_row_per_probe_and_averages_queries():
    images = torch.stack([(torch.zeros(3, 8, 8) - torch.tensor(IMAGENET_MEAN)[:, None, None])
                          / torch.tensor(IMAGENET_STD)[:, None, None]] * 3)
    one = attention_grid(images, {"a": torch.rand(3, 2, 2)}, scale=2)
    two = attention_grid(images, {"a": torch.rand(3, 2, 2), "b": torch.rand(3, 4, 2, 2)}, scale=2)
    assert two.shape[0] > one.shape[0] and two.shape[1] == one.shape[1] and two.dtype == np.uint8


@pytest.mark.parametrize("every, epochs, due", [(2, 5, [1, 3, 4]), (1, 3, [0, 1, 2]), (0, 4, []), (10, 4, [3])])
def test_pictures_every_n_epochs_and_after_the_last(every, epochs, due):
    assert [e for e in range(epochs) if pictures_due(e, every, epochs)] == due
