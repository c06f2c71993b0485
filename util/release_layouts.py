"""Which release wrote a checkpoint file, and where its encoder sits inside it.

Each official release saves its weights its own way (see LAYOUTS). `find_encoder` recognises the layout from
the file's entries and key names alone, takes the sub-model that release evaluates (or the one asked for by
name) and returns its keys with the wrappers around them (`module.`, `backbone.`, `encoder.`, ...) stripped.
Turning release key names into timm's (DINOv2 registers and SwiGLU, `gamma_N` layer scale, relative position
tables, position-embedding resampling) is timm's own `checkpoint_filter_fn`, called by models_vit; the only
hand-written key mapping here is DINOv2's chunked blocks, which timm's converter does not handle.

Library code: problems are ValueErrors whose messages name the file and what it holds.
"""
import pickletools
import re
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

PATCH_KEY = "patch_embed.proj.weight"


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
    recognised_by: str                # how `matches` tells it apart, for the README and summaries
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


def beit_style(keys):
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
    Layout("MoCo v3", "'state_dict' holding base_encoder.* (+ momentum_encoder, predictor), with or without DDP's "
           "module.", {"base_encoder": SubModel("state_dict", "base_encoder."),
                       "momentum_encoder": SubModel("state_dict", "momentum_encoder.")}, _is_mocov3),
    Layout("I-JEPA", "'target_encoder', 'encoder' (and 'predictor') entries of module.* keys",
           {"target_encoder": SubModel("target_encoder", ""), "encoder": SubModel("encoder", "")},
           lambda c: bool(_entry(c, "target_encoder"))),
    Layout("DINO/iBOT/DINOv2 training", "'teacher' (backbone.* + head) and 'student' (module.backbone.*) entries "
           "(also Franca's released files, DINOv2's code)",
           {"teacher": SubModel("teacher", None), "student": SubModel("student", None)},  # backbone.*, or bare
           lambda c: bool(_entry(c, "teacher"))),
    Layout("DINOv2 training (fvcore)", "'model' holding teacher.backbone.* and student.backbone.* keys",
           {"teacher": SubModel("model", "teacher.backbone."), "student": SubModel("model", "student.backbone.")},
           lambda c: any(k.startswith("teacher.backbone.") for k in _entry(c, "model"))),
    Layout("CAPI", "bare state dict of backbone.encoder.blocks.*.residual1.fn.* (+ backbone.decoder, head)",
           {"backbone": SubModel(None, "backbone.")}, _is_capi, family="capi"),
    Layout("EVA02", "'model' or 'module' (DeepSpeed) holding rope.freqs_cos buffers (+ lm_head, mask_token)",
           {"model": SubModel("model", ""), "module": SubModel("module", "")}, _is_eva02, family="eva"),
    Layout("PE (Perception Encoder)", "conv1, positional_embedding and transformer.resblocks.*.attn.in_proj_* keys "
           "(visual.* in a CLIP file), bare or in 'state_dict'/'weights'/'model'",
           {"visual": SubModel(PE_ENTRIES, None)}, _is_pe, family="eva", patch_key="conv1.weight"),
    Layout("DINOv3", "bare state dict with storage_tokens and rope_embed.periods",
           {"state dict": SubModel(None, "")}, _is_dinov3, family="eva"),
    Layout("SimMIM", "'model' holding encoder.* keys (+ decoder.*)", {"model": SubModel("model", "encoder.")},
           lambda c: any(k.startswith(("encoder.", "module.encoder.")) for k in _entry(c, "model"))),
    Layout("BEiT/BEiT-v2", "'model' holding q_bias/v_bias or relative_position_bias_table keys",
           {"model": SubModel("model", "")}, lambda c: beit_style(_entry(c, "model"))),
    Layout("MAE", "'model' holding the encoder at its root (decoder_*, mask_token dropped)",
           {"model": SubModel("model", "")}, lambda c: bool(_entry(c, "model"))),
    Layout("state_dict entry", "'state_dict' holding one encoder (e.g. iBOT's released backbones)",
           {"state_dict": SubModel("state_dict", None)}, lambda c: bool(_entry(c, "state_dict"))),
    Layout("DINOv2", "bare state dict with mask_token and ls1/ls2 layer scale, or register_tokens",
           {"state dict": SubModel(None, "")}, _is_dinov2),
    Layout("bare state dict", "tensors at the top level (timm, DINO/iBOT released backbones, BEiT)",
           {"state dict": SubModel(None, "")}, _is_bare),
]


def detect(checkpoint):
    """The first Layout whose test matches the loaded file (a dict), or None."""
    return next((layout for layout in LAYOUTS if layout.matches(checkpoint)), None)


def describe(value):
    """A few words on what a checkpoint entry holds, for messages."""
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict of {len(value)} entries"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def holdings(checkpoint, limit=10):
    """'model (a dict of 3 entries), epoch (an int)' for the first `limit` entries of a file."""
    items = [f"{k} ({describe(v)})" for k, v in list(checkpoint.items())[:limit]]
    more = len(checkpoint) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def find_encoder(checkpoint, path, checkpoint_key=None):
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


def classify_unreadable(path):
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
