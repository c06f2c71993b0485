"""Probe heads: every --cls_features value, one table, one Probe shape.

A probe is  aggregation (tokens -> one vector)  ->  BatchNorm1d(affine=False)  ->  Linear,  as in MAE's linear
probing. Aggregations read a `TokenBatch` (the frozen encoder's tokens, plus the last block's attention or an
oracle's [cls] attention when the head asks for them in `HEADS`). Every aggregation that weights patches keeps
its weights of the last forward in `attention_map`: [B, N] (or [B, Q, N] for several queries) over the N patch
tokens in row-major grid order, so `map.reshape(B, *grid)` is an image.
"""
from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn as nn
from timm.layers import AttentionPoolLatent, trunc_normal_

from abmilp import ACTIVATIONS, COND_CHOICES, CONTENT_CHOICES, SA_CHOICES, AbMILP


@dataclass
class TokenBatch:
    tokens: torch.Tensor                        # [B, T, D], T = num_prefix + H*W
    num_prefix: int                             # [cls] (token 0, if any) and register tokens before the patches
    grid: Tuple[int, int]                       # (H, W) patches
    attn: Optional[torch.Tensor] = None         # [B, heads, T, T] attention of the block that made `tokens`
    oracle_attn: Optional[torch.Tensor] = None  # [B, N] oracle's [cls]->patch attention, mean over heads
    has_cls: Optional[bool] = None              # token 0 is [cls] (None: whenever there is a prefix token)

    @property
    def patches(self) -> torch.Tensor:
        return self.tokens[:, self.num_prefix:]


def _option(default, help, choices=None):
    return field(default=default, metadata=dict(help=help, choices=choices))


HEAD_INITS = ("paper", "mae")


@dataclass(frozen=True)
class HeadOptions:
    # AbMILP defaults: the paper's published command (its argparse defaults, tanh/both/2/none/all, are not
    # what produced its numbers).
    abmilp_act: str = _option("relu", "activation between the AbMILP scorer's hidden layers", list(ACTIVATIONS))
    abmilp_sa: str = _option("none", "one-head self-attention before AbMILP, feeding the scorer (map) or the "
                                     "scorer and the pooled content (both)", SA_CHOICES)
    abmilp_depth: int = _option(1, "layers of the AbMILP scorer MLP")
    abmilp_cond: str = _option("none", "pe: add a trained 2-D sin-cos position embedding to the scorer's input",
                               COND_CHOICES)
    abmilp_content: str = _option("patch", "AbMILP pools all tokens or the patch tokens only", CONTENT_CHOICES)
    # defaults: the efficient-probing repo's queries, timm AttentionPoolLatent's heads
    ep_queries: int = _option(32, "learnable queries of --cls_features ep (must divide the embedding width)")
    map_heads: int = _option(8, "attention heads of --cls_features map (must divide the embedding width)")
    head_init: str = _option("paper", "classifier initialisation: paper (nn.Linear's default, as the paper's code) "
                                      "or mae (trunc-normal std 0.01, zero bias, as MAE's linprobe)", HEAD_INITS)

    @classmethod
    def from_args(cls, args) -> "HeadOptions":
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})

    @classmethod
    def add_arguments(cls, parser) -> None:
        for f in fields(cls):
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, **f.metadata)


def _renormalise(weights: torch.Tensor) -> torch.Tensor:
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)


def _weighted_sum(weights: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bn,bnd->bd", weights.to(patches.dtype), patches)


def _last_block_attention(batch: TokenBatch, head: str) -> torch.Tensor:
    if batch.attn is None:
        raise RuntimeError(f"head {head} reads the last block's attention but the TokenBatch carries none "
                           "(capture it: HEADS[name].needs_attention is True)")
    if batch.attn.shape[-1] != batch.tokens.shape[1]:
        raise ValueError(f"attention over {batch.attn.shape[-1]} tokens does not match {batch.tokens.shape[1]} tokens")
    return batch.attn.float()


def centre_indices(grid: Tuple[int, int], k: int) -> torch.Tensor:
    """Flat indices of the k x k centre patches. On even grids it sits up-left of centre, as the paper's code."""
    (h, w) = grid
    top, left = (h - k) // 2, (w - k) // 2
    rows, cols = torch.arange(top, top + k), torch.arange(left, left + k)
    return (rows[:, None] * w + cols[None, :]).flatten()


class Aggregation(nn.Module):
    """TokenBatch -> [B, out_dim]."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.attention_map: Optional[torch.Tensor] = None


class ClsToken(Aggregation):
    def forward(self, batch):
        return batch.tokens[:, 0]


class MeanPatches(Aggregation):
    def forward(self, batch):
        return batch.patches.mean(1)


class ClsAndMean(Aggregation):
    def forward(self, batch):
        return torch.cat([batch.tokens[:, 0], batch.patches.mean(1)], dim=1)


class WeightedPatches(Aggregation):
    """Non-learned: a weighted sum of the patch tokens with weights from `weights(batch)` ([B, N], sum 1).

    The paper's code averages (not sums) the weighted tokens for ca*; a per-run constant that the BatchNorm
    after the aggregation removes, so we keep the convex combination."""

    def __init__(self, dim: int, k: int = 0):
        super().__init__(dim)
        self.k = k

    def forward(self, batch):
        weights = self.weights(batch)
        self.attention_map = weights.detach()
        return _weighted_sum(weights, batch.patches)


class CentreCrop(WeightedPatches):
    def weights(self, batch):
        weights = batch.tokens.new_zeros(batch.tokens.shape[0], batch.patches.shape[1], dtype=torch.float32)
        weights[:, centre_indices(batch.grid, self.k).to(weights.device)] = 1.0 / self.k ** 2
        return weights


class CentreAttention(WeightedPatches):
    def weights(self, batch):
        attn = _last_block_attention(batch, f"ca{self.k}").mean(1)  # [B, T, T]
        queries = batch.num_prefix + centre_indices(batch.grid, self.k).to(attn.device)
        return _renormalise(attn[:, queries, batch.num_prefix:].mean(1))


class ClsAttentionMean(WeightedPatches):
    def weights(self, batch):
        attn = _last_block_attention(batch, "attn-mn")
        return _renormalise(attn[:, :, 0, batch.num_prefix:].mean(1))


class ClsAttentionLowestEntropy(WeightedPatches):
    def weights(self, batch):
        per_head = _renormalise(_last_block_attention(batch, "attn-lcte")[:, :, 0, batch.num_prefix:])  # [B, H, N]
        entropy = -(per_head * per_head.clamp_min(1e-12).log()).sum(-1)
        sharpest = entropy.argmin(dim=1)
        return per_head[torch.arange(per_head.shape[0], device=per_head.device), sharpest]


class OracleAttention(WeightedPatches):
    def weights(self, batch):
        if batch.oracle_attn is None:
            raise RuntimeError("head oracle reads TokenBatch.oracle_attn but it is None (run an oracle encoder)")
        if batch.oracle_attn.shape[1] != batch.patches.shape[1]:
            raise ValueError(f"the oracle attends over {batch.oracle_attn.shape[1]} patches but the probed encoder "
                             f"has {batch.patches.shape[1]}: the two need the same patch grid")
        return _renormalise(batch.oracle_attn.float())


class AbMILPHead(Aggregation):
    def __init__(self, dim, grid, num_prefix, options: HeadOptions):
        super().__init__(dim)
        self.abmilp = AbMILP(dim, grid, num_prefix, act=options.abmilp_act, sa=options.abmilp_sa,
                             depth=options.abmilp_depth, cond=options.abmilp_cond, content=options.abmilp_content)

    def forward(self, batch):
        pooled = self.abmilp(batch.tokens)
        # Plots show the patches' share only; with content=all the prefix tokens' weight is left out.
        self.attention_map = self.abmilp.attention_map[:, -batch.patches.shape[1]:]
        return pooled


class EfficientProbing(Aggregation):
    """EP: learnable queries attend to the patch tokens (no q/k projections, keys are the tokens); one value
    projection's output is split into Q slices, query q pools slice q; the slices concatenate back to D."""

    def __init__(self, dim: int, num_queries: int):
        super().__init__(dim)
        if num_queries < 1 or dim % num_queries:
            raise ValueError(f"{num_queries} queries do not divide the embedding width {dim}")
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.value = nn.Linear(dim, dim, bias=False)
        self.scale = dim ** -0.5

    def forward(self, batch):
        x = batch.patches
        (b, n, d), q = x.shape, self.queries.shape[0]
        attn = torch.einsum("qd,bnd->bqn", self.queries.to(x.dtype) * self.scale, x).softmax(-1)
        self.attention_map = attn.detach()
        values = self.value(x).reshape(b, n, q, d // q)
        return torch.einsum("bqn,bnqc->bqc", attn.to(values.dtype), values).reshape(b, d)


class SimPool(Aggregation):
    """SimPool: the mean patch is the query; keys and values are the LayerNorm-ed patches; one head."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.scale = dim ** -0.5

    def forward(self, batch):
        x = batch.patches
        query = self.wq(x.mean(1))
        normed = self.norm(x)
        attn = (torch.einsum("bd,bnd->bn", query, self.wk(normed)) * self.scale).softmax(-1)
        self.attention_map = attn.detach()
        return _weighted_sum(attn, normed)


class MultiheadAttentionPool(Aggregation):
    """MAP: timm's AttentionPoolLatent in pre-logits mode (one latent query, no projection or MLP after).

    Its attention map is computed in eval mode only, so training runs timm's fused path alone."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim)
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"{num_heads} attention heads do not divide the embedding width {dim}")
        self.pool = AttentionPoolLatent(dim, out_features=0, num_heads=num_heads)

    def forward(self, batch):
        x = batch.patches
        if not self.training:  # the map costs a key projection: only evaluation (and plots) pay for it
            with torch.no_grad():
                self.attention_map = self._attention(x)
        return self.pool(x)

    def _attention(self, x):
        # timm's forward does not return its attention (fused kernel); recompute it from the same weights.
        pool, (b, n, d) = self.pool, x.shape
        heads, head_dim = pool.num_heads, pool.head_dim
        q = pool.q_norm(pool.q(pool.latent).reshape(1, -1, heads, head_dim).transpose(1, 2))
        k = nn.functional.linear(x, pool.kv.weight[:d], None if pool.kv.bias is None else pool.kv.bias[:d])
        k = pool.k_norm(k.reshape(b, n, heads, head_dim).transpose(1, 2))
        attn = (q.to(k.dtype) * pool.scale @ k.transpose(-2, -1)).float().softmax(-1)  # [B, heads, L, N]
        return attn.mean(1).squeeze(1)


@dataclass(frozen=True)
class HeadSpec:
    name: str
    builder: Callable[[int, Tuple[int, int], int, HeadOptions], Aggregation]  # (dim, grid, num_prefix, options)
    reads: str
    description: str
    learned: bool = False
    needs_attention: bool = False
    needs_cls: bool = False
    needs_oracle: bool = False


def _crop_builder(cls, k):
    def build(dim, grid, num_prefix, options):
        if k > min(grid):
            raise ValueError(f"a {k}x{k} centre crop does not fit the {grid[0]}x{grid[1]} patch grid")
        return cls(dim, k)
    return build


_SPECS = [
    HeadSpec("cls", lambda d, g, p, o: ClsToken(d), "[cls]", "the [cls] token", needs_cls=True),
    HeadSpec("pos", lambda d, g, p, o: MeanPatches(d), "patch tokens", "mean of the patch tokens"),
    HeadSpec("both", lambda d, g, p, o: ClsAndMean(2 * d), "[cls] + patch tokens",
             "[cls] concatenated with the mean patch token (2D wide)", needs_cls=True),
    HeadSpec("abmilp", lambda d, g, p, o: AbMILPHead(d, g, p, o), "all tokens or patch tokens (--abmilp_content)",
             "AbMILP: an MLP scores each token, softmax-weighted sum (--abmilp_*)", learned=True),
    *[HeadSpec(f"cp{k}", _crop_builder(CentreCrop, k), "patch tokens", f"mean of the {k}x{k} centre patches")
      for k in range(1, 5)],
    *[HeadSpec(f"ca{k}", _crop_builder(CentreAttention, k), "patch tokens + last-block attention",
               f"patches weighted by the head-averaged attention of the {k}x{k} centre patches, renormalised",
               needs_attention=True) for k in range(1, 5)],
    HeadSpec("attn-mn", lambda d, g, p, o: ClsAttentionMean(d), "patch tokens + last-block [cls] attention",
             "patches weighted by the [cls] attention averaged over heads, renormalised",
             needs_attention=True, needs_cls=True),
    HeadSpec("attn-lcte", lambda d, g, p, o: ClsAttentionLowestEntropy(d), "patch tokens + last-block [cls] attention",
             "patches weighted by the [cls] attention of the head with the lowest entropy, renormalised",
             needs_attention=True, needs_cls=True),
    HeadSpec("oracle", lambda d, g, p, o: OracleAttention(d), "patch tokens + --oracle's [cls] attention",
             "patches weighted by a second encoder's last-block [cls] attention (mean over heads), renormalised",
             needs_oracle=True),
    HeadSpec("ep", lambda d, g, p, o: EfficientProbing(d, o.ep_queries), "patch tokens",
             "efficient probing: --ep_queries learnable queries, no q/k projections, value split across queries",
             learned=True),
    HeadSpec("simpool", lambda d, g, p, o: SimPool(d), "patch tokens",
             "SimPool: mean patch as query, one-head attention over LayerNorm-ed patches", learned=True),
    HeadSpec("map", lambda d, g, p, o: MultiheadAttentionPool(d, o.map_heads), "patch tokens",
             "timm AttentionPoolLatent (pre-logits): one latent query, --map_heads heads", learned=True),
]
HEADS = {spec.name: spec for spec in _SPECS}


def resolve_head(name: str) -> HeadSpec:
    key = name.strip().lower()
    if key not in HEADS:
        raise ValueError(f"unknown head {name!r}; the heads are {', '.join(HEADS)}")
    return HEADS[key]


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
        return (centred / torch.sqrt(var + self.eps)).to(x.dtype)


class Probe(nn.Module):
    """aggregation -> BatchNorm1d(affine=False, eps=1e-6) -> Linear, as MAE's linear probing.

    init "paper" keeps nn.Linear's default initialisation (U(-1/sqrt(d), 1/sqrt(d)) for weight and bias), as the
    paper's code does (its trunc_normal_ call is commented out); "mae" is MAE's linprobe: trunc-normal std 0.01,
    zero bias. Under LARS a step moves a weight by about 0.001 * lr * ||w||, so the init sets the training speed.
    """

    def __init__(self, aggregation: Aggregation, num_classes: int, head_name: str = "", init: str = "paper"):
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"unknown classifier initialisation {init!r}; choose from {', '.join(HEAD_INITS)}")
        self.head_name = head_name
        self.aggregation = aggregation
        self.norm = BatchNormAcrossRanks(aggregation.out_dim, affine=False, eps=1e-6)
        self.classifier = nn.Linear(aggregation.out_dim, num_classes)
        if init == "mae":
            trunc_normal_(self.classifier.weight, std=0.01)
            nn.init.zeros_(self.classifier.bias)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        return self.classifier(self.norm(self.aggregation(batch)))

    @property
    def attention_map(self) -> Optional[torch.Tensor]:
        return self.aggregation.attention_map


def build_probe(name: str, embed_dim: int, num_classes: int, grid: Tuple[int, int], num_prefix: int,
                options: Optional[HeadOptions] = None, has_cls: Optional[bool] = None) -> Probe:
    """`num_prefix`: tokens before the patches ([cls] and registers); `has_cls`: whether token 0 is [cls]
    (default: num_prefix > 0; an encoder with registers but no [cls] must say False)."""
    spec = resolve_head(name)
    has_cls = num_prefix > 0 if has_cls is None else has_cls
    if spec.needs_cls and not has_cls:
        raise ValueError(f"head {spec.name} reads the [cls] token but the encoder has none")
    options = options or HeadOptions()
    aggregation = spec.builder(embed_dim, tuple(grid), num_prefix, options)
    return Probe(aggregation, num_classes, head_name=spec.name, init=options.head_init)


class HeadRow(NamedTuple):
    name: str
    reads: str
    learned: bool
    n_params: int  # trainable parameters of the aggregation alone (BatchNorm and Linear excluded)


def describe_heads(embed_dim: int = 768, grid: Tuple[int, int] = (14, 14), num_classes: int = 1000,
                   options: Optional[HeadOptions] = None) -> list:
    """One row per --cls_features value (default: ViT-B/16 at 224 and default options), for the README table."""
    rows = []
    for name, spec in HEADS.items():
        probe = build_probe(name, embed_dim, num_classes, grid, num_prefix=1, options=options)
        n_params = sum(p.numel() for p in probe.aggregation.parameters() if p.requires_grad)
        rows.append(HeadRow(name, spec.reads, spec.learned, n_params))
    return rows
