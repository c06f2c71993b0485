"""Self-supervised pretraining models on models_vit's encoder: a masked autoencoder (MAE's recipe) and a MoCo v3
contrastive learner. Both keep their release's parameter names, so their state dicts are the files those
projects publish:

  MaskedAutoencoder: a ViTEncoder whose own parameters are the encoder (patch_embed, cls_token, pos_embed,
      blocks, norm) next to decoder_embed, mask_token, decoder_pos_embed, decoder_blocks, decoder_norm,
      decoder_pred, as in MAE's models_mae.py; its encoder-only state dict is MAE's released pretrain file.
  MoCoV3: base_encoder (a ViTEncoder whose `head` is the projector MLP), momentum_encoder (a copy updated by
      EMA), predictor, as in moco-v3's builder; under DDP its keys gain `module.` as main_moco.py saves them.

The transformer blocks are timm's; nothing here re-implements attention.
"""
import copy
import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from models_vit import ViTEncoder, architecture, build_encoder

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # MAE's and timm's ViT norm
ENCODER_SIZES = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")  # MaskedAutoencoder's of a preset


def sincos_pos_embed(grid, dim, num_prefix=1):
    """[1, prefix + H*W, dim] fixed 2-D sin-cos position embedding, zeros for the prefix ([cls]) token."""
    table = build_sincos2d_pos_embed(list(grid), dim)
    return torch.cat([torch.zeros(num_prefix, dim), table]).unsqueeze(0)


def new_encoder(model, input_size, **arch):
    """A trainable random-initialised encoder of MODELS[model] (models_vit's, MAE's block settings) with a fixed
    sin-cos position embedding, as both MAE and MoCo v3 train their ViTs."""
    encoder = build_encoder(model, input_size=input_size, verbose=False, **arch).train().requires_grad_(True)
    with torch.no_grad():
        encoder.pos_embed.copy_(sincos_pos_embed(encoder.grid_size, encoder.embed_dim))
    encoder.pos_embed.requires_grad_(False)
    return encoder


def _init_linear(module):
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------------------------------ MAE

class MaskedAutoencoder(ViTEncoder):
    """MAE: encode a random 1 - mask_ratio of the patches (plus [cls]), decode all of them with a light
    transformer, regress the pixels of the masked ones (each patch normalised by its own mean and variance when
    norm_pix_loss)."""

    def __init__(self, *, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio=4.0, qkv_bias=True,
                 decoder_dim=64, decoder_depth=2, decoder_heads=4, mask_ratio=0.75, norm_pix_loss=True):
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, num_classes=0, global_pool="")
        # what models_vit gives every encoder it builds
        self.patch_size, self.grid_size = patch_size, tuple(self.patch_embed.grid_size)
        self.depth, self.final_norm = depth, False
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        num_patches = self.patch_embed.num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * 3)
        self._init_mae_weights()

    def _init_mae_weights(self):
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.grid_size, self.embed_dim))
            self.decoder_pos_embed.copy_(sincos_pos_embed(self.grid_size, self.decoder_pos_embed.shape[-1]))
        self.pos_embed.requires_grad_(False)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch projection initialised like a Linear
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith(("blocks", "decoder_")):
                _init_linear(module)

    def patchify(self, images):
        """[B, 3, H, W] -> [B, N, p*p*3], patches in raster order, pixels (row, column, channel) inside one."""
        p = self.patch_size
        B, C, H, W = images.shape
        x = images.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)

    @staticmethod
    def random_masking(x, mask_ratio, generator=None):
        """Keep round(N * (1 - mask_ratio)) random patches of each image: (kept [B, K, D], mask [B, N] with 1 on
        the removed patches, ids_restore [B, N] putting kept-then-removed back into raster order)."""
        B, N, D = x.shape
        keep = int(round(N * (1 - mask_ratio)))
        noise = torch.rand(B, N, device=x.device, generator=generator)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(B, N, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, images, mask_ratio, generator=None):
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)
        B, N = ids_restore.shape
        masked = self.mask_token.expand(B, N + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, images, pred, mask):
        """Mean squared error per patch, averaged over the masked patches only."""
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images, mask_ratio=None, generator=None):
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(images, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask


def build_mae(model: str, input_size: int, *, decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 4,
              mask_ratio: float = 0.75, norm_pix_loss: bool = True, embed_dim: Optional[int] = None,
              depth: Optional[int] = None, num_heads: Optional[int] = None) -> MaskedAutoencoder:
    """A random-initialised MaskedAutoencoder of the preset `model` (embed_dim/depth/num_heads override its sizes)."""
    arch = architecture(model, **_given(embed_dim=embed_dim, depth=depth, num_heads=num_heads))
    return MaskedAutoencoder(img_size=input_size, **{k: arch[k] for k in ENCODER_SIZES}, decoder_dim=decoder_dim,
                             decoder_depth=decoder_depth, decoder_heads=decoder_heads, mask_ratio=mask_ratio,
                             norm_pix_loss=norm_pix_loss)


# ------------------------------------------------------------------------------------------------- MoCo v3

def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=True):
    """MoCo v3's projector/predictor: (Linear, BatchNorm, ReLU) x (num_layers - 1), Linear, BatchNorm without
    affine parameters."""
    layers = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    """Query = predictor(projector(base_encoder([cls] after the final norm))), key = the momentum encoder's
    projection of the other crop; symmetric InfoNCE against the other images of the batch."""

    def __init__(self, base_encoder, *, dim=128, mlp_dim=512, temperature=0.2):
        super().__init__()
        self.temperature = temperature
        width = base_encoder.embed_dim
        self.base_encoder = base_encoder
        self.base_encoder.head = mlp(3, width, mlp_dim, dim)  # the projector, where moco-v3 puts it
        self.predictor = mlp(2, dim, mlp_dim, dim)
        for module in (self.base_encoder.head, self.predictor):
            module.apply(_init_linear)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        self.momentum_encoder.requires_grad_(False)

    @staticmethod
    def embed(encoder, images):
        tokens = encoder.forward_tokens(images)
        return encoder.head(encoder.norm(tokens[:, 0]))

    @torch.no_grad()
    def update_momentum_encoder(self, m):
        for base, momentum in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            momentum.mul_(m).add_(base.detach(), alpha=1 - m)

    def contrastive_loss(self, q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = q @ k.T / self.temperature
        labels = torch.arange(len(q), device=q.device)
        return F.cross_entropy(logits, labels) * (2 * self.temperature)  # MoCo v3's scaling of the loss

    def forward(self, x1, x2, m):
        """Loss of the two crops; the momentum encoder first moves towards the base encoder with momentum m."""
        q1 = self.predictor(self.embed(self.base_encoder, x1))
        q2 = self.predictor(self.embed(self.base_encoder, x2))
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1 = self.embed(self.momentum_encoder, x1)
            k2 = self.embed(self.momentum_encoder, x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


def build_mocov3(model: str, input_size: int, *, dim: int = 128, mlp_dim: int = 512, temperature: float = 0.2,
                 embed_dim: Optional[int] = None, depth: Optional[int] = None,
                 num_heads: Optional[int] = None) -> MoCoV3:
    """A random-initialised MoCoV3 on the preset `model` (embed_dim/depth/num_heads override its sizes)."""
    encoder = new_encoder(model, input_size, **_given(embed_dim=embed_dim, depth=depth, num_heads=num_heads))
    return MoCoV3(encoder, dim=dim, mlp_dim=mlp_dim, temperature=temperature)


def _given(**sizes):
    return {k: v for k, v in sizes.items() if v is not None}


def momentum_at(epoch_float, epochs, base=0.99):
    """MoCo v3's momentum schedule: from `base` up to 1 by a half cosine over training."""
    return 1 - 0.5 * (1 + math.cos(math.pi * epoch_float / epochs)) * (1 - base)
