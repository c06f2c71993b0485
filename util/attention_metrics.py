"""Per-block attention statistics of a ViT, from the records of `models_vit.capture_attention`.

Token layout: T = num_prefix + N tokens; token 0 is [cls] when the encoder has one (has_cls; by default
num_prefix > 0); registers, if any, follow it and are neither [cls] nor patches; tokens num_prefix.. are the N
patches of a grid (h, w) in row-major order. A = attn[b, head] is row-stochastic: A[q, k] is what query q gives
key k. "Renormalised" rows: P[q, k] = A[q, k] / sum_{k' patch} A[q, k'] over patch keys only.

Definitions (per image and head; the script averages them over images and heads, as gmum/beyond_cls does):
  cls_cls_attention              A[0, 0]
  pos_self_attention             mean_{q patch} A[q, q]
  cls_cls_attention_adj_for_cls  A[0, 0] / m_0                      m_q = sum_{k patch} A[q, k]
  pos_self_attention_adj_for_cls mean_{q patch} A[q, q] / m_q
  cls_pos_attention              mean_{k patch} A[0, k]
  pos_cls_attention              mean_{q patch} A[q, 0]
  cls_pos_entropy                H(P[0, :])                         H(p) = -sum p ln p (nats)
  pos_pos_entropy                mean_{q patch} H(P[q, :])
  cls_magnitude                  |attn branch out|_0 / |residual in|_0    (per image; no heads)
  pos_magnitude                  mean_{q patch} |attn branch out|_q / |residual in|_q
  attention_distance             mean_{q patch} sum_{k patch} P[q, k] d(q, k),  d = patch_size * Euclidean grid
                                 distance in pixels (naver-ai/cl-vs-mim)
  nmi                            I(Q; K) / sqrt(H(Q) H(K)) for the joint p(q, k) = P[q, k] / N, i.e. a uniform
                                 prior over patch queries; H(Q) = ln N, p(k) = mean_q P[q, k] (cl-vs-mim's
                                 normalisation). 1 when every query attends only to its own distinct key, 0 when
                                 the key does not depend on the query (then H(K) may be 0 too: defined as 0).
  fourier_delta_log_amplitude    see `fourier_delta_log_amplitude` (per image; no heads); left out on grids of
                                 fewer than 3 rows or columns, where it is always 0 (`fourier_grid_problem`)

Differences from the references, all below 1e-6 relative for ordinary attention: the paper adds 1e-6 to every
denominator and inside its log, cl-vs-mim adds 1e-8 to attention before renormalising; here sums are exact
(0 ln 0 = 0) and denominators are only clamped at 1e-6 so a query with no patch mass stays finite.
Encoders without [cls] get PATCH_METRICS only. Attention to registers counts in no patch-renormalised metric.
"""
import math
from functools import lru_cache

import torch

EPS = 1e-6  # floor of denominators; also cl-vs-mim's amplitude offset before the log
CLS_METRICS = ("cls_cls_attention", "pos_self_attention", "cls_cls_attention_adj_for_cls",
               "pos_self_attention_adj_for_cls", "cls_pos_attention", "pos_cls_attention", "cls_pos_entropy",
               "pos_pos_entropy", "cls_magnitude", "pos_magnitude", "attention_distance", "nmi",
               "fourier_delta_log_amplitude")
PATCH_METRICS = ("pos_self_attention", "pos_pos_entropy", "pos_magnitude", "attention_distance", "nmi",
                 "fourier_delta_log_amplitude")
PER_IMAGE_METRICS = ("cls_magnitude", "pos_magnitude", "fourier_delta_log_amplitude")  # no head axis


def metric_names(has_cls, grid=None):
    """The metrics of an encoder with or without [cls] on a `grid` of patches; the Fourier metric only where it is
    defined (`fourier_grid_problem`)."""
    names = CLS_METRICS if has_cls else PATCH_METRICS
    if grid is not None and fourier_grid_problem(grid):
        names = tuple(n for n in names if n != "fourier_delta_log_amplitude")
    return names


def fourier_grid_problem(grid):
    """Why `fourier_delta_log_amplitude` is undefined on `grid`, or None. With fewer than 3 rows or columns
    cl-vs-mim's half diagonal (from the centre of the shifted spectrum to its corner) holds the zero frequency
    alone, so its highest-minus-lowest would be 0 for any tokens."""
    h, w = grid
    if min(h, w) < 3:
        return (f"the Fourier metric needs a patch grid of at least 3x3: on {h}x{w} cl-vs-mim's half diagonal "
                "holds only the zero frequency")
    return None


def entropy(p, dim=-1):
    """Shannon entropy in nats with 0 ln 0 = 0."""
    return -torch.xlogy(p, p).sum(dim)


def patch_to_patch(attn, num_prefix):
    """[B, H, N, N] patch-query rows restricted to patch keys and renormalised to sum to 1."""
    patches = attn[..., num_prefix:, num_prefix:]
    return patches / patches.sum(-1, keepdim=True).clamp_min(EPS)


@lru_cache(maxsize=8)
def patch_distances(grid, patch_size):
    """[N, N] Euclidean distance in pixels between patch centres of a row-major grid (h, w)."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).float() * patch_size
    return torch.cdist(centres, centres)


def attention_distance(patch_attn, grid, patch_size):
    """[B, H] mean over queries of the attention-weighted distance (pixels) to the keys."""
    distances = patch_distances(tuple(grid), patch_size).to(patch_attn.device)
    return (patch_attn * distances).sum(-1).mean(-1)


def attention_nmi(patch_attn):
    """[B, H] normalised mutual information between query and key position (uniform query prior)."""
    n = patch_attn.shape[-1]
    key_marginal = patch_attn.mean(-2)  # p(k) = sum_q p(q) P[q, k] with p(q) = 1/N
    key_entropy = entropy(key_marginal)
    # I(Q;K) = H(K) - H(K|Q), and H(K|Q) = mean_q H(P[q, :])
    mutual_information = key_entropy - entropy(patch_attn).mean(-1)
    normaliser = torch.sqrt(math.log(n) * key_entropy)
    nmi = mutual_information / normaliser.clamp_min(EPS)
    return torch.where(normaliser > EPS, nmi, torch.zeros_like(nmi))


def fourier_delta_log_amplitude(patch_tokens, grid):
    """[B] cl-vs-mim's Δ log amplitude of the patch feature map, highest minus lowest frequency.

    For each image and channel c, F = FFT2 of the (h, w) map of channel c; L(u, v) = ln(|F(u, v)| + 1e-6).
    The value is mean_c L(u_max, v_max) - mean_c L(0, 0), with (u_max, v_max) = ((h-1)//2, (w-1)//2): the last
    point of the half diagonal that cl-vs-mim reads after its fftshift (`diag()[h//2:]`), i.e. the highest
    frequency it plots as 1.0π. Averaged over images this equals cl-vs-mim's curve end point. float64 keeps the
    empty bins of crafted maps at zero instead of rounding noise.
    """
    problem = fourier_grid_problem(grid)
    if problem:
        raise ValueError(problem)
    b, n, d = patch_tokens.shape
    h, w = grid
    maps = patch_tokens.double().transpose(1, 2).reshape(b, d, h, w)
    log_amplitude = (torch.fft.fft2(maps).abs() + EPS).log().mean(1)  # [B, h, w]
    return (log_amplitude[:, (h - 1) // 2, (w - 1) // 2] - log_amplitude[:, 0, 0]).float()


def block_metrics(record, num_prefix, grid, patch_size, has_cls=None):
    """{metric: tensor} for one block's record: [B, H] for attention metrics, [B] for PER_IMAGE_METRICS.

    `has_cls`: token 0 is [cls] (default: num_prefix > 0); False for an encoder with registers but no [cls]."""
    attn = record["attn"].float()
    patches = slice(num_prefix, None)
    self_attention = attn.diagonal(dim1=-2, dim2=-1)  # [B, H, T]
    patch_mass = attn[..., patches].sum(-1).clamp_min(EPS)  # [B, H, T]
    patch_attn = patch_to_patch(attn, num_prefix)
    magnitude = record["attn_out_norm"].float() / record["resid_norm"].float().clamp_min(EPS)  # [B, T]
    out = {
        "pos_self_attention": self_attention[..., patches].mean(-1),
        "pos_pos_entropy": entropy(patch_attn).mean(-1),
        "pos_magnitude": magnitude[:, patches].mean(-1),
        "attention_distance": attention_distance(patch_attn, grid, patch_size),
        "nmi": attention_nmi(patch_attn),
    }
    if not fourier_grid_problem(grid):
        out["fourier_delta_log_amplitude"] = fourier_delta_log_amplitude(record["out"][:, patches], grid)
    has_cls = num_prefix > 0 if has_cls is None else has_cls
    if not has_cls:
        return out
    cls_to_patches = attn[..., 0, patches]
    out.update({
        "cls_cls_attention": attn[..., 0, 0],
        "cls_cls_attention_adj_for_cls": attn[..., 0, 0] / patch_mass[..., 0],
        "pos_self_attention_adj_for_cls": (self_attention[..., patches] / patch_mass[..., patches]).mean(-1),
        "cls_pos_attention": cls_to_patches.mean(-1),
        "pos_cls_attention": attn[..., patches, 0].mean(-1),
        "cls_pos_entropy": entropy(cls_to_patches / cls_to_patches.sum(-1, keepdim=True).clamp_min(EPS)),
        "cls_magnitude": magnitude[:, 0],
    })
    return {name: out[name] for name in metric_names(has_cls, grid)}


class AttentionStatsAccumulator:
    """Running per-block sums over images: memory depends on depth x metrics x heads, not on the image count."""

    def __init__(self):
        self.sums = {}  # block -> metric -> float64 tensor, [H] or []
        self.images = 0

    def update(self, records, num_prefix, grid, patch_size, has_cls=None):
        """Adds one batch; `records` maps block index -> capture record (all from the same forward)."""
        batch = None
        for block in sorted(records):
            values = block_metrics(records[block], num_prefix, grid, patch_size, has_cls)
            sums = self.sums.setdefault(block, {})
            for name, value in values.items():
                batch = value.shape[0]
                sums[name] = sums.get(name, 0) + value.detach().double().sum(0).cpu()
        self.images += batch or 0

    def result(self):
        """{block: {metric: mean over images (and heads), metric + '_per_head': [mean over images per head]}}."""
        if not self.images:
            raise ValueError("no images were accumulated")
        out = {}
        for block, sums in sorted(self.sums.items()):
            row = {}
            for name, total in sums.items():
                mean = total / self.images
                row[name] = float(mean.mean())
                if mean.dim():
                    row[name + "_per_head"] = [float(v) for v in mean]
            out[block] = row
        return out
