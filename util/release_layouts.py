"""Which release wrote a checkpoint file, and where its encoder sits inside it.

Each official release saves its weights its own way (see LAYOUTS). `find_encoder` recognises the layout from
the file's entries and key names alone, takes the sub-model that release evaluates (or the one asked for by
name) and returns its keys with the wrappers around them (`module.`, `backbone.`, `encoder.`, ...) stripped.
Turning release key names into timm's (DINOv2 registers and SwiGLU, `gamma_N` layer scale, relative position
tables, position-embedding resampling) is timm's own `checkpoint_filter_fn`, called by models_vit; the only
hand-written key mapping here is DINOv2's chunked blocks, which timm's converter does not handle.

Library code: problems are ValueErrors whose messages name the file and what it holds.
"""
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

PATCH_KEY = "patch_embed.proj.weight"


@dataclass(frozen=True)
class SubModel:
    entry: Optional[str]   # top-level entry of the file; None: the file itself is the state dict
    prefix: Optional[str]  # the encoder's key prefix inside the entry after `module.` is gone; None: found from keys


@dataclass(frozen=True)
class Layout:
    name: str
    recognised_by: str                # how `matches` tells it apart, for the README and summaries
    sub_models: dict                  # name -> SubModel; the first is probed by default
    matches: Callable[[dict], bool]


@dataclass
class Encoder:
    """The encoder found in a file: its state dict (release key names) and where it came from."""
    state: dict
    layout: str
    sub_model: str
    description: str  # e.g. "MoCo v3 checkpoint x.pth, sub-model 'base_encoder' (module.base_encoder.*)"


def _entry(checkpoint, key):
    value = checkpoint.get(key)
    return value if isinstance(value, dict) else {}


def beit_style(keys):
    return any(k.endswith((".attn.q_bias", "relative_position_bias_table")) for k in keys)


def _is_bare(checkpoint):
    return bool(checkpoint) and all(torch.is_tensor(v) for v in checkpoint.values()) and any(
        "patch_embed." in k for k in checkpoint)


def _is_dinov2(checkpoint):
    return _is_bare(checkpoint) and ("register_tokens" in checkpoint or (
        "mask_token" in checkpoint and any(k.endswith(".ls1.gamma") for k in checkpoint)))


# First match wins: the more specific layouts come first.
LAYOUTS = [
    Layout("MoCo v3", "'state_dict' holding module.base_encoder.* (+ momentum_encoder, predictor)",
           {"base_encoder": SubModel("state_dict", "base_encoder."),
            "momentum_encoder": SubModel("state_dict", "momentum_encoder.")},
           lambda c: any(k.startswith("module.base_encoder.") for k in _entry(c, "state_dict"))),
    Layout("I-JEPA", "'target_encoder', 'encoder' (and 'predictor') entries of module.* keys",
           {"target_encoder": SubModel("target_encoder", ""), "encoder": SubModel("encoder", "")},
           lambda c: bool(_entry(c, "target_encoder"))),
    Layout("DINO/iBOT/DINOv2 training", "'teacher' (backbone.* + head) and 'student' (module.backbone.*) entries",
           {"teacher": SubModel("teacher", None), "student": SubModel("student", None)},  # backbone.*, or bare
           lambda c: bool(_entry(c, "teacher"))),
    Layout("DINOv2 training (fvcore)", "'model' holding teacher.backbone.* and student.backbone.* keys",
           {"teacher": SubModel("model", "teacher.backbone."), "student": SubModel("model", "student.backbone.")},
           lambda c: any(k.startswith("teacher.backbone.") for k in _entry(c, "model"))),
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
    base_encoder/momentum_encoder) or any top-level entry of the file.
    """
    layout = detect(checkpoint)
    if checkpoint_key:
        name, sub = checkpoint_key, (layout.sub_models.get(checkpoint_key) if layout else None)
        if sub is None:
            if checkpoint_key not in checkpoint:
                raise ValueError(f"{path} has no '{checkpoint_key}' entry; it holds: {holdings(checkpoint)}")
            sub = SubModel(checkpoint_key, None)
        if sub.entry is not None and sub.entry not in checkpoint:
            raise ValueError(f"{path} has no '{sub.entry}' entry; it holds: {holdings(checkpoint)}")
    elif layout is None:
        raise ValueError(f"{path} holds no encoder of a known release layout; it holds: {holdings(checkpoint)}")
    else:
        name, sub = next(iter(layout.sub_models.items()))
    entry = checkpoint if sub.entry is None else checkpoint[sub.entry]
    if not isinstance(entry, dict) or not entry:
        raise ValueError(f"'{sub.entry}' of {path} holds {describe(entry)}, not a state dict; the file holds: "
                         f"{holdings(checkpoint)}")
    state, prefix = _strip_wrappers(entry, sub.prefix, f"'{sub.entry}' of {path}" if sub.entry else str(path))
    layout_name = layout.name if layout else "unrecognised"
    where = f"entry '{sub.entry}'" if sub.entry else "the whole file"
    return Encoder(state, layout_name, name, f"{layout_name} checkpoint {path}, sub-model '{name}' ({where}"
                                             f"{f', keys {prefix}*' if prefix else ''})")


def _strip_wrappers(entry, prefix, where):
    """Keys of the encoder under `prefix` (DDP's `module.` removed first), prefix removed; (state, prefix)."""
    state = {k.removeprefix("module."): v for k, v in entry.items()}
    if prefix is None:  # unknown wrapper: the encoder is where the patch embedding is
        found = sorted({k[:-len(PATCH_KEY)] for k in state if k.endswith(PATCH_KEY)})
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
