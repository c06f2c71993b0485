"""Frozen ViT encoders (MAE, SimMIM, timm) on timm's VisionTransformer, one loader, opt-in attention capture.

Tokens are taken *before* the final LayerNorm by default, as the paper's code does (gmum/beyond_cls
models_vit.py: its forward_features never applies `self.norm` and stops after block `return_block`);
MAE's official linear probe takes them after it: pass final_norm=True for that.
"""
import argparse
import math
import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import timm
import torch
from torch import nn
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from timm.models import is_model_pretrained
from timm.models.beit import gen_relative_position_index
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from util.errors import UserError

MODELS = {
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_mini_patch8": dict(patch_size=8, embed_dim=64, depth=4, num_heads=2),  # 64 px digits_clutter (issue 14)
}
MAE_DEFAULTS = dict(mlp_ratio=4.0, qkv_bias=True)
LAYER_NORM_EPS = 1e-6
DROPPED_PREFIXES = ("decoder", "mask_token", "head.", "fc_norm.")


class RelativePositionBias(nn.Module):
    """BEiT/SimMIM learned bias per (2-D offset, head) plus 3 entries: cls->patch, patch->cls, cls->cls."""

    def __init__(self, grid, num_heads):
        super().__init__()
        size = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(size, num_heads))
        self.register_buffer("index", gen_relative_position_index(tuple(grid)), persistent=False)

    def forward(self):
        tokens = self.index.shape[0]
        bias = self.relative_position_bias_table[self.index.view(-1)].view(tokens, tokens, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T], an additive SDPA mask


class ViTEncoder(VisionTransformer):
    """timm ViT without head; `forward_tokens` returns [B, prefix+N, D] tokens after a chosen block.

    `final_norm` (attribute) applies the final LayerNorm; False (default) matches the paper. `rel_pos_bias`
    is "none", "shared" (one table for all blocks) or "block" (one table per block), as in SimMIM/BEiT.
    """

    def __init__(self, *, final_norm=False, has_norm=True, rel_pos_bias="none", **vit_kwargs):
        vit_kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=LAYER_NORM_EPS))
        super().__init__(num_classes=0, global_pool="", fc_norm=False, final_norm=has_norm, **vit_kwargs)
        self.patch_size = self.patch_embed.patch_size[0]
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.depth = len(self.blocks)
        self.final_norm = final_norm
        heads = self.blocks[0].attn.num_heads
        self.rel_pos_bias = RelativePositionBias(self.grid_size, heads) if rel_pos_bias == "shared" else None
        self.block_rel_pos_bias = nn.ModuleList(
            RelativePositionBias(self.grid_size, heads) for _ in self.blocks) if rel_pos_bias == "block" else None

    def block_index(self, block):
        index = self.depth - 1 if block is None else block + self.depth if block < 0 else block
        if not 0 <= index < self.depth:
            raise UserError(f"block {block} does not exist in a {self.depth}-block encoder "
                            f"(use 0..{self.depth - 1} or -1)")
        return index

    def _attention_biases(self, dtype):
        if self.block_rel_pos_bias is not None:
            return [bias().to(dtype) for bias in self.block_rel_pos_bias]
        shared = None if self.rel_pos_bias is None else self.rel_pos_bias().to(dtype)
        return [shared] * self.depth

    def forward_tokens(self, images, block=None):
        last = self.block_index(block)
        x = self.norm_pre(self._pos_embed(self.patch_embed(images)))
        # SDPA wants the mask in the query's dtype, which is the autocast dtype under autocast
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        biases = self._attention_biases(dtype)
        for blk, bias in zip(self.blocks[:last + 1], biases):
            x = blk(x) if bias is None else blk(x, attn_mask=bias)
        return self.norm(x) if self.final_norm else x

    forward = forward_features = forward_tokens  # timm's versions would skip the relative position bias


# ---------------------------------------------------------------- loading

def build_encoder(model, finetune="", *, simmim=False, checkpoint_key="model", input_size=224,
                  no_cls_token=False, final_norm=False, verbose=True, **arch):
    """Frozen ViTEncoder (eval, requires_grad False) from a MAE/SimMIM/timm checkpoint file, a timm name or nothing.

    `model` is a MODELS key (or a timm pretrained name when finetune == ""); `arch` overrides its
    hyper-parameters (patch_size, embed_dim, depth, num_heads, mlp_ratio), e.g. for tiny test models.
    """
    if model not in MODELS:
        if finetune or not timm.is_model(model):
            raise UserError(f"unknown model '{model}' (choose one of {', '.join(MODELS)} or a timm pretrained name)")
        finetune, spec = model, None  # a timm name given as --model loads its pretrained weights
    else:
        spec = {**MAE_DEFAULTS, **MODELS[model], **arch}
    if finetune == "":
        encoder = _new_encoder(spec, input_size, no_cls_token, final_norm, {})
        summary = f"random-initialised encoder {model} (no --finetune given), {input_size}px, grid {encoder.grid_size}"
    else:
        if os.path.exists(finetune):
            state, source = _read_checkpoint(finetune, checkpoint_key, simmim)
        else:
            state, source, timm_spec = _timm_state_dict(finetune)
            if spec is not None and spec["num_heads"] != timm_spec["num_heads"]:
                raise UserError(f"timm model {finetune} has {timm_spec['num_heads']} heads, {model} has "
                                f"{spec['num_heads']} (pick the matching --model)")
            spec = spec or timm_spec
        encoder, summary = _load(state, spec, model, source, input_size, no_cls_token, final_norm)
    encoder.eval().requires_grad_(False)
    if verbose:
        print(summary, flush=True)
    return encoder


def _new_encoder(spec, input_size, no_cls_token, final_norm, structure):
    if input_size % spec["patch_size"]:
        raise UserError(f"--input_size {input_size} is not divisible by the patch size {spec['patch_size']} "
                        f"(use a multiple of {spec['patch_size']})")
    return ViTEncoder(img_size=input_size, class_token=not no_cls_token, final_norm=final_norm,
                      **{**spec, **structure})


def _structure(state):
    """Architecture choices that the checkpoint's keys reveal (the sizes come from `model`)."""
    rel = "shared" if "rel_pos_bias.relative_position_bias_table" in state else "none"
    rel = "block" if any(k.startswith("block_rel_pos_bias.") for k in state) else rel
    return dict(qkv_bias="blocks.0.attn.qkv.bias" in state, init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
                pos_embed="learn" if "pos_embed" in state else "none", has_norm="norm.weight" in state,
                rel_pos_bias=rel)


def _guess(state):
    """Sizes the checkpoint implies, for the hint of an error message."""
    shape = tuple(state.get("patch_embed.proj.weight", torch.empty(0, 0, 0, 0)).shape)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return f"embed_dim {shape[0]}, depth {depth}, patch {shape[-1]}"


def _clip(items, limit=5):
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _load(state, spec, model, source, input_size, no_cls_token, final_norm):
    structure = _structure(state)
    if final_norm and not structure["has_norm"]:
        raise UserError(f"{source} has no final norm (norm.weight) to apply (drop final_norm / --final_norm)")
    if structure["rel_pos_bias"] != "none" and no_cls_token:
        raise UserError("relative position bias needs the [cls] token (drop --no_cls_token)")
    encoder = _new_encoder(spec, input_size, no_cls_token, final_norm, structure)
    notes = _fit_positions(state, encoder)
    expected = encoder.state_dict()
    order = partial(sorted, key=lambda k: (k.startswith("blocks."), k))  # embeddings say most, list them first
    missing = order(expected.keys() - state.keys())
    unexpected = order(state.keys() - expected.keys())
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in order(expected.keys() & state.keys()) if state[k].shape != expected[k].shape]
    problems = [f"{label}: {_clip(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape checkpoint vs model", mismatched)) if keys]
    if problems:
        raise UserError(f"{source} does not fit {model}: {'; '.join(problems)} (the checkpoint looks like "
                        f"{_guess(state)}: pick the matching --model, --no_cls_token or --simmim)")
    encoder.load_state_dict(state, strict=True)
    norm = "after" if final_norm else "before"
    summary = (f"loaded {source}: {len(state)} tensors into {model}, {input_size}px, grid {encoder.grid_size}"
               f"{''.join(notes)}; tokens {norm} the final norm")
    return encoder, summary


def _fit_positions(state, encoder):
    """Resample absolute pos-embed and relative-bias tables to the encoder's grid, in place."""
    notes = []
    grid = encoder.grid_size
    if "pos_embed" in state and encoder.pos_embed is not None:
        prefix = encoder.num_prefix_tokens
        patches = state["pos_embed"].shape[1] - prefix
        side = math.isqrt(max(patches, 0))
        if side * side != patches:
            raise UserError(f"pos_embed holds {patches + prefix} tokens, not a square grid plus {prefix} prefix "
                            f"token(s) (toggle --no_cls_token to match the checkpoint)")
        if (side, side) != grid:
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid),
                                                        old_size=[side, side], num_prefix_tokens=prefix)
            notes.append(f", pos-embed resampled {side}x{side} -> {grid[0]}x{grid[1]}")
    expected = encoder.state_dict()
    for key in [k for k in state if k.endswith("relative_position_bias_table") and k in expected]:
        table, target = state[key], expected[key].shape
        if table.shape != target and table.shape[1] == target[1]:
            state[key] = resize_rel_pos_bias_table(table, new_window_size=grid, new_bias_shape=target)
            notes.append(f", {key} resized to grid {grid[0]}x{grid[1]}")
    return notes


def _torch_load(path):
    def not_a_checkpoint(err):
        # torch puts the cause ("invalid load key ...") on the last line, after a generic preamble
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        reason = f"{type(err).__name__}: {lines[-1][:120]}"
        return UserError(f"{path} is not a torch checkpoint ({reason}; pass a file written by torch.save)")
    with open(path, "rb") as f:
        head = f.read(1)
    if not (zipfile.is_zipfile(path) or head == b"\x80"):  # torch.save writes a zip archive (or a legacy pickle)
        raise UserError(f"{path} is not a torch checkpoint (it is neither a zip archive nor a pickle; "
                        "pass a file written by torch.save)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # MAE stores its args
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not (isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err)):
            raise not_a_checkpoint(err) from None
    # e.g. SimMIM stores its yacs config: the user named this file, so unpickle it like torch < 2.6 did
    print(f"note: {path} holds Python objects besides tensors; loading it with weights_only=False", flush=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise not_a_checkpoint(err) from None


def _read_checkpoint(path, checkpoint_key, simmim):
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a torch checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    if checkpoint_key in checkpoint and isinstance(checkpoint[checkpoint_key], dict):
        state, kind = checkpoint[checkpoint_key], f"'{checkpoint_key}' of"
    elif checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        state, kind = checkpoint, "state dict"
    else:
        raise UserError(f"{path} has no '{checkpoint_key}' entry; it holds: {_clip(sorted(map(str, checkpoint)), 10)} "
                        f"(set --checkpoint_key)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if simmim:
        state = _from_simmim(state)
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    return state, f"{'SimMIM' if simmim else 'MAE/timm'} {kind} {path}"


def _from_simmim(state):
    """SimMIM (BEiT-style) encoder keys -> ViTEncoder keys."""
    if any(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    out = {}
    for key, value in state.items():
        block_bias = re.fullmatch(r"blocks\.(\d+)\.attn\.relative_position_bias_table", key)
        if key.endswith(".gamma_1") or key.endswith(".gamma_2"):
            out[key[:-len("gamma_1")] + f"ls{key[-1]}.gamma"] = value
        elif key.endswith(".attn.q_bias"):
            v_bias = state[key.replace("q_bias", "v_bias")]
            # BEiT has no key bias: timm's fused qkv bias gets zeros in the middle
            out[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
        elif block_bias:
            out[f"block_rel_pos_bias.{block_bias[1]}.relative_position_bias_table"] = value
        elif not key.endswith((".attn.v_bias", "relative_position_index")):
            out[key] = value
    return out


def _timm_state_dict(name):
    if os.sep in name or name.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt")):
        raise UserError(f"checkpoint {name} does not exist (check the --finetune path)")
    if not timm.is_model(name):
        raise UserError(f"--finetune '{name}' is no file and an unknown timm model "
                        f"(check the path, or pick a name from timm.list_pretrained())")
    if not is_model_pretrained(name):
        raise UserError(f"timm model '{name}' has no pretrained weights (pick a name from timm.list_pretrained())")
    try:
        net = timm.create_model(name, pretrained=True, num_classes=0)
    except (OSError, RuntimeError, ValueError) as err:
        reason = str(err).split(". ")[0].splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(f"timm model '{name}' could not be downloaded: {reason} (connect to the internet, "
                        f"fill the Hugging Face cache, or pass a local checkpoint path)") from None
    attn = getattr(getattr(net, "blocks", [None])[0], "attn", None)
    plain = (isinstance(net, VisionTransformer) and type(net.blocks[0]) is Block and type(attn) is Attention
             and not net.no_embed_class and net.num_reg_tokens == 0 and isinstance(net.norm_pre, nn.Identity)
             and net.blocks[0].norm1.eps == LAYER_NORM_EPS)
    if not plain:
        raise UserError(f"timm model '{name}' is not a plain MAE-style ViT (use a vit_* model without registers)")
    spec = dict(patch_size=net.patch_embed.patch_size[0], embed_dim=net.embed_dim, depth=len(net.blocks),
                num_heads=attn.num_heads, mlp_ratio=net.blocks[0].mlp.fc1.out_features / net.embed_dim)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(DROPPED_PREFIXES)}
    return state, f"timm pretrained {name}", spec


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


def attention_probabilities(attn, x, attn_mask=None):
    """Softmax attention [B, H, T, T] (float32) that timm's Attention computes (fused or not) for input x."""
    B, T, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q).float(), attn.k_norm(k).float()
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask.float()
    return scores.softmax(dim=-1)


@contextmanager
def capture_attention(encoder, blocks=None):
    """Within the block, each forward fills `cap.records[i]` = {attn, resid_norm, attn_out_norm, out}.

    Forward hooks on timm's modules (registered only here) so the normal path keeps fused SDPA.
    """
    indices = sorted({encoder.block_index(b) for b in (range(encoder.depth) if blocks is None else blocks)})
    cap, pending = AttentionCapture(BlockRecords(encoder.depth)), {}

    def on_embed(module, args):  # a new forward starts: forget the previous one
        cap.records.clear()
        pending.clear()

    def on_attn(index, module, args, kwargs, output):
        pending[index] = {"attn": attention_probabilities(module, args[0], kwargs.get("attn_mask")).detach()}

    def on_layer_scale(index, module, args, output):
        pending[index]["attn_out_norm"] = output.detach().float().norm(dim=-1)

    def on_block(index, module, args, output):
        record = pending.pop(index)
        record["resid_norm"] = args[0].detach().float().norm(dim=-1)
        record["out"] = output.detach()
        cap.records[index] = record

    handles = [encoder.patch_embed.register_forward_pre_hook(on_embed)]
    for i in indices:
        block = encoder.blocks[i]
        handles += [block.attn.register_forward_hook(partial(on_attn, i), with_kwargs=True),
                    block.ls1.register_forward_hook(partial(on_layer_scale, i)),
                    block.register_forward_hook(partial(on_block, i))]
    try:
        yield cap
    finally:
        for handle in handles:
            handle.remove()
