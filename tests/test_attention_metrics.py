"""util.attention_metrics on crafted attention whose statistics are computed by hand."""
import itertools
import math

import numpy as np
import pytest
import torch

from util.attention_metrics import (
    CLS_METRICS,
    PATCH_METRICS,
    AttentionStatsAccumulator,
    block_metrics,
    fourier_delta_log_amplitude,
    metric_names,
)

LOG_EPS = math.log(1e-6)  # cl-vs-mim's amplitude offset, seen in empty Fourier bins


def record(attn, resid_norm, attn_out_norm, out):
    return {"attn": attn, "resid_norm": resid_norm, "attn_out_norm": attn_out_norm, "out": out}


def constant_tokens(batch, tokens, channel_values):
    """Every token carries the same feature vector: the patch map of channel c is the constant c."""
    return torch.tensor(channel_values, dtype=torch.float32).expand(batch, tokens, -1).clone()


def mean_pairwise_distance(grid, patch_size):
    """Brute force over all N^2 ordered (query, key) pairs, self pairs included."""
    cells = list(itertools.product(range(grid[0]), range(grid[1])))
    total = sum(math.dist(a, b) for a, b in itertools.product(cells, cells))
    return patch_size * total / len(cells) ** 2


def check(result, expected, rel=1e-5, abs=1e-6):
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=rel, abs=abs), name


def as_floats(metrics):
    """Mean over images (and heads) of block_metrics' tensors."""
    return {name: float(value.mean()) for name, value in metrics.items()}


def test_uniform_attention():
    B, H, grid, patch = 2, 3, (3, 3), 16
    N = 9
    T = N + 1
    attn = torch.full((B, H, T, T), 1 / T)
    channels = [1.0, -2.0, 0.5]
    rec = record(attn, torch.full((B, T), 2.0), torch.full((B, T), 1.0), constant_tokens(B, T, channels))
    metrics = block_metrics(rec, 1, grid, patch)
    assert all(metrics[m].shape == (B, H) for m in CLS_METRICS if "magnitude" not in m and "fourier" not in m)
    # a constant map only has the DC bin: ln(1e-6) at the high frequency, ln(|c| * N) at (0, 0)
    fourier = LOG_EPS - sum(math.log(abs(c) * N + 1e-6) for c in channels) / len(channels)
    check(as_floats(metrics), {
        "cls_cls_attention": 1 / T, "pos_self_attention": 1 / T,
        "cls_cls_attention_adj_for_cls": 1 / N, "pos_self_attention_adj_for_cls": 1 / N,
        "cls_pos_attention": 1 / T, "pos_cls_attention": 1 / T,
        "cls_pos_entropy": math.log(N), "pos_pos_entropy": math.log(N),
        "cls_magnitude": 0.5, "pos_magnitude": 0.5,
        "attention_distance": mean_pairwise_distance(grid, patch), "nmi": 0.0,
        "fourier_delta_log_amplitude": fourier})


def test_patches_attend_to_themselves_cls_uniform():
    B, H, grid, patch = 1, 2, (2, 3), 8
    N, T = 6, 7
    attn = torch.zeros(B, H, T, T)
    attn[..., 1:, 1:] = torch.eye(N)
    attn[..., 0, :] = 1 / T
    rec = record(attn, torch.full((B, T), 4.0), torch.tensor([[1.0, 0, 0, 0, 0, 0, 2.0]]),
                 constant_tokens(B, T, [3.0]))
    check(as_floats(block_metrics(rec, 1, grid, patch)), {
        "cls_cls_attention": 1 / T, "pos_self_attention": 1.0,
        "cls_cls_attention_adj_for_cls": 1 / N, "pos_self_attention_adj_for_cls": 1.0,
        "cls_pos_attention": 1 / T, "pos_cls_attention": 0.0,
        "cls_pos_entropy": math.log(N), "pos_pos_entropy": 0.0,
        "cls_magnitude": 0.25, "pos_magnitude": 0.5 / N,
        "attention_distance": 0.0, "nmi": 1.0})


MIXED = torch.tensor([  # [cls, p(0,0), p(0,1), p(1,0), p(1,1)] on a 2x2 grid
    [0.5, 0.125, 0.125, 0.125, 0.125],
    [0.2, 0.8, 0.0, 0.0, 0.0],
    [0.0, 0.5, 0.5, 0.0, 0.0],
    [0.5, 0.0, 0.0, 0.25, 0.25],
    [0.0, 0.25, 0.25, 0.25, 0.25],
])


def mixed_expected():
    """By hand, row by row (patch rows renormalised over patch keys):
    row p00: self .8, patch mass .8, [cls] .2, P = [1,0,0,0],         H = 0,     distance 0
    row p01: self .5, mass 1,  [cls] 0,  P = [.5,.5,0,0],             H = ln 2,  distance .5*16 = 8
    row p10: self .25, mass .5, [cls] .5, P = [0,0,.5,.5],            H = ln 2,  distance .5*16 = 8
    row p11: self .25, mass 1, [cls] 0,  P = [.25]*4,                 H = ln 4,  distance .25*(16√2+16+16) = 4√2+8
    key marginal p(k) = mean of P rows = [1.75, .75, .75, .75] / 4; I = H(K) - mean H(P) = H(K) - ln 2.
    """
    key = [1.75 / 4, 0.75 / 4, 0.75 / 4, 0.75 / 4]
    key_entropy = -sum(p * math.log(p) for p in key)
    return {
        "cls_cls_attention": 0.5, "pos_self_attention": (0.8 + 0.5 + 0.25 + 0.25) / 4,
        "cls_cls_attention_adj_for_cls": 0.5 / 0.5, "pos_self_attention_adj_for_cls": (1 + 0.5 + 0.5 + 0.25) / 4,
        "cls_pos_attention": 0.125, "pos_cls_attention": (0.2 + 0 + 0.5 + 0) / 4,
        "cls_pos_entropy": math.log(4), "pos_pos_entropy": (0 + 2 * math.log(2) + math.log(4)) / 4,
        "cls_magnitude": 1 / 2, "pos_magnitude": (1 / 1 + 1 / 4 + 1 / 2 + 5 / 5) / 4,
        "attention_distance": (0 + 8 + 8 + 4 * math.sqrt(2) + 8) / 4,
        "nmi": (key_entropy - math.log(2)) / math.sqrt(math.log(4) * key_entropy),
    }


def mixed_record(batch=1):
    attn = MIXED.expand(batch, 1, 5, 5).clone()
    resid = torch.tensor([2.0, 1.0, 4.0, 2.0, 5.0]).expand(batch, 5)
    attn_out = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0]).expand(batch, 5)
    return record(attn, resid, attn_out, torch.randn(batch, 5, 4, generator=torch.Generator().manual_seed(0)))


def test_mixed_case_by_hand():
    check(as_floats(block_metrics(mixed_record(), 1, (2, 2), 16)), mixed_expected())


def test_accumulator_averages_heads_and_images_and_keeps_per_head_values():
    mixed = mixed_record(batch=2)
    N, T = 4, 5
    uniform_head = torch.full((2, 1, T, T), 1 / T)
    mixed["attn"] = torch.cat([mixed["attn"], uniform_head], dim=1)  # head 0 mixed, head 1 uniform
    acc = AttentionStatsAccumulator()
    acc.update({0: mixed, 3: mixed}, 1, (2, 2), 16)
    result = acc.result()
    assert acc.images == 2 and sorted(result) == [0, 3]
    by_hand = mixed_expected()
    uniform = {"cls_cls_attention": 1 / T, "pos_pos_entropy": math.log(N), "nmi": 0.0,
               "attention_distance": mean_pairwise_distance((2, 2), 16), "pos_cls_attention": 1 / T}
    for name, value in uniform.items():
        assert result[3][name + "_per_head"] == pytest.approx([by_hand[name], value], rel=1e-5, abs=1e-6)
        assert result[3][name] == pytest.approx((by_hand[name] + value) / 2, rel=1e-5, abs=1e-6)
    assert "cls_magnitude_per_head" not in result[0]  # magnitudes and spectra have no head axis
    assert result[0]["cls_magnitude"] == pytest.approx(0.5)


def test_streaming_equals_one_shot():
    gen = torch.Generator().manual_seed(3)
    B, H, T, D, grid = 7, 2, 10, 6, (3, 3)

    def batch_records(start, stop, all_records):
        return {k: {name: t[start:stop] for name, t in rec.items()} for k, rec in all_records.items()}

    records = {b: record(torch.randn(B, H, T, T, generator=gen).mul(3).softmax(-1),
                         torch.rand(B, T, generator=gen) + 0.5, torch.rand(B, T, generator=gen),
                         torch.randn(B, T, D, generator=gen)) for b in range(3)}
    one_shot = AttentionStatsAccumulator()
    one_shot.update(records, 1, grid, 16)
    streamed = AttentionStatsAccumulator()
    for start, stop in [(0, 3), (3, 6), (6, 7)]:
        streamed.update(batch_records(start, stop, records), 1, grid, 16)
    assert streamed.images == one_shot.images == B
    a, b = one_shot.result(), streamed.result()
    for block in a:
        for name in a[block]:
            assert b[block][name] == pytest.approx(a[block][name], rel=1e-6, abs=1e-7)
    # and the one-shot mean is the plain mean of the per-image, per-head values
    direct = block_metrics(records[1], 1, grid, 16)
    assert a[1]["nmi_per_head"] == pytest.approx(direct["nmi"].mean(0).tolist(), rel=1e-6)


def test_without_cls_only_patch_metrics():
    B, H, grid = 2, 1, (2, 2)
    N = 4
    rec = record(torch.full((B, H, N, N), 1 / N), torch.ones(B, N), torch.full((B, N), 3.0),
                 constant_tokens(B, N, [1.0]))
    acc = AttentionStatsAccumulator()
    acc.update({0: rec}, 0, grid, 16)
    result = acc.result()[0]
    assert {k for k in result if not k.endswith("_per_head")} == set(PATCH_METRICS) - {"fourier_delta_log_amplitude"}
    check({k: result[k] for k in metric_names(False, grid)}, {
        "pos_self_attention": 1 / N, "pos_pos_entropy": math.log(N), "pos_magnitude": 3.0,
        "attention_distance": mean_pairwise_distance(grid, 16), "nmi": 0.0})


@pytest.mark.parametrize("grid", [(4, 4), (3, 3), (4, 6)])
def test_fourier_of_offset_cosine_at_the_highest_frequency(grid):
    h, w = grid
    u, v = (h - 1) // 2, (w - 1) // 2  # last point of cl-vs-mim's half diagonal
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    offset, amplitude = 1.0, 3.0
    wave = offset + amplitude * torch.cos(2 * math.pi * (u * i / h + v * j / w))
    tokens = torch.stack([wave, -wave]).flatten(1).T.unsqueeze(0)  # [1, N, 2]: two channels, same |spectrum|
    # DC bin = offset * hw; the cosine puts amplitude * hw / 2 in the bins (u, v) and (-u, -v)
    expected = math.log(amplitude * h * w / 2 + 1e-6) - math.log(offset * h * w + 1e-6)
    assert fourier_delta_log_amplitude(tokens, grid).item() == pytest.approx(expected, rel=1e-6)


def test_fourier_of_checkerboard_is_beyond_the_half_diagonal():
    """A checkerboard lives at the Nyquist bin (h/2, w/2), which cl-vs-mim's half diagonal stops short of."""
    h = w = 4
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    board = 2.0 + (-1.0) ** (i + j)
    tokens = board.flatten()[None, :, None]
    expected = LOG_EPS - math.log(2.0 * h * w + 1e-6)
    assert fourier_delta_log_amplitude(tokens, (h, w)).item() == pytest.approx(expected, rel=1e-6)


def cl_vs_mim_delta_log_amplitude(maps, index=lambda f, h: np.diag(f)[h // 2:], shift=True):
    """naver-ai/cl-vs-mim's representation analysis, written again in numpy: log amplitude of each channel's
    FFT2 (+1e-6), shifted so the zero frequency sits at the centre, averaged over images and channels; the half
    diagonal from the centre to the corner, relative to the centre. Its last point (1.0 pi) is our metric averaged
    over images. `index` and `shift` make the wrong readings the test must tell apart."""
    b, c, h, w = maps.shape
    log_amplitude = np.log(np.abs(np.fft.fft2(maps)) + 1e-6)
    if shift:
        log_amplitude = np.fft.fftshift(log_amplitude, axes=(2, 3))
    curve = index(log_amplitude.mean(axis=(0, 1)), h)
    return (curve - curve[0])[-1]


def test_fourier_equals_cl_vs_mim_on_a_vit_b_grid():
    """14x14 patch tokens (ViT-B/16 at 224) with a smooth spatial structure, high-frequency texture and a channel
    mean far above the spread (as MAE's tokens): our per-image value, averaged, is cl-vs-mim's curve end."""
    h = w = 14
    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    smooth = np.cos(2 * np.pi * (i + 2 * j) / h)[None, None]
    maps = 100.0 + 3 * rng.standard_normal((2, 6, 1, 1)) * smooth + rng.standard_normal((2, 6, h, w))
    tokens = torch.from_numpy(maps).flatten(2).transpose(1, 2)  # [B, N, C], row-major patches as ViTs lay them
    ours = fourier_delta_log_amplitude(tokens, (h, w)).double().mean().item()
    reference = cl_vs_mim_delta_log_amplitude(maps)
    assert ours == pytest.approx(reference, rel=1e-5)
    # The wrong readings land far away, so the comparison above tells them apart.
    unshifted = cl_vs_mim_delta_log_amplitude(maps, shift=False)
    anti_diagonal = cl_vs_mim_delta_log_amplitude(maps, index=lambda f, h: np.diag(np.fliplr(f))[h // 2:])
    assert min(abs(unshifted - reference), abs(anti_diagonal - reference)) > 0.1


@pytest.mark.parametrize("grid", [(2, 2), (2, 3), (1, 14)])
def test_fourier_refuses_grids_without_a_frequency_beyond_zero(grid):
    """On fewer than 3 rows or columns cl-vs-mim's half diagonal holds the zero frequency alone: the metric is
    always 0 there, so the function refuses and block_metrics leaves it out."""
    tokens = torch.randn(1, grid[0] * grid[1], 4)
    with pytest.raises(ValueError, match="at least 3x3"):
        fourier_delta_log_amplitude(tokens, grid)
    assert "fourier_delta_log_amplitude" not in metric_names(True, grid)
    assert "fourier_delta_log_amplitude" in metric_names(True, (3, 3)) and "nmi" in metric_names(True, grid)


def without_tokens(rec, drop):
    """The record with the tokens in `drop` removed (attention rows and columns, norms, outputs)."""
    keep = [t for t in range(rec["attn"].shape[-1]) if t not in drop]
    return record(rec["attn"][..., keep, :][..., keep], rec["resid_norm"][:, keep], rec["attn_out_norm"][:, keep],
                  rec["out"][:, keep])


@pytest.mark.parametrize("has_cls", [True, False])
def test_registers_are_neither_cls_nor_patches(has_cls):
    """Token 0 is [cls] (when there is one); registers sit between it and the patches and count in no metric:
    every metric equals the one of the same attention with the register rows and columns removed."""
    B, H, grid, registers = 2, 3, (2, 3), 2
    prefix = int(has_cls) + registers
    T = prefix + grid[0] * grid[1]
    g = torch.Generator().manual_seed(4)
    rec = record(torch.randn(B, H, T, T, generator=g).mul(2).softmax(-1), torch.rand(B, T, generator=g) + 1,
                 torch.rand(B, T, generator=g), torch.randn(B, T, 5, generator=g))
    with_registers = as_floats(block_metrics(rec, prefix, grid, 16, has_cls=has_cls))
    assert set(with_registers) == set(CLS_METRICS if has_cls else PATCH_METRICS) - {"fourier_delta_log_amplitude"}
    register_tokens = set(range(int(has_cls), prefix))
    check(with_registers, as_floats(block_metrics(without_tokens(rec, register_tokens), int(has_cls), grid, 16)))
    acc = AttentionStatsAccumulator()
    acc.update({0: rec}, prefix, grid, 16, has_cls=has_cls)
    assert {k for k in acc.result()[0] if not k.endswith("_per_head")} == set(with_registers)
