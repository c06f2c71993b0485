"""Probe heads: every --cls_features value, one table, one Probe shape.

A probe is  aggregation (tokens -> one vector)  ->  BatchNorm1d(affine=False)  ->  Linear,  as in MAE's linear
probing. Aggregations read a `TokenBatch` (the frozen encoder's tokens, plus the last block's attention, an
oracle's [cls] attention or the [cls] tokens of the last blocks when the head asks for them in `HEADS`). Every
aggregation that weights patches keeps its weights of the last forward in `attention_map`: [B, N] (or [B, Q, N]
for several queries) over the N patch tokens in row-major grid order, so `map.reshape(B, *grid)` is an image.
The learned poolers themselves live in `poolers.py`; here they get their tokens and their row in `HEADS`.
"""
import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

import poolers
from abmilp import ACTIVATIONS, COND_CHOICES, CONTENT_CHOICES, SA_CHOICES, AbMILP
from poolers import BatchNormAcrossRanks


@dataclass
class TokenBatch:
    tokens: torch.Tensor                        # [B, T, D], T = num_prefix + H*W
    num_prefix: int                             # [cls] (token 0, if any) and register tokens before the patches
    grid: Tuple[int, int]                       # (H, W) patches
    attn: Optional[torch.Tensor] = None         # [B, heads, T, T] attention of the block that made `tokens`
    oracle_attn: Optional[torch.Tensor] = None  # [B, N] oracle's [cls]->patch attention, mean over heads
    has_cls: Optional[bool] = None              # token 0 is [cls] (None: whenever there is a prefix token)
    # DINOv2's linear protocol, from the same forward: [cls] after each of the last n blocks up to the probed one
    # ([B, n, D], oldest first) and the probed block's mean patch token ([B, D]), both through the final norm
    block_cls: Optional[torch.Tensor] = None
    normed_patch_mean: Optional[torch.Tensor] = None

    @property
    def patches(self) -> torch.Tensor:
        return self.tokens[:, self.num_prefix:]

    def float32(self) -> "TokenBatch":
        """This batch with every tensor in float32 (itself when they already are)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        if all(t.dtype == torch.float32 for t in tensors.values()):
            return self
        return dataclasses.replace(self, **{name: t.float() for name, t in tensors.items()})


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
    # defaults: the efficient-probing repo's (the peer's) queries, d_out and heads, timm AttentionPoolLatent's heads
    ep_queries: int = _option(32, "learnable queries of --cls_features ep (must divide the embedding width)")
    ep_d_out: int = _option(1, "ep's value projection maps the width D to D / ep_d_out, the classifier's input (the "
                               "peer's --d_out; ep_queries x ep_d_out must divide D)")
    map_heads: int = _option(8, "attention heads of --cls_features map and siglip (must divide the embedding width)")
    esimpool_heads: int = _option(12, "attention heads of --cls_features esimpool (must divide the embedding width)")
    aim_heads: int = _option(16, "attention heads of --cls_features aim (the peer's --num_heads)")
    jepa_heads: int = _option(16, "attention heads of --cls_features jepa (the peer's --num_heads)")
    head_init: str = _option("paper", "classifier initialisation: paper (nn.Linear's default, as the paper's code) "
                                      "or mae (trunc-normal std 0.01, zero bias, as MAE's linprobe)", HEAD_INITS)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "HeadOptions":
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
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
    def forward(self, batch: TokenBatch) -> torch.Tensor:
        return batch.tokens[:, 0]


class MeanPatches(Aggregation):
    def forward(self, batch: TokenBatch) -> torch.Tensor:
        return batch.patches.mean(1)


class ClsAndMean(Aggregation):
    def forward(self, batch: TokenBatch) -> torch.Tensor:
        return torch.cat([batch.tokens[:, 0], batch.patches.mean(1)], dim=1)


class WeightedPatches(Aggregation):
    """Non-learned: a weighted sum of the patch tokens with weights from `weights(batch)` ([B, N], sum 1).

    The paper's code averages (not sums) the weighted tokens for ca*; a per-run constant that the BatchNorm
    after the aggregation removes, so we keep the convex combination."""

    def __init__(self, dim: int, k: int = 0):
        super().__init__(dim)
        self.k = k

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        weights = self.weights(batch)
        self.attention_map = weights.detach()
        return _weighted_sum(weights, batch.patches)


class CentreCrop(WeightedPatches):
    def weights(self, batch: TokenBatch) -> torch.Tensor:
        weights = batch.tokens.new_zeros(batch.tokens.shape[0], batch.patches.shape[1], dtype=torch.float32)
        weights[:, centre_indices(batch.grid, self.k).to(weights.device)] = 1.0 / self.k ** 2
        return weights


class CentreAttention(WeightedPatches):
    def weights(self, batch: TokenBatch) -> torch.Tensor:
        attn = _last_block_attention(batch, f"ca{self.k}").mean(1)  # [B, T, T]
        queries = batch.num_prefix + centre_indices(batch.grid, self.k).to(attn.device)
        return _renormalise(attn[:, queries, batch.num_prefix:].mean(1))


class ClsAttentionMean(WeightedPatches):
    def weights(self, batch: TokenBatch) -> torch.Tensor:
        attn = _last_block_attention(batch, "attn-mn")
        return _renormalise(attn[:, :, 0, batch.num_prefix:].mean(1))


class ClsAttentionLowestEntropy(WeightedPatches):
    def weights(self, batch: TokenBatch) -> torch.Tensor:
        per_head = _renormalise(_last_block_attention(batch, "attn-lcte")[:, :, 0, batch.num_prefix:])  # [B, H, N]
        entropy = -(per_head * per_head.clamp_min(1e-12).log()).sum(-1)
        sharpest = entropy.argmin(dim=1)
        return per_head[torch.arange(per_head.shape[0], device=per_head.device), sharpest]


class OracleAttention(WeightedPatches):
    def weights(self, batch: TokenBatch) -> torch.Tensor:
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

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        pooled = self.abmilp(batch.tokens)
        # Plots show the patches' share only; with content=all the prefix tokens' weight is left out.
        self.attention_map = self.abmilp.attention_map[:, -batch.patches.shape[1]:]
        return pooled


class TokenPooling(Aggregation):
    """A learned pooler of poolers.py over the patch tokens, or over [cls] and the patch tokens (`with_cls`: the
    peer's `_all` variants; register tokens are left out, as DINOv2's get_intermediate_layers leaves them)."""

    _version = 2  # 1: ep, simpool and map held their parameters directly, before poolers.py (checkpoints of then)

    def __init__(self, pooler: poolers.Pooler, with_cls: bool = False):
        super().__init__(pooler.out_dim)
        self.pooler = pooler
        self.with_cls = with_cls

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version", 1) < 2:  # torch's versioned-module hook: rename a version-1 checkpoint
            for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "pooler.")]:
                state_dict[prefix + "pooler." + key[len(prefix):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        patches = batch.patches
        pooled = self.pooler(torch.cat([batch.tokens[:, :1], patches], 1) if self.with_cls else patches)
        weights = self.pooler.attention_map
        self.attention_map = None if weights is None else weights[..., -patches.shape[1]:]  # the patches' share
        return pooled


class DinoV2LinearInput(Aggregation):
    """DINOv2's linear-probe input (dinov2/eval/linear.py `create_linear_input`): the [cls] tokens of the last n
    blocks, each through the encoder's final norm, concatenated oldest first, then (avgpool) the mean of the last
    block's normed patch tokens. The tokens come from the TokenBatch (FrozenTokens fills them from one forward)."""

    def __init__(self, dim: int, n_blocks: int, avgpool: bool):
        super().__init__(dim * (n_blocks + avgpool))
        self.n_blocks, self.avgpool = n_blocks, avgpool

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        have = 0 if batch.block_cls is None else batch.block_cls.shape[1]
        if have < self.n_blocks:
            raise ValueError(f"DINOv2's linear input reads the [cls] of the last {self.n_blocks} blocks but the "
                             f"TokenBatch carries {have} (FrozenTokens(need_blocks={self.n_blocks}) fills them)")
        parts = [batch.block_cls[:, -self.n_blocks:].flatten(1)]
        if self.avgpool:
            parts.append(batch.normed_patch_mean)
        return torch.cat(parts, 1)


@dataclass(frozen=True)
class HeadSpec:
    name: str
    builder: Callable[[int, Tuple[int, int], int, HeadOptions], Aggregation]  # (dim, grid, num_prefix, options)
    learned: bool = False
    needs_attention: bool = False
    needs_cls: bool = False
    needs_oracle: bool = False
    needs_blocks: int = 0  # [cls] of the last n blocks (TokenBatch.block_cls)
    # the embedding width must be a multiple of this (attention heads, queries): (divisor, what sets it)
    width_divisor: Optional[Callable[[HeadOptions], Tuple[int, str]]] = None


def _crop_builder(cls, k):
    def build(dim, grid, num_prefix, options):
        if k > min(grid):
            raise ValueError(f"a {k}x{k} centre crop does not fit the {grid[0]}x{grid[1]} patch grid")
        return cls(dim, k)
    return build


_SPECS = [  # what each reads and does: README's head table
    HeadSpec("cls", lambda d, g, p, o: ClsToken(d), needs_cls=True),
    HeadSpec("pos", lambda d, g, p, o: MeanPatches(d)),
    HeadSpec("both", lambda d, g, p, o: ClsAndMean(2 * d), needs_cls=True),
    HeadSpec("abmilp", lambda d, g, p, o: AbMILPHead(d, g, p, o), learned=True),
    *[HeadSpec(f"cp{k}", _crop_builder(CentreCrop, k)) for k in range(1, 5)],
    *[HeadSpec(f"ca{k}", _crop_builder(CentreAttention, k), needs_attention=True) for k in range(1, 5)],
    HeadSpec("attn-mn", lambda d, g, p, o: ClsAttentionMean(d), needs_attention=True, needs_cls=True),
    HeadSpec("attn-lcte", lambda d, g, p, o: ClsAttentionLowestEntropy(d), needs_attention=True, needs_cls=True),
    HeadSpec("oracle", lambda d, g, p, o: OracleAttention(d), needs_oracle=True),
    *[HeadSpec(f"dinov2_n{n}{'_avgpool' * avg}", lambda d, g, p, o, n=n, avg=avg: DinoV2LinearInput(d, n, avg),
               needs_cls=True, needs_blocks=n)
      for n in (1, 4) for avg in (False, True)],
]


def _heads(count: Callable[[HeadOptions], int], flag: str = ""):
    """A width divisor of `count` attention heads, set by `flag` (or fixed by the head's definition)."""
    return lambda options: (count(options), f"{flag} {count(options)}" if flag else f"its {count(options)} heads")


# The learned poolers (poolers.py): name, builder (dim, grid, options) -> Pooler, width divisor, and
# whether the peer's `_all` variant (over [cls] and the patches) exists: not where tokens sit on the patch grid.
_POOLERS = [
    # efficient probing: --ep_queries learnable queries, no q/k projections, value split across queries
    ("ep", lambda d, g, o: poolers.EfficientProbing(d, o.ep_queries, o.ep_d_out),
     lambda o: (o.ep_queries * o.ep_d_out,
                f"--ep_queries {o.ep_queries} x --ep_d_out {o.ep_d_out} = {o.ep_queries * o.ep_d_out}"), True),
    # SimPool: mean token as query, one-head attention over LayerNorm-ed tokens
    ("simpool", lambda d, g, o: poolers.SimPool(d), None, True),
    # timm AttentionPoolLatent (pre-logits): one latent query, --map_heads heads
    ("map", lambda d, g, o: poolers.LatentAttentionPool(d, o.map_heads),
     _heads(lambda o: o.map_heads, "--map_heads"), True),
    # SimPool without linears: LayerNorm-ed mean query and keys, raw values, --esimpool_heads heads
    ("esimpool", lambda d, g, o: poolers.ESimPool(d, o.esimpool_heads),
     _heads(lambda o: o.esimpool_heads, "--esimpool_heads"), True),
    # CLIP's attention pool: LayerNorm, then timm AttentionPool2d (mean query, position embedding, 4 heads)
    ("clip", lambda d, g, o: poolers.ClipAttentionPool(d, g), _heads(lambda o: 4), False),
    # SigLIP's head: timm AttentionPoolLatent with its projection and MLP, --map_heads heads
    ("siglip", lambda d, g, o: poolers.LatentAttentionPool(d, o.map_heads, full=True),
     _heads(lambda o: o.map_heads, "--map_heads"), True),
    # AIM: BatchNorm-ed tokens, a learned query over key/value projections, --aim_heads heads
    ("aim", lambda d, g, o: poolers.AimPool(d, o.aim_heads), _heads(lambda o: o.aim_heads, "--aim_heads"), True),
    # CBAM (timm CbamModule) on the patch grid, residual, ReLU, mean
    ("cbam", lambda d, g, o: poolers.CbamPool(d, g), None, False),
    # CoCa's attentional pooler: one learned query, 8 heads of 64, shared key and value
    ("coca", lambda d, g, o: poolers.CocaPool(d), None, True),
    # CaiT's class attention: a learned [cls] through one class-attention block (4 heads), LayerNorm
    ("cait", lambda d, g, o: poolers.CaitPool(d), _heads(lambda o: 4), True),
    # one more DINOv2 transformer block (8 heads) over the tokens, then their mean
    ("dinovit", lambda d, g, o: poolers.DinoViTPool(d), _heads(lambda o: 8), True),
    # I-JEPA's attentive pooler: a learned query cross-attends (--jepa_heads heads), residual MLP
    ("jepa", lambda d, g, o: poolers.JepaPool(d, o.jepa_heads), _heads(lambda o: o.jepa_heads, "--jepa_heads"), True),
    # DOLG's spatial attention: per-token softplus score times the L2-normalised BatchNorm-ed projection, mean
    ("dolg", lambda d, g, o: poolers.DolgPool(d), None, True),
    # CAE's attentive block: a learned query cross-attends (8 heads) over LayerNorm-ed keys and values
    ("cae", lambda d, g, o: poolers.CaePool(d), _heads(lambda o: 8), True),
]
for _name, _build, _divisor, _has_all in _POOLERS:
    _SPECS.append(HeadSpec(_name, lambda d, g, p, o, build=_build: TokenPooling(build(d, g, o)), learned=True,
                           width_divisor=_divisor))
for _name, _build, _divisor, _has_all in _POOLERS:
    if _has_all:
        _SPECS.append(HeadSpec(f"{_name}_all", lambda d, g, p, o, build=_build: TokenPooling(build(d, g, o), True),
                               learned=True, needs_cls=True, width_divisor=_divisor))
HEADS = {spec.name: spec for spec in _SPECS}

# The peer's names that mean something else here, with what to pass instead.
_REFUSED = {
    "abmilp_all": "is --cls_features abmilp --abmilp_content all here, which pools [cls], any registers and the "
                  "patches",
    "clip_all": "does not exist: CLIP's pool gives every token a learned position on the patch grid, where [cls] has "
                "none; use clip",
    "cbam_all": "does not exist: CBAM convolves the tokens on the patch grid, where [cls] has no place; use cbam",
}


def resolve_head(name: str) -> HeadSpec:
    key = name.strip().lower()
    if key in _REFUSED:
        raise ValueError(f"head {key} {_REFUSED[key]}")
    if key not in HEADS:
        raise ValueError(f"unknown head {name!r}; the heads are {', '.join(HEADS)}")
    return HEADS[key]


class Probe(nn.Module):
    """aggregation -> BatchNorm1d(affine=False, eps=1e-6) -> Linear, as MAE's linear probing.

    init "paper" keeps nn.Linear's default initialisation (U(-1/sqrt(d), 1/sqrt(d)) for weight and bias), as the
    paper's code does (its trunc_normal_ call is commented out); "mae" is MAE's linprobe: trunc-normal std 0.01,
    zero bias. Under LARS a step moves a weight by about 0.001 * lr * ||w||, so the init sets the training speed.

    The aggregation runs in float32 whatever the autocast around it (`features`); only the classifier follows it.
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
        return self.classifier(self.norm(self.features(batch)))

    def features(self, batch: TokenBatch) -> torch.Tensor:
        """The pooled features BatchNorm normalises, computed in float32 even under bf16 autocast: frozen tokens
        often have a channel mean hundreds of times their spread across images (MAE's pre-norm tokens), which
        bf16's 8-bit mantissa rounds away, in the values pooled and in the keys that score them alike."""
        with torch.autocast(batch.tokens.device.type, enabled=False):
            return self.aggregation(batch.float32()).float()

    @property
    def attention_map(self) -> Optional[torch.Tensor]:
        return self.aggregation.attention_map


class NoClsToken(ValueError):
    """Heads that read the [cls] token were asked of an encoder without one."""


def require_cls_token(names: Sequence[str], has_cls: bool, encoder: str = "the encoder") -> None:
    """NoClsToken naming the heads of `names` that read [cls], when `encoder` (a phrase for the message) has none."""
    readers = [n for n in names if resolve_head(n).needs_cls]
    if readers and not has_cls:
        raise NoClsToken(f"--cls_features {','.join(readers)} reads [cls] but {encoder} has none")


def build_probe(name: str, embed_dim: int, num_classes: int, grid: Tuple[int, int], num_prefix: int,
                options: Optional[HeadOptions] = None, has_cls: Optional[bool] = None) -> Probe:
    """`num_prefix`: tokens before the patches ([cls] and registers); `has_cls`: whether token 0 is [cls]
    (default: num_prefix > 0; an encoder with registers but no [cls] must say False)."""
    spec = resolve_head(name)
    has_cls = num_prefix > 0 if has_cls is None else has_cls
    require_cls_token([spec.name], has_cls)
    options = options or HeadOptions()
    aggregation = spec.builder(embed_dim, tuple(grid), num_prefix, options)
    return Probe(aggregation, num_classes, head_name=spec.name, init=options.head_init)
