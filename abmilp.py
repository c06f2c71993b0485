"""Attention-based multiple-instance pooling (AbMILP) over a ViT's tokens, as in "Beyond [cls]".

A small MLP gives every token a score; a softmax over the tokens turns the scores into weights; the output is
the weighted sum of the tokens. Options (the paper's flags):
    act     tanh | relu           non-linearity between the scorer's hidden layers (unused at depth 1)
    sa      none | map | both     a one-head self-attention over the tokens feeds the scorer (map), or the scorer
                                  and the pooled content (both)
    depth   >= 1                  scorer depth: depth-1 hidden Linear(D, D)+act layers, then Linear(D, 1)
    cond    none | pe             add a 2-D sin-cos position embedding, trained with the head, to the scorer's input
                                  (prefix tokens get 0)
    content all | patch           pool every token, or the patch tokens only (without [cls] / prefix tokens)
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import Attention

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
SA_CHOICES = ("none", "map", "both")
COND_CHOICES = ("none", "pe")
CONTENT_CHOICES = ("all", "patch")


def _check_choice(flag, value, choices):
    if value not in choices:
        raise ValueError(f"AbMILP {flag} {value!r} is not one of {', '.join(choices)}")


def sincos_2d_mae_order(dim: int, grid: Tuple[int, int]) -> torch.Tensor:
    """[H*W, dim] 2-D sin-cos table laid out as MAE's get_2d_sincos_pos_embed, which the paper's AbMILP uses.

    Hand-written: timm's build_sincos2d_pos_embed orders the halves differently. Row r*W + c; the first dim/2
    columns encode the column index c, the last dim/2 the row index r; within each half, sin then cos, with
    frequencies 1 / 10000^(k / (dim/4)), k = 0..dim/4-1.
    """
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(positions):
        angles = positions.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class AbMILP(nn.Module):
    """Scores tokens [B, T, D] -> pooled [B, D]; `attention_map` [B, T'] holds the weights of the last forward
    over the T' tokens it pooled (prefix + patches for content=all, patches only for content=patch)."""

    def __init__(self, dim: int, grid: Tuple[int, int], num_prefix: int = 1, *, act: str = "relu",
                 sa: str = "none", depth: int = 1, cond: str = "none", content: str = "patch"):
        super().__init__()
        _check_choice("act", act, tuple(ACTIVATIONS))
        _check_choice("sa", sa, SA_CHOICES)
        _check_choice("cond", cond, COND_CHOICES)
        _check_choice("content", content, CONTENT_CHOICES)
        if depth < 1:
            raise ValueError(f"AbMILP depth must be at least 1 (got {depth})")
        self.sa, self.cond, self.content = sa, cond, content
        self.num_prefix = num_prefix
        self.grid = tuple(grid)

        self.self_attn = Attention(dim, num_heads=1, qkv_bias=False) if sa != "none" else None
        layers = []
        for _ in range(depth - 1):
            layers += [nn.Linear(dim, dim), ACTIVATIONS[act]()]
        layers.append(nn.Linear(dim, 1))
        self.scorer = nn.Sequential(*layers)

        self.pos_embed = None
        if cond == "pe":
            if dim % 4:
                raise ValueError(f"AbMILP's 2-D sin-cos position embedding needs a width divisible by 4 (got {dim})")
            table = sincos_2d_mae_order(dim, self.grid)
            if content == "all":
                table = torch.cat([table.new_zeros(num_prefix, dim), table])
            # A parameter, as in the paper's code: created with requires_grad=False there, but its main script then
            # sets requires_grad=True on every head parameter, so the table is trained.
            self.pos_embed = nn.Parameter(table)
        self.attention_map: Optional[torch.Tensor] = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens[:, self.num_prefix:] if self.content == "patch" else tokens
        mixed = self.self_attn(x) if self.self_attn is not None else x
        scorer_input = mixed if self.sa in ("map", "both") else x
        if self.pos_embed is not None:
            if self.pos_embed.shape[0] != x.shape[1]:
                raise ValueError(f"AbMILP was built for a {self.grid[0]}x{self.grid[1]} grid "
                                 f"({self.pos_embed.shape[0]} tokens) but got {x.shape[1]} tokens")
            scorer_input = scorer_input + self.pos_embed.to(scorer_input.dtype)
        weights = self.scorer(scorer_input).squeeze(-1).softmax(dim=1)  # [B, T']
        self.attention_map = weights.detach()
        content = mixed if self.sa == "both" else x
        return torch.einsum("bt,btd->bd", weights.to(content.dtype), content)
