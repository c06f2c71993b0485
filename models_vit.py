"""Frozen ViT encoders of every release the paper and its peers probe, on timm's own model classes; one loader.

`build_encoder` reads any checkpoint layout of util/release_layouts.py (MAE, SimMIM, BEiT/BEiT-v2, DINO, iBOT,
MoCo v3, I-JEPA, DINOv2 with or without registers, Franca, DINOv3, EVA02, PE, CAPI, timm state dicts) or a timm
pretrained name. The encoder is one of timm's classes with `forward_tokens` added (the `_Encoder` mixin, one
`_embed` per family): VisionTransformer (registers, layer scale, no [cls], SwiGLU), Beit (q/v biases, relative
position bias), Eva (rotary embeddings: EVA02, DINOv3, PE; CAPI's encoder on Eva blocks), Hiera (its last stage)
or NaFlexVit. Release keys become timm's through timm's own `checkpoint_filter_fn` wherever timm has one.

Tokens are taken *before* the final LayerNorm by default, as the paper's code does (gmum/beyond_cls
models_vit.py: its forward_features never applies `self.norm` and stops after block `return_block`);
MAE's official linear probe takes them after it: pass final_norm=True for that.

Library code: problems are ValueError / FileNotFoundError with plain messages; the entry points add what to do.
"""
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Iterable, Iterator, Optional, TypedDict, Union, Unpack

import timm
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, RmsNorm, SwiGLUPacked, apply_rot_embed_cat
from timm.layers.attention import Attention as ViTAttention
from timm.layers.attention import AttentionRope
from timm.models import beit as timm_beit
from timm.models import eva as timm_eva
from timm.models import hiera as timm_hiera
from timm.models import is_model_pretrained
from timm.models import vision_transformer as timm_vit
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.hiera import Hiera
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from util import release_layouts
from util.checkpoint import CHECKPOINT_SUFFIXES

# Presets: sizes only; the rest of the architecture (cls, registers, layer scale, position embedding, relative
# position bias) is read from the checkpoint. Any timm ViT/BEiT architecture name is accepted as well.
MODELS = {
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_large_patch14": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16),  # CAPI, Franca, DINOv2 ViT-L
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_small_patch16_mocov3": dict(patch_size=16, embed_dim=384, depth=12, num_heads=12),  # MoCo v3 ViT-S: 12 heads
    "vit_base_patch16_mocov3": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_mini_patch8": dict(patch_size=8, embed_dim=64, depth=4, num_heads=2),  # 64 px digits_clutter (issue 14)
}
MAE_DEFAULTS = dict(mlp_ratio=4.0, qkv_bias=True)


class SizeOverrides(TypedDict, total=False):
    """Sizes that override a model's (tests build tiny encoders with them)."""
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float


# ---------------------------------------------------------------- encoders

class _Encoder:
    """What every family adds to its timm class: the tokens after any block, before or after the final norm.

    Attributes set by `_as_encoder`: patch_size, grid_size, depth, final_norm (False: the paper's tokens),
    has_class_token, num_reg_tokens, num_prefix_tokens, family. `first_grid_block`: the first block whose output
    is the final patch grid (Hiera: its last stage); `first_attention_block`: the first whose attention runs
    over those tokens (Hiera's first last-stage block pools its queries from the previous stage's grid).
    """
    first_grid_block = first_attention_block = 0

    def block_index(self, block, attention=False):
        """0-based index of `block` (None: the last; negative counts from the end); ValueError outside the
        encoder, or before the blocks whose tokens (`attention`: whose attention maps) cover the patch grid."""
        if block is None:
            return self.depth - 1
        if not -self.depth <= block < self.depth:
            raise ValueError(f"block {block} does not exist in a {self.depth}-block encoder "
                             f"(blocks are 0..{self.depth - 1}, or -1..-{self.depth} from the end)")
        index = block % self.depth
        first = self.first_attention_block if attention else self.first_grid_block
        if index < first:
            what = "attention runs over" if attention else "tokens are"
            raise ValueError(f"block {block} of this {self.family} encoder is not one whose {what} its final "
                             f"{self.grid_size[0]}x{self.grid_size[1]} patch grid (use blocks {first}.."
                             f"{self.depth - 1}; {self._stage_note()})")
        return index

    def _stage_note(self):
        return "earlier blocks belong to earlier stages"

    def forward_tokens(self, images, block=None):
        """[B, prefix + N, D] tokens after `block`; only the blocks up to it run."""
        last = self.block_index(block)
        x, block_kwargs = self._embed(images)
        for i, blk in enumerate(self.blocks[:last + 1]):
            x = blk(x, **(block_kwargs[i] if isinstance(block_kwargs, list) else block_kwargs))
        return self.norm(x) if self.final_norm else x

    forward = forward_features = forward_tokens  # timm's versions would run every block and the norm

    def _stem(self):
        """The module every forward starts with (capture_attention's cue that a new forward began)."""
        return self.patch_embed


class ViTEncoder(_Encoder, VisionTransformer):
    def _embed(self, images):
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images)))), {}


class BeitEncoder(_Encoder, Beit):
    has_class_token, num_reg_tokens = True, 0  # timm's Beit always has [cls] and never registers

    def _embed(self, images):
        # Beit.forward_features' embedding, which it offers no way to stop after a chosen block
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        shared = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        return self.pos_drop(x), {"shared_rel_pos_bias": shared}


class EvaEncoder(_Encoder, Eva):
    """timm's Eva: EVA/EVA02, EVA02-CLIP, DINOv3, PE, rotary ViTs; the rotary embedding reaches every block."""

    def _embed(self, images):
        x, rope = self._pos_embed(self.patch_embed(images))
        x = self.norm_pre(x)
        if rope is not None and self.rope_mixed:  # one embedding per block
            return x, [{"rope": r} for r in rope]
        return x, {"rope": rope}


class CapiEncoder(EvaEncoder):
    """CAPI (facebookresearch/capi) on timm's Eva blocks. Hand-written because no timm rotary embedding does
    what CAPI's does: every block has its own learned frequencies, and the 16 registers are rotated too, at
    coordinates on the image's edge (CAPI model.py `Rope`, `get_edge_coordinates`)."""

    def _embed(self, images):
        x, _ = self._pos_embed(self.patch_embed(images))  # registers first; no position embedding, no rope
        h, w = self.grid_size
        side = self.num_reg_tokens // 4
        c = torch.arange(side, dtype=torch.float32) / side
        one, zero = torch.ones(side), torch.zeros(side)
        edge = torch.cat([torch.stack(p, -1) for p in ((c, zero), (one, c), (1 - c, one), (zero, 1 - c))])
        grid = torch.cartesian_prod(torch.linspace(0, 1, h), torch.linspace(0, 1, w))
        coords = torch.cat([edge, grid]).to(x.device)  # [T, 2]: (row, column) in [0, 1]
        embeds = []
        for freqs in self.rope_freqs.float():  # [2, head_dim] per block
            angle = coords @ freqs
            embeds.append({"rope": torch.cat([angle.sin(), angle.cos()], dim=-1)})
        return x, embeds


class HieraEncoder(_Encoder, Hiera):
    """timm's Hiera: its last stage's tokens are the patch grid (32 px patches), in raster order once the
    unrolling is consumed; no [cls], no registers, and no norm over tokens (timm normalises the pooled vector)."""

    def _embed(self, images):
        return self.unroll(self._pos_embed(self.patch_embed(images))), {}

    def _stage_note(self):
        return "earlier blocks are earlier Hiera stages at finer grids and narrower widths"


class NaFlexEncoder(_Encoder, NaFlexVit):
    """timm's NaFlexVit read with plain images (its fixed-grid path: no padding, no attention mask)."""

    def _embed(self, images):
        embeds = self._forward_embeds(images, patch_coord=None, patch_valid=None, attn_mask=None)
        common = {"attn_mask": embeds["attn_mask"]}
        rope = embeds["rope_embeds"]
        if rope is None:
            return embeds["patches"], common
        if self.rope_is_mixed:
            return embeds["patches"], [{**common, "rope": r} for r in rope]
        return embeds["patches"], {**common, "rope": rope}

    def _stem(self):
        return self.embeds


ENCODERS = {VisionTransformer: ViTEncoder, Beit: BeitEncoder, Eva: EvaEncoder, Hiera: HieraEncoder,
            NaFlexVit: NaFlexEncoder}
# The block and attention classes each family's capture understands (attention_probabilities below).
BLOCKS = {ViTEncoder: ((timm_vit.Block,), (ViTAttention,)),
          BeitEncoder: ((timm_beit.Block,), (timm_beit.Attention,)),
          EvaEncoder: ((timm_eva.EvaBlock, timm_eva.EvaBlockPostNorm), (timm_eva.EvaAttention, AttentionRope)),
          CapiEncoder: ((timm_eva.EvaBlock,), (timm_eva.EvaAttention,)),
          HieraEncoder: ((timm_hiera.HieraBlock,), (timm_hiera.MaskUnitAttention,)),
          NaFlexEncoder: ((timm_vit.Block, timm_eva.EvaBlock), (ViTAttention, timm_eva.EvaAttention, AttentionRope))}
FAMILIES = {ViTEncoder: "vit", BeitEncoder: "beit", EvaEncoder: "eva", CapiEncoder: "capi", HieraEncoder: "hiera",
            NaFlexEncoder: "naflex"}
SUPPORTED = ("timm's VisionTransformer (plain blocks), Beit, Eva (EVA02, DINOv3, PE, rotary ViTs), Hiera and "
             "NaFlexVit")


def _as_encoder(net, name, final_norm=False, input_size=None, cls=None):
    """The timm model `net` as our encoder class. timm's factories build the exact architecture of a name but
    take no model class, and ours only adds methods, so the instance changes class in place. `input_size`:
    the side the encoder will see (NaFlexVit's grid follows its input; the others were built for it)."""
    cls = cls or ENCODERS.get(type(net))
    blocks, attentions = BLOCKS.get(cls, ((), ()))
    if cls is None or not all(type(b) in blocks and type(b.attn) in attentions for b in net.blocks):
        odd = next((b for b in getattr(net, "blocks", [])
                    if type(b) not in blocks or type(getattr(b, "attn", None)) not in attentions), None)
        kind = type(net).__name__ if odd is None else f"{type(net).__name__} with {type(odd).__name__} blocks" + (
            f" of {type(odd.attn).__name__}" if hasattr(odd, "attn") else "")
        raise ValueError(f"timm model '{name}' is built from {kind}; supported are {SUPPORTED}")
    net.__class__ = cls
    net.family, net.depth, net.final_norm = FAMILIES[cls], len(net.blocks), final_norm
    if cls is HieraEncoder:
        _hiera_layout(net, name)
    elif cls is NaFlexEncoder:
        net.patch_size = net.embeds.patch_size[0]
        side = input_size or net.pretrained_cfg["input_size"][-1]
        net.grid_size = (side // net.patch_size, side // net.patch_size)
    else:
        net.patch_size = net.patch_embed.patch_size[0]
        net.grid_size = tuple(net.patch_embed.grid_size)
    if cls in (EvaEncoder, CapiEncoder):
        net.has_class_token = net.cls_token is not None
        net.num_reg_tokens = 0 if net.reg_token is None else net.reg_token.shape[1]
    if final_norm and isinstance(getattr(net, "norm", None), (nn.Identity, type(None))):
        raise release_layouts.NoFinalNorm(f"timm model '{name}' has no final norm over its tokens to apply"
                         + (" (Hiera normalises only its pooled vector, head.norm)" if cls is HieraEncoder else ""))
    return net


def _hiera_layout(net, name):
    """Hiera's last stage: its grid, width and the blocks that read it; refused if that stage is windowed."""
    if net.blocks[-1].attn.use_mask_unit_attn or net.q_pool != len(net.stage_ends) - 1:
        raise ValueError(f"timm model '{name}' keeps mask-unit (windowed) attention or unconsumed unrolling in "
                         "its last stage, so its last tokens are not a patch grid in raster order")
    strides = [s ** net.q_pool for s in net.q_stride]  # every stage transition pools the queries by q_stride
    net.patch_size = net.patch_stride[0] * strides[0]
    net.grid_size = tuple(n // s for n, s in zip(net.tokens_spatial_shape, strides))
    net.first_grid_block = net.stage_ends[-2] + 1
    net.first_attention_block = net.first_grid_block + (net.blocks[net.first_grid_block].attn.q_stride > 1)
    net.embed_dim = net.blocks[-1].dim_out
    net.has_class_token, net.num_reg_tokens, net.num_prefix_tokens = False, 0, 0
    for block in net.blocks:
        block.attn.num_heads = block.attn.heads  # the name every other family's attention uses


# ---------------------------------------------------------------- architectures

def architecture(model: str, **arch: Unpack[SizeOverrides]) -> dict:
    """The architecture a model name stands for, without reading weights or downloading.

    A dict: patch_size, embed_dim, depth, num_heads, mlp_ratio (of the last block: Hiera's stages differ),
    family ('vit', 'beit', 'eva', 'capi', 'hiera', 'naflex'), class_token, reg_tokens, img_size (native input
    size) and source ('preset' or 'timm'). Hiera's patch_size is its last stage's (32 px). For presets family,
    class_token, reg_tokens and img_size are None unless the preset sets them: the checkpoint decides.
    `arch` overrides sizes (tests build tiny models). ValueError for an unknown or unsupported name.
    """
    if model in MODELS:
        return {**MAE_DEFAULTS, "family": None, "class_token": None, "reg_tokens": None, "img_size": None,
                **MODELS[model], **arch, "source": "preset"}
    return {**_timm_architecture(model, tuple(sorted(arch.items()))), **arch, "source": "timm"}


@lru_cache(maxsize=64)
def _timm_architecture(name, arch=()):
    if name.lower().startswith(("dit-", "dit_", "sit-", "sit_")):
        raise ValueError(f"'{name}' is a diffusion transformer: it denoises VAE latents given a timestep and a "
                         "class, so its tokens depend on a noise level and a label, not on the image alone; it is "
                         "not probed here")
    if not timm.is_model(name):
        raise ValueError(f"unknown model '{name}': neither a preset ({', '.join(MODELS)}) nor a timm architecture")
    try:
        with torch.device("meta"):  # shapes only: no memory, no weights, no download
            net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **dict(arch))
    except (AssertionError, TypeError, ValueError) as err:
        raise ValueError(f"timm model '{name}' cannot be built as a bare encoder: {err}") from None
    _as_encoder(net, name)
    last = net.blocks[-1]
    img_size = net.patch_embed.img_size[0] if hasattr(net, "patch_embed") and hasattr(net.patch_embed, "img_size") \
        else net.pretrained_cfg["input_size"][-1]
    return dict(patch_size=net.patch_size, embed_dim=net.embed_dim, depth=net.depth, num_heads=last.attn.num_heads,
                mlp_ratio=_mlp_hidden(last.mlp) / net.embed_dim, family=net.family,
                class_token=bool(net.has_class_token), reg_tokens=net.num_reg_tokens, img_size=img_size)


def _mlp_hidden(mlp):
    """Hidden width of timm's Mlp, GluMlp (fc1 holds gate and value) or SwiGLU (fc1_g and fc1_x)."""
    if hasattr(mlp, "fc1_g"):
        return mlp.fc1_g.out_features
    return mlp.fc1.out_features // (2 if isinstance(mlp, GluMlp) else 1)


def _structure(found, model):
    """(family, structure): the encoder family a checkpoint needs, and for a preset the architecture choices
    its keys reveal (release key names; the sizes come from the name). Keys the preset requires must be there:
    a missing position embedding or missing qkv biases are refused, never built as an encoder without them."""
    state, preset = found.state, model in MODELS
    if found.family == "capi":
        if not preset:
            raise ValueError(f"{found.description} is a CAPI encoder, which timm has no architecture for: pass "
                             "the preset of its size as --model (vit_large_patch14 for CAPI's ViT-L/14)")
        return "capi", dict(reg_tokens=state["registers"].shape[1] if "registers" in state else 0)
    if found.family == "eva":
        if preset or architecture(model)["family"] != "eva":
            raise ValueError(f"{found.description} needs its timm architecture (rotary embedding settings are not "
                             f"stored in the file): pass {_suggest_eva(found)} as --model")
        return "eva", {}
    cls = "cls_token" in state
    registers = state.get("register_tokens", state.get("reg_token"))
    regs = 0 if registers is None else registers.shape[1]
    if release_layouts.beit_style(state):
        if not cls:
            raise ValueError("a BEiT-style encoder (relative position bias, q/v biases) needs a [cls] token, "
                             "and this checkpoint has none")
        if preset:
            has_position = "pos_embed" in state or any(k.endswith("relative_position_bias_table") for k in state)
            release_layouts.require_keys(
                found, model, [f"blocks.{i}.attn.{b}_bias" for i in release_layouts.block_indices(state) for b in "qv"]
                + ([] if has_position else ["pos_embed or a relative_position_bias_table"]))
        return "beit", dict(qkv_bias="blocks.0.attn.q_bias" in state,
                            init_values=1.0 if "blocks.0.gamma_1" in state else None,
                            use_abs_pos_emb="pos_embed" in state,
                            use_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in state,
                            use_shared_rel_pos_bias="rel_pos_bias.relative_position_bias_table" in state,
                            use_fc_norm=False)
    if preset:
        release_layouts.require_keys(
            found, model, ["pos_embed"] + [f"blocks.{i}.attn.qkv.bias" for i in release_layouts.block_indices(state)])
    layer_scale = "blocks.0.ls1.gamma" in state or "blocks.0.gamma_1" in state
    structure = dict(class_token=cls, reg_tokens=regs,
                     no_embed_class=release_layouts.no_embed_class(state, cls + regs),
                     init_values=1.0 if layer_scale else None, qkv_bias=True, pos_embed="learn",
                     pre_norm="norm_pre.weight" in state)
    if "blocks.0.mlp.w12.weight" in state:  # DINOv2's fused SwiGLU (ViT-g, Franca): timm's packed GluMlp
        dim, ratio = state["blocks.0.mlp.w12.weight"].shape[1], MODELS[model].get("mlp_ratio", 4.0)
        hidden = (int(dim * ratio * 2 / 3) + 7) // 8 * 8  # DINOv2 layers/swiglu_ffn.py SwiGLUFFNFused
        structure.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2 * hidden / dim)
    return "vit", structure


def _suggest_eva(found):
    """The timm names whose size fits the checkpoint, for a message (or the family's pattern)."""
    patch = next((found.state[k] for k in ("patch_embed.proj.weight", "conv1.weight") if k in found.state), None)
    pattern = {"DINOv3": "vit_*_dinov3*", "EVA02": "eva02_*", "PE (Perception Encoder)": "vit_pe_*"}.get(
        found.layout, "a timm Eva name")
    if patch is None or pattern == "a timm Eva name":
        return pattern
    fits = [n for n in timm.list_models(pattern) if _timm_architecture(n)["embed_dim"] == patch.shape[0]
            and _timm_architecture(n)["patch_size"] == patch.shape[-1]]
    return " or ".join(fits[:4]) if fits else f"a timm name matching {pattern}"


# ---------------------------------------------------------------- loading

def build_encoder(model: str, finetune: str = "", *, checkpoint_key: Optional[str] = None, input_size: int = 224,
                  no_cls_token: bool = False, final_norm: bool = False, simmim: bool = False,
                  trust_checkpoint: bool = False, verbose: bool = True, **arch: Unpack[SizeOverrides]) -> nn.Module:
    """Frozen encoder (eval, requires_grad False) from a checkpoint file of any release, a timm name or nothing.

    `model`: a MODELS preset or a timm ViT/BEiT architecture name (architecture only; no weights are fetched
    for it). `finetune`: a checkpoint file (its layout and sub-model are recognised from its content;
    `checkpoint_key` picks another sub-model or entry), a timm pretrained name (timm downloads it), or "" for
    random weights. `no_cls_token` builds a random encoder without [cls], and insists that a checkpoint has none;
    `simmim` insists on a SimMIM/BEiT file (neither is needed to read one). `trust_checkpoint` unpickles the
    file fully, running any code it holds (util.checkpoint.load_checkpoint); by default that is refused.
    `arch` overrides sizes (patch_size, embed_dim, depth, num_heads, mlp_ratio), e.g. for tiny test models.
    """
    spec = architecture(model, **arch)
    _check_input_size(input_size, spec["patch_size"])
    if not finetune:
        encoder = _random_encoder(model, spec, arch, input_size, no_cls_token, final_norm)
        summary = (f"random-initialised encoder {model} (no checkpoint given), {input_size}px, "
                   f"grid {encoder.grid_size}")
    elif os.path.exists(finetune) or (_looks_like_path(finetune) and not timm.is_model(finetune)):
        encoder, summary = _load_file(model, arch, finetune, checkpoint_key, input_size, no_cls_token, final_norm,
                                      simmim, trust_checkpoint)
    else:
        encoder, summary = _load_timm_pretrained(model, spec, finetune, input_size, no_cls_token, final_norm)
    encoder.eval().requires_grad_(False)
    if verbose:
        print(summary, flush=True)
    return encoder


def _looks_like_path(name):
    return os.sep in name or name.endswith(CHECKPOINT_SUFFIXES)


def _check_input_size(input_size, patch):
    if input_size < 1 or input_size % patch:
        raise ValueError(f"input size {input_size} is not a positive multiple of the patch size {patch}")


def _new_encoder(model, arch, input_size, family, structure, final_norm):
    """An encoder of `model` at `input_size`: a preset takes `structure` from the checkpoint, a timm name is
    exactly timm's architecture."""
    common = dict(img_size=input_size, num_classes=0, global_pool="")
    if model in MODELS:
        sizes = {**MAE_DEFAULTS, **MODELS[model], **arch}
        sizes = {k: v for k, v in sizes.items() if k not in ("family", "class_token", "reg_tokens", "img_size")}
        if family == "beit":
            return _as_encoder(Beit(**{**sizes, **structure, **common}), model, final_norm)
        if family == "capi":
            return _capi_encoder(sizes, structure, common, model, final_norm)
        return _as_encoder(VisionTransformer(**{**sizes, **structure, **common}), model, final_norm)
    try:
        net = timm.create_model(model, pretrained=False, **arch, **common)
    except (AssertionError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"timm model '{model}' cannot be built at {input_size}px: {err}") from None
    return _as_encoder(net, model, final_norm, input_size)


def _capi_encoder(sizes, structure, common, model, final_norm):
    """CAPI's encoder (model.py EncoderDecoder.encoder) as timm's Eva: pre-norm RMSNorm blocks without biases
    (timm's Linear biases stay zero), separate q/k/v, registers and no [cls]; CapiEncoder adds its rotary
    embedding, which rotates the registers too (so Eva's attention skips no prefix)."""
    net = Eva(patch_size=sizes["patch_size"], embed_dim=sizes["embed_dim"], depth=sizes["depth"],
              num_heads=sizes["num_heads"], mlp_ratio=sizes["mlp_ratio"], qkv_bias=False, qkv_fused=False,
              class_token=False, num_reg_tokens=structure["reg_tokens"], use_abs_pos_emb=False,
              rope_rotate_half=True, norm_layer=partial(RmsNorm, eps=1e-5), **common)  # CAPI rotates halves
    net.norm = RmsNorm(sizes["embed_dim"], eps=1e-5, affine=False)  # CAPI's enc_norm has no weight
    for block in net.blocks:
        block.attn.num_prefix_tokens = 0
    head_dim = sizes["embed_dim"] // sizes["num_heads"]
    net.register_buffer("rope_freqs", torch.zeros(sizes["depth"], 2, head_dim))  # loaded from the checkpoint
    return _as_encoder(net, model, final_norm, cls=CapiEncoder)


def _random_encoder(model, spec, arch, input_size, no_cls_token, final_norm):
    if model in MODELS:
        return _new_encoder(model, arch, input_size, "vit", dict(class_token=not no_cls_token), final_norm)
    if no_cls_token and spec["class_token"]:
        raise ValueError(f"timm model '{model}' has a [cls] token; an encoder without one was asked for")
    return _new_encoder(model, arch, input_size, spec["family"], {}, final_norm)


def _load_file(model, arch, path, checkpoint_key, input_size, no_cls_token, final_norm, simmim, trust):
    found = release_layouts.find_encoder(release_layouts.read_checkpoint(path, trust), path, checkpoint_key)
    if simmim and found.layout not in ("SimMIM", "BEiT/BEiT-v2"):
        raise ValueError(f"{found.description} is not a SimMIM/BEiT checkpoint (SimMIM files are recognised "
                         "without being named)")
    if no_cls_token and ("cls_token" in found.state or "class_embedding" in found.state):
        raise ValueError(f"{found.description} has a [cls] token (cls_token); an encoder without one was asked for")
    family, structure = _structure(found, model)
    if found.layout.startswith("PE"):  # PE's Rope2D counts positions on the grid it sees (pe.py update_grid);
        side = input_size // architecture(model, **arch)["patch_size"]  # timm rescales them to ref_feat_shape
        arch = {**arch, "ref_feat_shape": (side, side)}
    encoder = _new_encoder(model, arch, input_size, family, structure, final_norm)
    notes = release_layouts.load_state(encoder, found, model)
    norm = "after" if final_norm else "before"
    summary = (f"loaded {found.description}: {len(found.state)} tensors into {model}, {input_size}px, "
               f"grid {encoder.grid_size}, {_prefix_words(encoder)}{notes}; tokens {norm} the final norm")
    return encoder, summary


def _prefix_words(encoder):
    words = ["[cls]" if encoder.has_class_token else "no [cls]"]
    if encoder.num_reg_tokens:
        words.append(f"{encoder.num_reg_tokens} registers")
    return " + ".join(words)


def _load_timm_pretrained(model, spec, name, input_size, no_cls_token, final_norm):
    if not timm.is_model(name):
        raise FileNotFoundError(f"'{name}' is no file and an unknown timm model")
    if not is_model_pretrained(name):
        raise release_layouts.NoPretrainedWeights(f"timm model '{name}' has no pretrained weights")
    weights = _timm_architecture(name)
    differ = [f"{k} {weights[k]} vs {spec[k]}" for k in ("patch_size", "embed_dim", "depth", "num_heads")
              if weights[k] != spec[k]]
    if differ:
        raise ValueError(f"timm model {name} does not fit {model} ({name} vs {model}: {', '.join(differ)})")
    if no_cls_token and weights["class_token"]:
        raise ValueError(f"timm model '{name}' has a [cls] token; an encoder without one was asked for")
    try:
        net = timm.create_model(name, pretrained=True, num_classes=0, global_pool="", img_size=input_size)
    except (OSError, RuntimeError, ValueError) as err:
        reason = str(err).split(". ")[0].splitlines()[0][:160] if str(err) else type(err).__name__
        raise FileNotFoundError(f"timm model '{name}' could not be downloaded: {reason}; without internet, fill "
                                "the Hugging Face cache or use a local checkpoint file") from None
    encoder = _as_encoder(net, name, final_norm, input_size)
    release_layouts.check_finite(encoder.state_dict(), f"timm pretrained {name}")
    norm = "after" if final_norm else "before"
    return encoder, (f"loaded timm pretrained {name}: {len(encoder.state_dict())} tensors, {input_size}px, "
                     f"grid {encoder.grid_size}, {_prefix_words(encoder)}; tokens {norm} the final norm")


# ---------------------------------------------------------------- attention capture

class BlockRecords(dict):
    """Per-block records keyed by block index; negative indices count from the encoder's last block."""

    def __init__(self, depth):
        super().__init__()
        self.depth = depth

    def __getitem__(self, index):
        return super().__getitem__(index + self.depth if index < 0 else index)


@dataclass
class AttentionCapture:
    records: BlockRecords


def _relative_bias(attn):
    """[1, H, T, T] relative position bias of a timm Beit Attention with its own table."""
    index = attn.relative_position_index
    bias = attn.relative_position_bias_table[index.view(-1)].view(*index.shape, -1)
    return bias.permute(2, 0, 1).unsqueeze(0)


def attention_probabilities(attn: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                            shared_rel_pos_bias: Optional[torch.Tensor] = None,
                            rope: Optional[Union[torch.Tensor, tuple]] = None) -> torch.Tensor:
    """Softmax attention [B, H, T, T] that timm's ViT, Beit, Eva (EvaAttention, AttentionRope), Hiera
    (global MaskUnitAttention) or NaFlexVit attention computes for input x, with the block's rotary embedding,
    q/k norms, relative bias and mask.

    q, k, the scores and the softmax are float32 whatever autocast is active: under bf16 autocast the scores
    themselves would be rounded (steps of 0.125 near 25), several percent of a probability.
    """
    off = torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type) else \
        nullcontext()  # (the meta device has no autocast)
    with off:
        q, k, bias = _queries_keys(attn, x.float(), rope, shared_rel_pos_bias)
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        for extra in (bias, attn_mask):
            if extra is not None:  # a boolean mask marks the allowed pairs, as in SDPA
                scores = scores.masked_fill(~extra, float("-inf")) if extra.dtype == torch.bool else \
                    scores + extra.float()
        return scores.softmax(dim=-1)


def _queries_keys(attn, x, rope, shared_rel_pos_bias):
    """(q, k, additive bias or None) in float32, q and k [B, H, T, head_dim] exactly as the module forms them."""
    B, T, _ = x.shape
    if isinstance(attn, timm_beit.Attention):
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, _ = F.linear(x, attn.qkv.weight, bias).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        extra = shared_rel_pos_bias
        if attn.relative_position_bias_table is not None:
            extra = _relative_bias(attn) if extra is None else _relative_bias(attn) + extra
        return q, k, extra
    if isinstance(attn, timm_hiera.MaskUnitAttention):  # global attention only (see _as_encoder)
        q, k, _ = attn.qkv(x).reshape(B, T, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, None
    if isinstance(attn, ViTAttention):
        q, k, _ = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return attn.q_norm(q), attn.k_norm(k), None
    # EvaAttention and AttentionRope: fused or separate projections, EVA's q/v-only bias, grouped k/v heads
    if attn.qkv is not None:
        bias = getattr(attn, "q_bias", None)
        bias = attn.qkv.bias if bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, _ = F.linear(x, attn.qkv.weight, bias).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    else:
        q = attn.q_proj(x).reshape(B, T, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, T, getattr(attn, "num_kv_heads", attn.num_heads), -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        n = attn.num_prefix_tokens
        rotate = partial(apply_rot_embed_cat, emb=rope.float(), half=attn.rotate_half)
        q = torch.cat([q[:, :, :n], rotate(q[:, :, n:])], dim=2)
        k = torch.cat([k[:, :, :n], rotate(k[:, :, n:])], dim=2)
    groups = getattr(attn, "num_kv_groups", 1)
    return q, (k.repeat_interleave(groups, dim=1) if groups > 1 else k), None


def _attention_branch(block, output):
    """What a block adds to its residual stream from its attention module's output."""
    if isinstance(block, timm_eva.EvaBlockPostNorm):
        return block.norm1(output)
    if isinstance(block, (timm_beit.Block, timm_eva.EvaBlock)):
        return output if block.gamma_1 is None else block.gamma_1 * output
    return block.ls1(output)  # ViT and Hiera blocks: LayerScale or Identity


@contextmanager
def capture_attention(encoder: nn.Module, blocks: Optional[Iterable[int]] = None) -> Iterator[AttentionCapture]:
    """Within the block, each forward fills `cap.records[i]` = {attn, resid_norm, attn_out_norm, out}.

    attn: [B, H, T, T] float32 probabilities over all tokens ([cls], registers, patches); resid_norm: |x| of
    the block's input; attn_out_norm: |what the attention branch adds to the residual| (layer scale included;
    a post-norm block's norm); out: the block's output. `blocks` (default: every block whose attention runs
    over the final patch grid, all but Hiera's earlier stages). Forward hooks on timm's modules, registered only
    here, so the normal path keeps fused SDPA.
    """
    chosen = range(encoder.first_attention_block, encoder.depth) if blocks is None else blocks
    indices = sorted({encoder.block_index(b, attention=True) for b in chosen})
    cap, pending = AttentionCapture(BlockRecords(encoder.depth)), {}

    def on_embed(module, args):  # a new forward starts: forget the previous one
        cap.records.clear()
        pending.clear()

    def on_attn(index, block, module, args, kwargs, output):
        probs = attention_probabilities(module, args[0], kwargs.get("attn_mask"), kwargs.get("shared_rel_pos_bias"),
                                        kwargs.get("rope"))
        branch = _attention_branch(block, output)
        pending[index] = {"attn": probs.detach(), "attn_out_norm": branch.detach().float().norm(dim=-1)}

    def on_block(index, module, args, output):
        record = pending.pop(index)
        record["resid_norm"] = args[0].detach().float().norm(dim=-1)
        record["out"] = output.detach()
        cap.records[index] = record

    handles = [encoder._stem().register_forward_pre_hook(on_embed)]
    for i in indices:
        block = encoder.blocks[i]
        handles += [block.attn.register_forward_hook(partial(on_attn, i, block), with_kwargs=True),
                    block.register_forward_hook(partial(on_block, i))]
    try:
        yield cap
    finally:
        for handle in handles:
            handle.remove()
