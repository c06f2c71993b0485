"""Frozen ViT encoders of every release the paper and its peers probe, on timm's own model classes; one loader.

`build_encoder` reads any checkpoint layout of util/release_layouts.py (MAE, SimMIM, BEiT/BEiT-v2, DINO, iBOT,
MoCo v3, I-JEPA, DINOv2 with or without registers, timm state dicts) or a timm pretrained name. The encoder is
timm's VisionTransformer (register tokens, layer scale, no [cls], fixed sin-cos position embeddings) or timm's
Beit (q/v biases, shared or per-block relative position bias), with `forward_tokens` added; the release keys
become timm's through timm's own `checkpoint_filter_fn`.

Tokens are taken *before* the final LayerNorm by default, as the paper's code does (gmum/beyond_cls
models_vit.py: its forward_features never applies `self.norm` and stops after block `return_block`);
MAE's official linear probe takes them after it: pass final_norm=True for that.

Library code: problems are ValueError / FileNotFoundError with plain messages; the entry points add what to do.
"""
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from timm.layers.attention import Attention as ViTAttention
from timm.models import beit as timm_beit
from timm.models import is_model_pretrained
from timm.models import vision_transformer as timm_vit
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from util import release_layouts
from util.checkpoint import NonFiniteWeights, load_checkpoint  # noqa: F401 (callers catch it from here)

# Presets: sizes only; the rest of the architecture (cls, registers, layer scale, position embedding, relative
# position bias) is read from the checkpoint. Any timm ViT/BEiT architecture name is accepted as well.
MODELS = {
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_small_patch16_mocov3": dict(patch_size=16, embed_dim=384, depth=12, num_heads=12),  # MoCo v3 ViT-S: 12 heads
    "vit_base_patch16_mocov3": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_mini_patch8": dict(patch_size=8, embed_dim=64, depth=4, num_heads=2),  # 64 px digits_clutter (issue 14)
}
MAE_DEFAULTS = dict(mlp_ratio=4.0, qkv_bias=True)
# Parts of a release's model that are not its encoder (decoders, projection/prediction heads, mask tokens).
NOT_ENCODER = ("decoder", "mask_token", "head.", "fc_norm.", "lm_head.", "cls_pt_", "masked_embed", "pre_logits.")


# ---------------------------------------------------------------- encoders

class _Encoder:
    """What every family adds to its timm class: the tokens after any block, before or after the final norm.

    Attributes set by `_as_encoder`: patch_size, grid_size, depth, final_norm (False: the paper's tokens).
    """

    def block_index(self, block):
        """0-based index of `block` (None: the last; negative counts from the end); ValueError outside the encoder."""
        if block is None:
            return self.depth - 1
        if not -self.depth <= block < self.depth:
            raise ValueError(f"block {block} does not exist in a {self.depth}-block encoder "
                             f"(blocks are 0..{self.depth - 1}, or -1..-{self.depth} from the end)")
        return block % self.depth

    def forward_tokens(self, images, block=None):
        """[B, prefix + N, D] tokens after `block`; only the blocks up to it run."""
        last = self.block_index(block)
        x, block_kwargs = self._embed(images)
        for blk in self.blocks[:last + 1]:
            x = blk(x, **block_kwargs)
        return self.norm(x) if self.final_norm else x

    forward = forward_features = forward_tokens  # timm's versions would run every block and the norm


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


ENCODERS = {VisionTransformer: ViTEncoder, Beit: BeitEncoder}
BLOCKS = {ViTEncoder: (timm_vit.Block, ViTAttention), BeitEncoder: (timm_beit.Block, timm_beit.Attention)}


def _as_encoder(net, name, final_norm=False):
    """The timm model `net` as our encoder class. timm's factories build the exact architecture of a name but
    take no model class, and ours only adds methods, so the instance changes class in place."""
    cls = ENCODERS.get(type(net))
    block, attention = BLOCKS.get(cls, (None, None))
    if cls is None or not all(type(b) is block and type(b.attn) is attention for b in net.blocks):
        kind = f"{type(net).__name__} with {type(net.blocks[0]).__name__} blocks" if hasattr(net, "blocks") else \
            type(net).__name__
        raise ValueError(f"timm model '{name}' is built from {kind}; supported are timm's VisionTransformer "
                         "(plain blocks, registers, layer scale, no [cls]) and Beit")
    net.__class__ = cls
    net.patch_size = net.patch_embed.patch_size[0]
    net.grid_size = tuple(net.patch_embed.grid_size)
    net.depth = len(net.blocks)
    net.final_norm = final_norm
    return net


# ---------------------------------------------------------------- architectures

def architecture(model, **arch):
    """The architecture a model name stands for, without reading weights or downloading.

    A dict: patch_size, embed_dim, depth, num_heads, mlp_ratio, family ('vit', 'beit'), class_token,
    reg_tokens, img_size (native input size) and source ('preset' or 'timm'). For presets family,
    class_token, reg_tokens and img_size are None unless the preset sets them: the checkpoint decides.
    `arch` overrides sizes (tests build tiny models). ValueError for an unknown or unsupported name.
    """
    if model in MODELS:
        return {**MAE_DEFAULTS, "family": None, "class_token": None, "reg_tokens": None, "img_size": None,
                **MODELS[model], **arch, "source": "preset"}
    return {**_timm_architecture(model, tuple(sorted(arch.items()))), **arch, "source": "timm"}


@lru_cache(maxsize=64)
def _timm_architecture(name, arch=()):
    if not timm.is_model(name):
        raise ValueError(f"unknown model '{name}': neither a preset ({', '.join(MODELS)}) nor a timm architecture")
    try:
        with torch.device("meta"):  # shapes only: no memory, no weights, no download
            net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **dict(arch))
    except (AssertionError, TypeError, ValueError) as err:
        raise ValueError(f"timm model '{name}' cannot be built as a bare encoder: {err}") from None
    _as_encoder(net, name)
    attn, mlp = net.blocks[0].attn, net.blocks[0].mlp
    return dict(patch_size=net.patch_size, embed_dim=net.embed_dim, depth=net.depth, num_heads=attn.num_heads,
                mlp_ratio=mlp.fc1.out_features / net.embed_dim, family="beit" if isinstance(net, Beit) else "vit",
                class_token=bool(net.has_class_token), reg_tokens=net.num_reg_tokens,
                img_size=net.patch_embed.img_size[0])


def _structure(state):
    """Architecture choices a checkpoint's keys reveal, in release key names (the sizes come from the name)."""
    cls = "cls_token" in state
    registers = state.get("register_tokens", state.get("reg_token"))
    regs = 0 if registers is None else registers.shape[1]
    if release_layouts.beit_style(state):
        if not cls:
            raise ValueError("a BEiT-style encoder (relative position bias, q/v biases) needs a [cls] token, "
                             "and this checkpoint has none")
        return "beit", dict(qkv_bias="blocks.0.attn.q_bias" in state,
                            init_values=1.0 if "blocks.0.gamma_1" in state else None,
                            use_abs_pos_emb="pos_embed" in state,
                            use_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in state,
                            use_shared_rel_pos_bias="rel_pos_bias.relative_position_bias_table" in state,
                            use_fc_norm=False)
    layer_scale = "blocks.0.ls1.gamma" in state or "blocks.0.gamma_1" in state
    return "vit", dict(class_token=cls, reg_tokens=regs, no_embed_class=_no_embed_class(state, cls + regs),
                       init_values=1.0 if layer_scale else None, qkv_bias="blocks.0.attn.qkv.bias" in state,
                       pos_embed="learn" if "pos_embed" in state else "none", pre_norm="norm_pre.weight" in state)


def _no_embed_class(state, prefix):
    """Whether the position embedding leaves the prefix tokens out (timm's no_embed_class)."""
    if "register_tokens" in state:
        return True  # timm's DINOv2 converter folds [cls]'s position into cls_token; registers never had one
    if prefix == 0 or "pos_embed" not in state:
        return False
    return _is_square(state["pos_embed"].shape[1])  # only patches: a square count


def _is_square(n):
    return n > 0 and math.isqrt(n) ** 2 == n


def _pos_grid(state):
    """Side of the square patch grid the checkpoint's position embedding covers, or None."""
    if "pos_embed" not in state:
        return None
    tokens = state["pos_embed"].shape[1]
    regs = state.get("reg_token", torch.empty(1, 0)).shape[1]
    # fewest prefix entries first: real grids are never ambiguous, tiny ones favour the larger grid
    for prefix in 0, int("cls_token" in state), ("cls_token" in state) + regs:
        if _is_square(tokens - prefix):
            return math.isqrt(tokens - prefix)
    return None


def _guess(state):
    """What the checkpoint looks like, for error messages."""
    patch = state.get("patch_embed.proj.weight")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    words = [f"embed_dim {patch.shape[0]}, patch {patch.shape[-1]}" if patch is not None else "no patch embedding",
             f"depth {depth}", "[cls]" if "cls_token" in state else "no [cls]"]
    registers = state.get("register_tokens", state.get("reg_token"))
    if registers is not None:
        words.append(f"{registers.shape[1]} registers")
    if release_layouts.beit_style(state):
        words.append("BEiT-style attention")
    grid = _pos_grid(state)
    if grid:
        words.append(f"position grid {grid}x{grid}")
    return ", ".join(words)


# ---------------------------------------------------------------- loading

def build_encoder(model, finetune="", *, checkpoint_key=None, input_size=224, no_cls_token=False,
                  final_norm=False, simmim=False, trust_checkpoint=False, verbose=True, **arch):
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
    return os.sep in name or name.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar"))


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
        return _as_encoder(VisionTransformer(**{**sizes, **structure, **common}), model, final_norm)
    return _as_encoder(timm.create_model(model, pretrained=False, **arch, **common), model, final_norm)


def _random_encoder(model, spec, arch, input_size, no_cls_token, final_norm):
    if model in MODELS:
        return _new_encoder(model, arch, input_size, "vit", dict(class_token=not no_cls_token), final_norm)
    if no_cls_token and spec["class_token"]:
        raise ValueError(f"timm model '{model}' has a [cls] token; an encoder without one was asked for")
    return _new_encoder(model, arch, input_size, spec["family"], {}, final_norm)


def _load_file(model, arch, path, checkpoint_key, input_size, no_cls_token, final_norm, simmim, trust):
    found = release_layouts.find_encoder(load_checkpoint(path, trust=trust), path, checkpoint_key)
    if simmim and found.layout not in ("SimMIM", "BEiT/BEiT-v2"):
        raise ValueError(f"{found.description} is not a SimMIM/BEiT checkpoint (SimMIM files are recognised "
                         "without being named)")
    if no_cls_token and "cls_token" in found.state:
        raise ValueError(f"{found.description} has a [cls] token (cls_token); an encoder without one was asked for")
    family, structure = _structure(found.state)
    encoder = _new_encoder(model, arch, input_size, family, structure, final_norm)
    notes = _load_state(encoder, found.state, found.description, model)
    norm = "after" if final_norm else "before"
    summary = (f"loaded {found.description}: {len(found.state)} tensors into {model}, {input_size}px, "
               f"grid {encoder.grid_size}, {_prefix_words(encoder)}{notes}; tokens {norm} the final norm")
    return encoder, summary


def _prefix_words(encoder):
    words = ["[cls]" if encoder.has_class_token else "no [cls]"]
    if encoder.num_reg_tokens:
        words.append(f"{encoder.num_reg_tokens} registers")
    return " + ".join(words)


def _load_state(encoder, state, source, model):
    """Convert `state` (release key names) with timm's converter and load it strictly; returns summary notes."""
    expected = encoder.state_dict()
    misfit = partial(_misfit, source=source, model=model, original=state)
    if _core_mismatch(state, encoder):  # caught before timm's converter would resample a wrong patch size
        raise misfit(state, expected)
    try:
        converted = _to_timm(state, encoder)
    except (RuntimeError, ValueError, AssertionError):  # e.g. a position embedding of no square grid
        raise misfit(state, expected) from None
    converted = {k: v for k, v in converted.items() if not k.startswith(NOT_ENCODER)}
    if "norm.weight" not in converted:  # SimMIM/BEiT with mean pooling, fine-tuned backbones: no final norm
        if encoder.final_norm:
            raise ValueError(f"{source} has no final norm (norm.weight) to apply")
        encoder.norm = nn.Identity()
        expected = encoder.state_dict()
    if _problems(converted, expected):
        raise misfit(converted, expected)
    _check_finite(converted, source)
    encoder.load_state_dict(converted, strict=True)
    return _resize_notes(state, converted, encoder)


def _to_timm(state, encoder):
    state = dict(state)  # timm's converters pop entries
    if isinstance(encoder, BeitEncoder):
        return timm_beit.checkpoint_filter_fn(state, encoder)
    return timm_vit.checkpoint_filter_fn(state, encoder, adapt_layer_scale=True)  # gamma_N -> lsN.gamma (iBOT)


def _core_mismatch(state, encoder):
    patch = state.get("patch_embed.proj.weight")
    registers = state.get("register_tokens", state.get("reg_token"))
    return (patch is None or patch.shape != encoder.patch_embed.proj.weight.shape
            or ("cls_token" in state) != bool(encoder.has_class_token)
            or (0 if registers is None else registers.shape[1]) != encoder.num_reg_tokens)


def _clip(items, limit=5):
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _problems(state, expected):
    order = partial(sorted, key=lambda k: (k.startswith("blocks."), k))  # embeddings say most, list them first
    ignored = lambda k: k.startswith(NOT_ENCODER) or k.endswith("relative_position_index")  # noqa: E731
    missing = order(expected.keys() - state.keys())
    unexpected = order(k for k in state.keys() - expected.keys() if not ignored(k))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in order(expected.keys() & state.keys()) if state[k].shape != expected[k].shape]
    return [f"{label}: {_clip(keys)}" for label, keys in
            (("missing", missing), ("unexpected", unexpected), ("shape checkpoint vs model", mismatched)) if keys]


def _misfit(state, expected, *, source, model, original):
    return ValueError(f"{source} looks like {_guess(original)}; it does not fit {model}: "
                      f"{'; '.join(_problems(state, expected))}")


def _check_finite(state, source):
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        counts = [f"{k} ({int(torch.isnan(state[k]).sum())} NaN, {int(torch.isinf(state[k]).sum())} inf)"
                  for k in bad[:3]]
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise NonFiniteWeights(f"{source} holds non-finite weights: {', '.join(counts)}{more}; the run that "
                               "saved it had diverged")


def _resize_notes(state, converted, encoder):
    notes = []
    grid = _pos_grid(state)
    if grid and (grid, grid) != encoder.grid_size:
        notes.append(f", position embedding resampled {grid}x{grid} -> {encoder.grid_size[0]}x{encoder.grid_size[1]}")
    tables = [k for k in state if k.endswith("relative_position_bias_table") and state[k].shape != converted[k].shape]
    if tables:
        notes.append(f", {len(tables)} relative position table(s) resized to the grid")
    return "".join(notes)


def _load_timm_pretrained(model, spec, name, input_size, no_cls_token, final_norm):
    if not timm.is_model(name):
        raise FileNotFoundError(f"'{name}' is no file and an unknown timm model")
    if not is_model_pretrained(name):
        raise ValueError(f"timm model '{name}' has no pretrained weights")
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
    encoder = _as_encoder(net, name, final_norm)
    _check_finite(encoder.state_dict(), f"timm pretrained {name}")
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


def attention_probabilities(attn, x, attn_mask=None, shared_rel_pos_bias=None):
    """Softmax attention [B, H, T, T] (float32) that timm's ViT or Beit Attention computes for input x."""
    B, T, _ = x.shape
    if isinstance(attn, timm_beit.Attention):
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        mask = shared_rel_pos_bias
        if attn.relative_position_bias_table is not None:
            mask = _relative_bias(attn) if mask is None else _relative_bias(attn) + mask
    else:
        qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        mask = attn_mask
    scores = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    if mask is not None:
        scores = scores + mask.float()
    return scores.softmax(dim=-1)


def _branch_scale(block):
    """The layer scale that multiplies a block's attention output before the residual add (1.0 if none)."""
    if isinstance(block, timm_beit.Block):
        return 1.0 if block.gamma_1 is None else block.gamma_1
    return block.ls1.gamma if isinstance(block.ls1, LayerScale) else 1.0


@contextmanager
def capture_attention(encoder, blocks=None):
    """Within the block, each forward fills `cap.records[i]` = {attn, resid_norm, attn_out_norm, out}.

    attn: [B, H, T, T] float32 probabilities over all tokens ([cls], registers, patches); resid_norm: |x| of
    the block's input; attn_out_norm: |layer scale * attention output|; out: the block's output. Forward hooks
    on timm's modules, registered only here, so the normal path keeps fused SDPA.
    """
    indices = sorted({encoder.block_index(b) for b in (range(encoder.depth) if blocks is None else blocks)})
    cap, pending = AttentionCapture(BlockRecords(encoder.depth)), {}

    def on_embed(module, args):  # a new forward starts: forget the previous one
        cap.records.clear()
        pending.clear()

    def on_attn(index, block, module, args, kwargs, output):
        probs = attention_probabilities(module, args[0], kwargs.get("attn_mask"), kwargs.get("shared_rel_pos_bias"))
        branch = output * _branch_scale(block)
        pending[index] = {"attn": probs.detach(), "attn_out_norm": branch.detach().float().norm(dim=-1)}

    def on_block(index, module, args, output):
        record = pending.pop(index)
        record["resid_norm"] = args[0].detach().float().norm(dim=-1)
        record["out"] = output.detach()
        cap.records[index] = record

    handles = [encoder.patch_embed.register_forward_pre_hook(on_embed)]
    for i in indices:
        block = encoder.blocks[i]
        handles += [block.attn.register_forward_hook(partial(on_attn, i, block), with_kwargs=True),
                    block.register_forward_hook(partial(on_block, i))]
    try:
        yield cap
    finally:
        for handle in handles:
            handle.remove()
