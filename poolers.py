"""Learned token poolers: tokens [B, T, D] -> one vector per image, each as the strongest peer defines it.

The peer is the efficient-probing benchmark (github billpsomas/efficient-probing, `probe_heads.py` and
`poolings/`): its 14 learned heads, re-implemented here on timm's layers with the peer's defaults. `heads.py`
decides which tokens a pooler reads (the patches, or [cls] and the patches for the `_all` variants) and wraps it
in a probe. Every pooler keeps the weights it gave the tokens in its last forward in `attention_map`: [B, T] (mean
over attention heads) or [B, Q, T] for several queries. Poolers built on a timm module whose fused attention
returns no weights recompute the map from the same weights in eval mode only, so training pays nothing for it.
"""
import math
from functools import partial
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import AttentionPool2d, AttentionPoolLatent, Mlp, trunc_normal_
from timm.layers.cbam import CbamModule
from timm.models.cait import LayerScaleBlockClassAttn
from timm.models.vision_transformer import Block


class BatchNormAcrossRanks(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of every DDP process.

    On CUDA the entry point converts it to torch's SyncBatchNorm (NCCL). SyncBatchNorm refuses CPU tensors, so on
    gloo this computes the same statistics in float64 with a centred second pass: E[x^2] - E[x]^2 is no variance
    when a channel's mean is a thousand times its spread, as for MAE's pre-norm [cls]. Without torch.distributed
    (or with one process) it is plain BatchNorm1d.
    """

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x64 = x.double()
        count = torch.full((1,), float(x.shape[0]), dtype=torch.float64, device=x.device)
        # all_reduce from torch.distributed.nn carries gradients back to every rank's inputs
        totals = dist_nn.all_reduce(torch.cat([count, x64.sum(0)]))
        n = totals[0]
        mean = totals[1:] / n
        centred = x64 - mean
        var = dist_nn.all_reduce(centred.pow(2).sum(0)) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            unbiased = var * n / (n - 1).clamp_min(1)
            self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        out = centred / torch.sqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.double() + self.bias.double()
        return out.to(x.dtype)


def check_heads(dim: int, heads: int, what: str) -> None:
    if heads < 1 or dim % heads:
        raise ValueError(f"{what}: {heads} attention heads do not divide the embedding width {dim}")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention of queries q [B or 1, Q, C] over keys k [B, T, C] and values v [B, T, C'], each head on
    its slice of the channels, scaled by the head width^-1/2: ([B, Q, C'], weights [B, heads, Q, T]).

    The softmax is explicit (not SDPA) because the poolers keep the weights: one query costs a [B, heads, T] map."""
    (b, t, _), queries = k.shape, q.shape[1]
    qh = q.expand(b, -1, -1).reshape(b, queries, heads, -1).transpose(1, 2)
    kh = k.reshape(b, t, heads, -1).transpose(1, 2)
    vh = v.reshape(b, t, heads, -1).transpose(1, 2)
    weights = (qh * qh.shape[-1] ** -0.5 @ kh.transpose(-2, -1)).softmax(-1)
    return (weights @ vh).transpose(1, 2).reshape(b, queries, -1), weights


class Pooler(nn.Module):
    """tokens [B, T, D] -> [B, out_dim]."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.attention_map: Optional[torch.Tensor] = None


def _as_grid(tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """[B, H*W, D] in row-major grid order -> [B, D, H, W]."""
    (b, t, d), (h, w) = tokens.shape, grid
    if t != h * w:
        raise ValueError(f"{t} tokens do not fill the {h}x{w} patch grid this pooler was built for")
    return tokens.transpose(1, 2).reshape(b, d, h, w)


# ------------------------------------------------------------------------------------ queries without projections

class EfficientProbing(Pooler):
    """EP: learnable queries attend to the tokens (no q/k projections, keys are the tokens); one value projection
    to D/d_out is split into Q slices, query q pools slice q; the slices concatenate back to D/d_out."""

    def __init__(self, dim: int, num_queries: int = 32, d_out: int = 1):
        if num_queries < 1 or d_out < 1 or dim % (num_queries * d_out):
            raise ValueError(f"{num_queries} queries x d_out {d_out} do not divide the embedding width {dim}")
        super().__init__(dim // d_out)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.value = nn.Linear(dim, dim // d_out, bias=False)
        self.scale = dim ** -0.5

    def forward(self, x):
        (b, n, _), q = x.shape, self.queries.shape[0]
        attn = torch.einsum("qd,bnd->bqn", self.queries * self.scale, x).softmax(-1)
        self.attention_map = attn.detach()
        values = self.value(x).reshape(b, n, q, self.out_dim // q)
        return torch.einsum("bqn,bnqc->bqc", attn, values).reshape(b, self.out_dim)


class SimPool(Pooler):
    """SimPool: the mean token is the query; keys and values are the LayerNorm-ed tokens; one head."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.scale = dim ** -0.5

    def forward(self, x):
        query = self.wq(x.mean(1))
        normed = self.norm(x)
        attn = (torch.einsum("bd,bnd->bn", query, self.wk(normed)) * self.scale).softmax(-1)
        self.attention_map = attn.detach()
        return torch.einsum("bn,bnd->bd", attn, normed)


class ESimPool(Pooler):
    """The peer's esimpool (SimPool without linears): query LayerNorm(mean token), keys LayerNorm(tokens) (the same
    LayerNorm), values the raw tokens, `heads` heads on channel slices. Only the LayerNorm's affine is learned."""

    def __init__(self, dim: int, heads: int = 12):
        check_heads(dim, heads, "esimpool")
        super().__init__(dim)
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        out, attn = attend(self.norm(x.mean(1, keepdim=True)), self.norm(x), x, self.heads)
        self.attention_map = attn.mean(1)[:, 0].detach()
        return out[:, 0]


class AimPool(Pooler):
    """AIM's attention-pooling classifier without its linear: tokens through a BatchNorm (no affine, statistics over
    images and tokens), one learned query (no projection) attends to key/value projections (no biases)."""

    def __init__(self, dim: int, heads: int = 16):
        check_heads(dim, heads, "aim")
        super().__init__(dim)
        self.heads = heads
        self.norm = BatchNormAcrossRanks(dim, affine=False, eps=1e-6)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

    def forward(self, x):
        normed = self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        out, attn = attend(self.query, self.k(normed), self.v(normed), self.heads)
        self.attention_map = attn.mean(1)[:, 0].detach()
        return out[:, 0]


# ------------------------------------------------------------------------------------ one query, projections

def latent_pool_attention(pool: AttentionPoolLatent, x: torch.Tensor) -> torch.Tensor:
    """[B, T] weights of timm AttentionPoolLatent's (first) latent query, mean over heads. timm's forward returns no
    attention (fused kernel); this recomputes it from the same weights."""
    (b, n, d), heads, head_dim = x.shape, pool.num_heads, pool.head_dim
    q = pool.q_norm(pool.q(pool.latent).reshape(1, -1, heads, head_dim).transpose(1, 2))
    k = F.linear(x, pool.kv.weight[:d], None if pool.kv.bias is None else pool.kv.bias[:d])
    k = pool.k_norm(k.reshape(b, n, heads, head_dim).transpose(1, 2))
    attn = (q * pool.scale @ k.transpose(-2, -1)).softmax(-1)  # [B, heads, L, T]
    return attn.mean(1)[:, 0]


class LatentAttentionPool(Pooler):
    """timm AttentionPoolLatent: one latent query, `heads` heads. `full`: with its output projection and MLP
    (SigLIP's head: the peer's siglip), else in pre-logits mode (the pooled values only: our map)."""

    def __init__(self, dim: int, heads: int = 8, full: bool = False):
        check_heads(dim, heads, "siglip" if full else "map")
        super().__init__(dim)
        self.pool = AttentionPoolLatent(dim, out_features=None if full else 0, num_heads=heads)

    def forward(self, x):
        if not self.training:
            with torch.no_grad():
                self.attention_map = latent_pool_attention(self.pool, x)
        return self.pool(x)


class ClipAttentionPool(Pooler):
    """CLIP's attention pool as the peer uses it: LayerNorm on the tokens, then timm AttentionPool2d (the mean token
    as query over itself and the tokens, a learned position embedding per grid cell, 4 heads, output projection)."""

    def __init__(self, dim: int, grid: Tuple[int, int], heads: int = 4):
        check_heads(dim, heads, "clip")
        super().__init__(dim)
        self.grid = tuple(grid)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pool = AttentionPool2d(dim, feat_size=self.grid, num_heads=heads)

    def forward(self, x):
        normed = self.norm(x)
        if not self.training:
            with torch.no_grad():
                self.attention_map = self._attention(normed)
        return self.pool(_as_grid(normed, self.grid))

    def _attention(self, normed):
        # the mean query's weights over the tokens (its own key left out), from AttentionPool2d's own weights
        pool, b = self.pool, normed.shape[0]
        x = torch.cat([normed.mean(1, keepdim=True), normed], 1) + pool.pos_embed
        q, k, _ = pool.qkv(x).reshape(b, x.shape[1], 3, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q[:, :, :1] * pool.scale @ k.transpose(-2, -1)).softmax(-1)  # [B, heads, 1, 1 + T]
        return attn.mean(1)[:, 0, 1:]


class CocaPool(Pooler):
    """CoCa's attentional pooler: a LayerNorm-ed (no bias) learned query, 8 heads of 64 on a 512-wide query
    projection, one 64-wide key and value shared by every head (multi-query), an output projection; no biases.

    The peer builds 196 queries and returns the first one's output; queries are normalised and attend
    independently, so the other 195 never reach the output: one query computes the same."""

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64):
        super().__init__(dim)
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, dim))
        self.norm = nn.LayerNorm(dim, bias=False)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x):
        q = self.to_q(self.norm(self.query)).reshape(self.heads, -1)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        attn = (torch.einsum("hc,btc->bht", q * q.shape[-1] ** -0.5, k)).softmax(-1)
        self.attention_map = attn.mean(1).detach()
        return self.to_out(torch.einsum("bht,btc->bhc", attn, v).flatten(1))


class CaePool(Pooler):
    """CAE's attentive block: a learned query (zero-initialised, as the peer's) and the tokens pass separate
    LayerNorms for query, key and value; 8-head cross-attention (no q/k/v biases) and its output projection."""

    def __init__(self, dim: int, heads: int = 8):
        check_heads(dim, heads, "cae")
        super().__init__(dim)
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        out, attn = attend(self.q(self.norm_q(self.query)), self.k(self.norm_k(x)), self.v(self.norm_v(x)), self.heads)
        self.attention_map = attn.mean(1)[:, 0].detach()
        return self.proj(out[:, 0])


class JepaPool(Pooler):
    """I-JEPA's AttentivePooler (one query, depth 1): the raw learned query cross-attends to the LayerNorm-ed
    tokens (q and kv projections with biases, `heads` heads, output projection), residual, then a residual MLP on
    the LayerNorm-ed query. Initialised as I-JEPA's: trunc-normal std 0.02, zero biases, the two residual output
    weights divided by sqrt(2)."""

    def __init__(self, dim: int, heads: int = 16):
        check_heads(dim, heads, "jepa")
        super().__init__(dim)
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = Mlp(dim, 4 * dim)
        trunc_normal_(self.query, std=0.02)
        for linear in (self.q, self.kv, self.proj, self.mlp.fc1, self.mlp.fc2):
            trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        with torch.no_grad():
            for weight in (self.proj.weight, self.mlp.fc2.weight):
                weight.div_(math.sqrt(2.0))

    def forward(self, x):
        k, v = self.kv(self.norm1(x)).chunk(2, dim=-1)
        out, attn = attend(self.q(self.query), k, v, self.heads)
        self.attention_map = attn.mean(1)[:, 0].detach()
        pooled = self.query + self.proj(out)
        pooled = pooled + self.mlp(self.norm2(pooled))
        return pooled[:, 0]


class CaitPool(Pooler):
    """CaiT's class attention: one timm LayerScaleBlockClassAttn (4 heads, q/k/v biases, layer scale 1e-5) moves a
    learned [cls] token, which then passes a LayerNorm."""

    def __init__(self, dim: int, heads: int = 4):
        check_heads(dim, heads, "cait")
        super().__init__(dim)
        self.block = LayerScaleBlockClassAttn(dim, heads, qkv_bias=True, init_values=1e-5,
                                              norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x):
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if not self.training:
            with torch.no_grad():
                self.attention_map = self._attention(x, cls)
        return self.norm(self.block(x, cls))[:, 0]

    def _attention(self, x, cls):
        # the class token's weights over the tokens (its own key left out), from ClassAttn's own weights
        attn, u = self.block.attn, self.block.norm1(torch.cat([cls, x], 1))
        q, k = attn.q(u[:, :1]), attn.k(u)
        b, t, heads = k.shape[0], k.shape[1], attn.num_heads
        q = q.reshape(b, 1, heads, -1).transpose(1, 2)
        k = k.reshape(b, t, heads, -1).transpose(1, 2)
        return (q * attn.scale @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0, 1:]


# ------------------------------------------------------------------------ over the tokens' grid or each token

class DinoViTPool(Pooler):
    """The peer's dinovit: one more transformer block over the tokens (DINOv2's: 8 heads, no qkv bias, no layer
    scale, LayerNorm eps 1e-5; timm's Block), then the mean token. Its map: the attention each token receives,
    mean over queries and heads (eval mode only)."""

    def __init__(self, dim: int, heads: int = 8):
        check_heads(dim, heads, "dinovit")
        super().__init__(dim)
        self.block = Block(dim, heads, mlp_ratio=4.0, qkv_bias=False, norm_layer=nn.LayerNorm)

    def forward(self, x):
        if not self.training:
            with torch.no_grad():
                attn = self.block.attn
                b, t, _ = x.shape
                q, k, _ = attn.qkv(self.block.norm1(x)).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
                self.attention_map = (q * attn.scale @ k.transpose(-2, -1)).softmax(-1).mean((1, 2))
        return self.block(x).mean(1)


class CbamPool(Pooler):
    """CBAM as the peer pools with it: the tokens on their grid through timm's CbamModule (channel gate from the
    average- and max-pooled channels, then a spatial gate from a 7x7 conv + BatchNorm), plus the tokens, ReLU,
    average over the grid. Its map is the spatial gate (a sigmoid per patch, not a distribution; eval mode only)."""

    def __init__(self, dim: int, grid: Tuple[int, int]):
        super().__init__(dim)
        self.grid = tuple(grid)
        self.cbam = CbamModule(dim, spatial_kernel_size=7)

    def forward(self, x):
        maps = _as_grid(x, self.grid)
        if not self.training:
            with torch.no_grad():
                gated = self.cbam.channel(maps)
                pooled = torch.cat([gated.mean(1, keepdim=True), gated.amax(1, keepdim=True)], 1)
                self.attention_map = self.cbam.spatial.gate(self.cbam.spatial.conv(pooled)).flatten(1)
        return F.relu(self.cbam(maps) + maps).mean((2, 3))


class DolgPool(Pooler):
    """DOLG's spatial attention without ASPP, on each token (its 1x1 convolutions are Linears): f = BatchNorm(Linear
    (x)); the output is the mean over tokens of softplus(Linear(ReLU(f))) * f / |f|. Initialised as DOLG's convs
    (weights normal with std sqrt(2 / fan_out), biases torch's default)."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.conv1 = nn.Linear(dim, dim)
        self.norm = BatchNormAcrossRanks(dim, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Linear(dim, 1)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=math.sqrt(2.0 / conv.out_features))

    def forward(self, x):
        f = self.norm(self.conv1(x).reshape(-1, x.shape[-1])).reshape(x.shape)
        score = F.softplus(self.conv2(F.relu(f)))  # [B, T, 1]
        self.attention_map = score[..., 0].detach()
        return (score * F.normalize(f, dim=-1)).mean(1)
