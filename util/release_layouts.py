"""Which release wrote a checkpoint file, and where its encoder sits inside it.

Each official release saves its weights its own way (see LAYOUTS). `find_encoder` recognises the layout from
the file's entries and key names alone, takes the sub-model that release evaluates (or the one asked for by
name) and returns its keys with the wrappers around them (`module.`, `backbone.`, `encoder.`, ...) stripped.
`load_state` turns release key names into timm's (DINOv2 registers and SwiGLU, `gamma_N` layer scale, relative
position tables, position-embedding resampling) with timm's own `checkpoint_filter_fn` and loads them into an
encoder of models_vit (told apart by its `family`, so this module needs none of models_vit); hand-written are only
what timm's converters do not handle: DINOv2's chunked blocks, DINO's position resampling, CAPI's and DINOv3's
keys. This is the one place that converts a foreign checkpoint.

Library code: problems are ValueErrors whose messages name the file and what it holds.
"""
import math
import os
import pickletools
import re
import zipfile
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models import beit as timm_beit
from timm.models import eva as timm_eva
from timm.models import hiera as timm_hiera
from timm.models import naflexvit as timm_naflexvit
from timm.models import vision_transformer as timm_vit
from torch import nn

from util.checkpoint import UnsafeCheckpoint, load_checkpoint

PATCH_KEY = "patch_embed.proj.weight"


class NonFiniteWeights(ValueError):
    """The checkpoint holds NaN or inf weights (a diverged run); nothing useful can be probed from it."""


class NoFinalNorm(ValueError):
    """--final_norm was asked of an encoder whose tokens have no final norm."""


class NoPretrainedWeights(ValueError):
    """A timm name or tag that timm holds no weights for."""


class NotAStateDict(ValueError):
    """The file unpickles to something other than a dict (a list, a tensor, a numpy array)."""


class TruncatedCheckpoint(ValueError):
    """The file ends before its own end: a copy or download that stopped early."""


class MissingKeys(ValueError):
    """Keys that the architecture (preset) or the release layout requires are absent from the checkpoint."""


@dataclass(frozen=True)
class SubModel:
    entry: Union[None, str, tuple]  # top-level entry of the file (a tuple: the first present); None: the file itself
    prefix: Optional[str]  # the encoder's key prefix inside the entry after `module.` is gone; None: found from keys


@dataclass(frozen=True)
class Layout:
    name: str
    sub_models: dict                  # name -> SubModel; the first whose entry the file holds is the default
    matches: Callable[[dict], bool]
    family: Optional[str] = None      # the encoder family it needs ('eva', 'capi'); None: ViT or BEiT by its keys
    patch_key: str = PATCH_KEY        # the patch embedding's key, which locates an encoder of unknown prefix


@dataclass
class Encoder:
    """The encoder found in a file: its state dict (release key names) and where it came from."""
    state: dict
    layout: str
    sub_model: str
    description: str  # e.g. "MoCo v3 checkpoint x.pth, sub-model 'base_encoder' (module.base_encoder.*)"
    family: Optional[str] = None
    others: tuple = ()  # other layouts the file also holds, for the summary


def _entry(checkpoint, key):
    value = checkpoint.get(key)
    return value if isinstance(value, dict) else {}


def _keys(checkpoint, *entries):
    """Keys of the first of `entries` the file holds as a dict (None: the file itself), `module.` removed."""
    for entry in entries:
        holder = (checkpoint if all(torch.is_tensor(v) for v in checkpoint.values()) else {}) if entry is None \
            else _entry(checkpoint, entry)
        if holder:
            return [k.removeprefix("module.") for k in holder]
    return []


def beit_style(keys: Iterable[str]) -> bool:
    return any(k.endswith((".attn.q_bias", "relative_position_bias_table")) for k in keys)


def _is_bare(checkpoint):
    return bool(checkpoint) and all(torch.is_tensor(v) for v in checkpoint.values()) and any(
        "patch_embed." in k for k in checkpoint)


def _is_dinov2(checkpoint):
    return _is_bare(checkpoint) and ("register_tokens" in checkpoint or (
        "mask_token" in checkpoint and any(k.endswith(".ls1.gamma") for k in checkpoint)))


def _is_dinov3(checkpoint):
    return _is_bare(checkpoint) and ("storage_tokens" in checkpoint or "rope_embed.periods" in checkpoint)


def _is_eva02(checkpoint):
    return any(k.endswith("rope.freqs_cos") for k in _keys(checkpoint, "model", "module"))


PE_ENTRIES = (None, "state_dict", "weights", "model")


def _is_pe(checkpoint):
    keys = set(_keys(checkpoint, *PE_ENTRIES))
    return any(f"{p}conv1.weight" in keys and f"{p}transformer.resblocks.0.attn.in_proj_weight" in keys
               for p in ("", "visual."))


def _is_capi(checkpoint):
    return any(k.startswith("backbone.encoder.blocks.") and ".residual1.fn." in k for k in _keys(checkpoint, None))


def _is_mocov3(checkpoint):
    return any(k.startswith("base_encoder.") for k in _keys(checkpoint, "state_dict"))


# First match wins: the more specific layouts come first.
LAYOUTS = [
    # 'state_dict' holding base_encoder.* (+ momentum_encoder, predictor), with or without DDP's module.
    Layout("MoCo v3", {"base_encoder": SubModel("state_dict", "base_encoder."),
                       "momentum_encoder": SubModel("state_dict", "momentum_encoder.")}, _is_mocov3),
    # 'target_encoder', 'encoder' (and 'predictor') entries of module.* keys
    Layout("I-JEPA", {"target_encoder": SubModel("target_encoder", ""), "encoder": SubModel("encoder", "")},
           lambda c: bool(_entry(c, "target_encoder"))),
    # 'teacher' (backbone.* + head) and 'student' (module.backbone.*) entries (also Franca's released files,
    # DINOv2's code)
    Layout("DINO/iBOT/DINOv2 training",
           {"teacher": SubModel("teacher", None), "student": SubModel("student", None)},  # backbone.*, or bare
           lambda c: bool(_entry(c, "teacher"))),
    # 'model' holding teacher.backbone.* and student.backbone.* keys
    Layout("DINOv2 training (fvcore)",
           {"teacher": SubModel("model", "teacher.backbone."), "student": SubModel("model", "student.backbone.")},
           lambda c: any(k.startswith("teacher.backbone.") for k in _entry(c, "model"))),
    # bare state dict of backbone.encoder.blocks.*.residual1.fn.* (+ backbone.decoder, head)
    Layout("CAPI", {"backbone": SubModel(None, "backbone.")}, _is_capi, family="capi"),
    # 'model' or 'module' (DeepSpeed) holding rope.freqs_cos buffers (+ lm_head, mask_token)
    Layout("EVA02", {"model": SubModel("model", ""), "module": SubModel("module", "")}, _is_eva02, family="eva"),
    # conv1, positional_embedding and transformer.resblocks.*.attn.in_proj_* keys (visual.* in a CLIP file), bare
    # or in 'state_dict'/'weights'/'model'
    Layout("PE (Perception Encoder)", {"visual": SubModel(PE_ENTRIES, None)}, _is_pe, family="eva",
           patch_key="conv1.weight"),
    # bare state dict with storage_tokens and rope_embed.periods
    Layout("DINOv3", {"state dict": SubModel(None, "")}, _is_dinov3, family="eva"),
    # 'model' holding encoder.* keys (+ decoder.*)
    Layout("SimMIM", {"model": SubModel("model", "encoder.")},
           lambda c: any(k.startswith(("encoder.", "module.encoder.")) for k in _entry(c, "model"))),
    # 'model' holding q_bias/v_bias or relative_position_bias_table keys
    Layout("BEiT/BEiT-v2", {"model": SubModel("model", "")}, lambda c: beit_style(_entry(c, "model"))),
    # 'model' holding the encoder at its root (decoder_*, mask_token dropped)
    Layout("MAE", {"model": SubModel("model", "")}, lambda c: bool(_entry(c, "model"))),
    # 'state_dict' holding one encoder (e.g. iBOT's released backbones)
    Layout("state_dict entry", {"state_dict": SubModel("state_dict", None)},
           lambda c: bool(_entry(c, "state_dict"))),
    # bare state dict with mask_token and ls1/ls2 layer scale, or register_tokens
    Layout("DINOv2", {"state dict": SubModel(None, "")}, _is_dinov2),
    # tensors at the top level (timm, DINO/iBOT released backbones, BEiT)
    Layout("bare state dict", {"state dict": SubModel(None, "")}, _is_bare),
]


def detect(checkpoint: dict) -> Optional[Layout]:
    """The first Layout whose test matches the loaded file (a dict), or None."""
    return next((layout for layout in LAYOUTS if layout.matches(checkpoint)), None)


def describe(value: object) -> str:
    """A few words on what a checkpoint entry holds, for messages."""
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict of {len(value)} entries"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def holdings(checkpoint: dict, limit: int = 10) -> str:
    """'model (a dict of 3 entries), epoch (an int)' for the first `limit` entries of a file."""
    items = [f"{k} ({describe(v)})" for k, v in list(checkpoint.items())[:limit]]
    more = len(checkpoint) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def find_encoder(checkpoint: dict, path: Union[str, os.PathLike], checkpoint_key: Optional[str] = None) -> Encoder:
    """The encoder state dict inside a loaded checkpoint file: the layout's default sub-model, or `checkpoint_key`.

    `checkpoint_key` names a sub-model of the detected layout (teacher/student, target_encoder/encoder,
    base_encoder/momentum_encoder) or any top-level entry of the file (read in the layout that entry has alone).
    The description says which layout and sub-model were taken, and which other encoders the file holds.
    """
    layout = detect(checkpoint)
    if checkpoint_key:
        layout, name, sub = _named_sub_model(checkpoint, layout, checkpoint_key, path)
    elif layout is None:
        raise ValueError(f"{path} holds no encoder of a known release layout; it holds: {holdings(checkpoint)}")
    else:
        name, sub = next(((n, s) for n, s in layout.sub_models.items()
                          if _resolve(checkpoint, s.entry)[1] is not None), next(iter(layout.sub_models.items())))
    entry_name, entry = _resolve(checkpoint, sub.entry)
    if not isinstance(entry, dict) or not entry:
        raise ValueError(f"'{entry_name}' of {path} holds {describe(entry)}, not a state dict; the file holds: "
                         f"{holdings(checkpoint)}")
    where = f"'{entry_name}' of {path}" if entry_name else str(path)
    patch_key = layout.patch_key if layout else PATCH_KEY
    state, prefix = _strip_wrappers(entry, sub.prefix, where, patch_key)
    layout_name = layout.name if layout else "unrecognised"
    others = _other_encoders(checkpoint, entry_name) if entry_name is not None else ()
    also = "".join(f"; the file also holds a {other} encoder in '{key}' (--checkpoint_key {key} reads it)"
                   for key, other in others)
    at = f"entry '{entry_name}'" if entry_name else "the whole file"
    return Encoder(state, layout_name, name, f"{layout_name} checkpoint {path}, sub-model '{name}' ({at}"
                                             f"{f', keys {prefix}*' if prefix else ''}){also}",
                   family=layout.family if layout else None, others=tuple(others))


def _resolve(checkpoint, entry):
    """(entry name, what it holds) for a SubModel's entry: one name, or the first of a tuple of candidates that
    the file holds (None: the file itself, when its values are tensors); (first name, None) if none is there."""
    candidates = entry if isinstance(entry, tuple) else (entry,)
    for name in candidates:
        if name is None and all(torch.is_tensor(v) for v in checkpoint.values()):
            return None, checkpoint
        if name is not None and name in checkpoint:
            return name, checkpoint[name]
    return candidates[0], None


def _named_sub_model(checkpoint, layout, key, path):
    """(layout, name, SubModel) for --checkpoint_key: a sub-model of the file's layout, or an entry of the file
    read in the layout it has on its own (an MAE 'model' next to a MoCo v3 'state_dict')."""
    if layout is not None and key in layout.sub_models:
        sub = layout.sub_models[key]
        if isinstance(sub.entry, str) and sub.entry not in checkpoint:
            raise ValueError(f"{path} has no '{sub.entry}' entry; it holds: {holdings(checkpoint)}")
        return layout, key, sub
    if key not in checkpoint:
        raise ValueError(f"{path} has no '{key}' entry; it holds: {holdings(checkpoint)}")
    alone = detect({key: checkpoint[key]})
    for name, sub in (alone.sub_models.items() if alone else ()):
        if sub.entry == key:
            return alone, name, sub
    return None, key, SubModel(key, None)


def _other_encoders(checkpoint, taken):
    """[(entry, layout name)] of the other top-level entries that hold an encoder on their own."""
    found = []
    for key, value in checkpoint.items():
        if key != taken and isinstance(value, dict) and value:
            alone = detect({key: value})
            if alone is not None and any(s.entry == key for s in alone.sub_models.values()):
                found.append((key, alone.name))
    return found


def _strip_wrappers(entry, prefix, where, patch_key=PATCH_KEY):
    """Keys of the encoder under `prefix` (DDP's `module.` removed first), prefix removed; (state, prefix)."""
    state = {k.removeprefix("module."): v for k, v in entry.items()}
    if prefix is None:  # unknown wrapper: the encoder is where the patch embedding is
        found = sorted({k[:-len(patch_key)] for k in state if k.endswith(patch_key)})
        if len(found) > 1:
            raise ValueError(f"{where} holds several encoders (prefixes {', '.join(found)}); name one sub-model")
        prefix = found[0] if found else ""
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{where} holds no keys under {prefix}* (its keys start: "
                         f"{', '.join(sorted(entry)[:5])})")
    return _unchunk_blocks(state), prefix


def _unchunk_blocks(state):
    """DINOv2's FSDP training nests blocks in chunks, `blocks.<chunk>.<i>.`; the chunks pad with Identity
    modules, so <i> already is the global block index. timm's converter only knows the flat hub layout."""
    chunked = re.compile(r"^blocks\.\d+\.(\d+)\.")
    if not any(chunked.match(k) for k in state):
        return state
    return {chunked.sub(r"blocks.\1.", k): v for k, v in state.items()}


def classify_unreadable(path: Union[str, os.PathLike]) -> Optional[ValueError]:
    """A file load_checkpoint refused, looked at without unpickling it: TruncatedCheckpoint or NotAStateDict
    (with what it holds), or None. torch.save writes a zip archive whose directory is at its very end."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return TruncatedCheckpoint(f"{path} is a truncated torch checkpoint: a zip archive whose end (its "
                                   "directory) is missing")
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        pickled = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickled:
            return None
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(archive.read(pickled[0]))][1:2]
    if not ops or ops[0][0] in ("EMPTY_DICT", "MARK"):
        return None
    kind = {"EMPTY_LIST": "a list", "EMPTY_TUPLE": "a tuple"}.get(ops[0][0])
    if ops[0][0] == "GLOBAL":
        kind = "a tensor" if ops[0][1].startswith("torch.") else \
            "a numpy array" if ops[0][1].startswith("numpy") else f"an object ({ops[0][1].replace(' ', '.')})"
    return NotAStateDict(f"{path} holds {kind or 'no dict'}, not a dict of tensors or of state dicts")


# ---------------------------------------------------------------- converting an encoder's keys to timm's

# Parts of a release's model that are not its encoder (decoders, projection/prediction heads, mask tokens).
NOT_ENCODER = ("decoder", "mask_token", "head.", "fc_norm.", "lm_head.", "cls_pt_", "masked_embed", "pre_logits.",
               "attn_pool.")


PATCH_KEYS = ("patch_embed.proj.weight", "conv1.weight", "patch_embed.weight", "embeds.proj.weight")


CLS_KEYS = ("cls_token", "class_embedding")


REGISTER_KEYS = ("register_tokens", "reg_token", "storage_tokens", "registers")


def read_checkpoint(path: Union[str, os.PathLike], trust: bool = False) -> dict:
    """load_checkpoint, with a truncated file or a pickled list/tensor/array named for what it is."""
    try:
        return load_checkpoint(path, trust=trust)
    except UnsafeCheckpoint:
        raise  # what it asked to run is the news, whatever else the file holds
    except ValueError as err:
        better = classify_unreadable(path) if os.path.isfile(path) else None
        if better is None:
            raise
        raise better from err


def block_indices(state: dict) -> list:
    """The block indices a checkpoint holds (a depth that differs from the model's is a misfit, named later)."""
    return sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()})


def require_keys(found: Encoder, model: str, keys: Iterable[str]) -> None:
    """MissingKeys naming the keys of `keys` that the checkpoint lacks."""
    missing = [k for k in keys if " or " in k or k not in found.state]
    if missing:
        raise MissingKeys(
            f"{found.description} lacks keys the {model} preset requires: {_clip(missing)} (the preset is a ViT "
            "with a learned position embedding and qkv biases, as every release it reads; a checkpoint without "
            "them is another architecture)")


def no_embed_class(state: dict, prefix: int) -> bool:
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


def load_state(encoder: nn.Module, found: Encoder, model: str) -> str:
    """Convert the release's keys with timm's converter and load them strictly; returns summary notes."""
    state, source = found.state, found.description
    expected = encoder.state_dict()
    misfit = partial(_misfit, source=source, model=model, original=state)
    if _core_mismatch(state, encoder):  # caught before timm's converter would resample a wrong patch size
        raise misfit(state, expected)
    if found.layout == "DINOv3" and encoder.family in ("eva", "capi"):
        state = _dinov3_state(state, encoder, source)
    try:
        converted = _to_timm(state, encoder, found)
    except (RuntimeError, ValueError, AssertionError, KeyError):  # e.g. a position embedding of no square grid
        raise misfit(state, expected) from None
    converted = {k: v for k, v in converted.items() if not k.startswith(NOT_ENCODER)}
    if "norm.weight" not in converted and "norm.weight" in expected:  # SimMIM/BEiT with mean pooling: no norm
        if encoder.final_norm:
            raise NoFinalNorm(f"{source} has no final norm (norm.weight) to apply")
        encoder.norm = nn.Identity()
        expected = encoder.state_dict()
    if _problems(converted, expected):
        raise misfit(converted, expected)
    check_finite(converted, source)
    encoder.load_state_dict(converted, strict=True)
    if "rope_embed.periods" in state:  # DINOv3: see _dinov3_state
        encoder.rope.periods.copy_(state["rope_embed.periods"].float())
        if encoder.rope.feat_shape is not None:
            encoder.rope._cache_embed(encoder.rope.feat_shape)  # the cached grid embedding, from those periods
    return _resize_notes(state, converted, encoder)


def _to_timm(state, encoder, found):
    state = dict(state)  # timm's converters pop entries
    if encoder.family == "capi":
        return _capi_state(state, encoder)
    if encoder.family == "eva":
        # MIM leftovers go first: with EVA02's mask_token present timm would move the final norm to fc_norm
        state = {k: v for k, v in state.items() if not k.startswith(NOT_ENCODER)}
        converted = timm_eva.checkpoint_filter_fn(state, encoder)
        pos = converted.get("pos_embed")
        if found.layout.startswith("PE") and pos is not None and pos.shape != encoder.pos_embed.shape:
            # timm's PE converter keeps the pretraining grid; PE resamples bilinearly without antialiasing
            # (pe.py _sample_abs_posemb), which timm's resampler does when told so
            converted["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=encoder.grid_size, num_prefix_tokens=encoder.num_prefix_tokens,
                interpolation="bilinear", antialias=False)
        return converted
    if encoder.family == "hiera":
        return timm_hiera.checkpoint_filter_fn(state, encoder)
    if encoder.family == "naflex":
        return timm_naflexvit.checkpoint_filter_fn(state, encoder)
    if encoder.family == "beit":
        return timm_beit.checkpoint_filter_fn(state, encoder)
    if found.layout in DINO_CODE and "pos_embed" in state:
        state["pos_embed"] = _dino_resample(state["pos_embed"], encoder.grid_size)
    return timm_vit.checkpoint_filter_fn(state, encoder, adapt_layer_scale=True)  # gamma_N -> lsN.gamma (iBOT)


# Layouts written by DINO's code (DINO, iBOT, DINOv2, Franca), which resample their position table themselves.
DINO_CODE = ("DINO/iBOT/DINOv2 training", "DINOv2 training (fvcore)", "DINOv2")


def _dino_resample(pos_embed, grid):
    """[cls] + patch table resampled as DINO/iBOT/DINOv2's `interpolate_pos_encoding` does at every forward:
    bicubic, no antialiasing, scale factor (n + 0.1) / M. Hand-written because timm's resampler takes an output
    size (not DINO's offset scale factor) and antialiases when shrinking: DINOv2's 37x37 table at 224 px would
    differ by several percent of its spread."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1] or (side, side) == tuple(grid):
        return pos_embed
    table = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    table = F.interpolate(table, scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side), mode="bicubic",
                          antialias=False)
    return torch.cat([cls, table.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)], dim=1)


def _dinov3_state(state, encoder, source):
    """DINOv3 release keys before timm's converter. timm's `*_dinov3` names without `_qkvb` have no qkv bias (the
    released biases are zero); its converter would drop non-zero ones silently, so they are refused here. The
    release's rope periods are read from the file after loading: its own forward uses the stored (bf16-rounded)
    periods, while timm recomputes exact ones."""
    biases = [k for k in state if k.endswith("attn.qkv.bias")]
    if biases and encoder.blocks[0].attn.q_bias is None:
        masked = [state[k] * state.get(k.replace(".bias", ".bias_mask"), torch.ones_like(state[k])) for k in biases]
        if any(b.abs().max() > 0 for b in masked):
            raise ValueError(f"{source} holds non-zero qkv biases, which this timm architecture has no place for "
                             "(use the `_qkvb` variant of the --model name)")
        state = {k: v for k, v in state.items() if k not in biases}
    return state


def _capi_state(state, encoder):
    """CAPI's encoder keys (model.py: encoder.blocks.N.residual1/2 with norm and fn) as timm Eva keys; biases
    CAPI's code does not have are zero; per-block rope frequencies gathered into `rope_freqs`. Keys left over
    (other than the decoder and the clustering head) make the load fail as unexpected keys."""
    renames = [(r"^patch_embed\.(weight|bias)$", r"patch_embed.proj.\1"), (r"^registers$", "reg_token"),
               (r"^encoder\.blocks\.(\d+)\.residual1\.norm\.", r"blocks.\1.norm1."),
               (r"^encoder\.blocks\.(\d+)\.residual1\.fn\.(q_proj|k_proj|v_proj|proj)\.", r"blocks.\1.attn.\2."),
               (r"^encoder\.blocks\.(\d+)\.residual2\.norm\.", r"blocks.\1.norm2."),
               (r"^encoder\.blocks\.(\d+)\.residual2\.fn\.(fc1|fc2)\.", r"blocks.\1.mlp.\2.")]
    out, freqs = {}, {}
    for key, value in state.items():
        if key.startswith(("decoder.", "mask_token", "dec_norm.")):
            continue
        rope = re.match(r"^encoder\.blocks\.(\d+)\.residual1\.fn\.rope\.freqs$", key)
        if rope:
            freqs[int(rope.group(1))] = value
            continue
        for pattern, target in renames:
            if re.match(pattern, key):
                key = re.sub(pattern, target, key)
                break
        out[key] = value
    if sorted(freqs) != list(range(encoder.depth)):
        raise KeyError("rope frequencies")
    out["rope_freqs"] = torch.stack([freqs[i] for i in range(encoder.depth)])
    zero_biases = [f"blocks.{i}.{m}.bias" for i in range(encoder.depth) for m in ("attn.proj", "mlp.fc1", "mlp.fc2")]
    expected = encoder.state_dict()
    out.update({k: torch.zeros_like(expected[k]) for k in zero_biases if k not in out})
    return out


def _core_mismatch(state, encoder):
    patch = next((state[k] for k in PATCH_KEYS if k in state), None)
    own = encoder.embeds.proj.weight if encoder.family == "naflex" else encoder.patch_embed.proj.weight
    registers = next((state[k] for k in REGISTER_KEYS if k in state), None)
    return (patch is None or patch.shape != own.shape
            or any(k in state for k in CLS_KEYS) != bool(encoder.has_class_token)
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


def _guess(state):
    """What the checkpoint looks like, for error messages."""
    patch = next((state[k] for k in PATCH_KEYS if k in state), None)
    blocks = re.compile(r"^(?:encoder\.)?(?:blocks|transformer\.resblocks)\.(\d+)\.")
    depth = len({m.group(1) for m in map(blocks.match, state) if m})
    words = [f"embed_dim {patch.shape[0]}, patch {patch.shape[-1]}" if patch is not None else "no patch embedding",
             f"depth {depth}", "[cls]" if any(k in state for k in CLS_KEYS) else "no [cls]"]
    registers = next((state[k] for k in REGISTER_KEYS if k in state), None)
    if registers is not None:
        words.append(f"{registers.shape[1]} registers")
    if beit_style(state):
        words.append("BEiT-style attention")
    grid = _pos_grid(state)
    if grid:
        words.append(f"position grid {grid}x{grid}")
    return ", ".join(words)


def check_finite(state: dict, source: str) -> None:
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
