"""Independent references for tests/test_models_vit.py: random weights under each release's own key names, saved
the way that release saves them, and each release's forward written out in plain torch from its official
definition (facebookresearch/dino and mae, bytedance/ibot, facebookresearch/moco-v3 vits.py, facebookresearch/
ijepa src/models/vision_transformer.py, facebookresearch/dinov2 models/vision_transformer.py + layers,
microsoft/SimMIM and unilm beit2). Nothing here imports timm's model code or models_vit.

All releases share the pre-norm block  x += g1 * attn(LN1(x));  x += g2 * mlp(LN2(x))  with LayerNorm eps 1e-6
and GELU; they differ in the tokens the blocks see ([cls], registers, position embedding), the attention biases
(BEiT: q and v bias only, relative position bias) and the name of the layer scale (ls1.gamma, gamma_1).
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-6


class Weights:
    """Random tensors with non-trivial norms and biases, so a swapped or dropped key changes the output."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, scale=0.1, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=self.generator)


# ------------------------------------------------------------------------------------------ state dicts

def block_weights(w, dim, depth, *, layer_scale=None, beit=False, mlp_ratio=4):
    """blocks.i.* of the shared pre-norm block; layer_scale: None, 'ls' (DINOv2) or 'gamma' (iBOT, BEiT)."""
    sd = {}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": w(dim, offset=1.0), b + "norm1.bias": w(dim),
                   b + "attn.qkv.weight": w(3 * dim, dim), b + "attn.proj.weight": w(dim, dim),
                   b + "attn.proj.bias": w(dim), b + "norm2.weight": w(dim, offset=1.0), b + "norm2.bias": w(dim),
                   b + "mlp.fc1.weight": w(mlp_ratio * dim, dim), b + "mlp.fc1.bias": w(mlp_ratio * dim),
                   b + "mlp.fc2.weight": w(dim, mlp_ratio * dim), b + "mlp.fc2.bias": w(dim)})
        if beit:
            sd.update({b + "attn.q_bias": w(dim), b + "attn.v_bias": w(dim)})
        else:
            sd[b + "attn.qkv.bias"] = w(3 * dim)
        if layer_scale == "ls":
            sd.update({b + "ls1.gamma": w(dim, scale=0.5), b + "ls2.gamma": w(dim, scale=0.5)})
        elif layer_scale == "gamma":
            sd.update({b + "gamma_1": w(dim, scale=0.5), b + "gamma_2": w(dim, scale=0.5)})
    return sd


def vit_state(seed=0, *, dim=64, depth=2, patch=8, grid=4, cls=True, registers=0, layer_scale=None,
              pos="learned"):
    """Encoder weights under the DINO/iBOT/MAE/MoCo v3/I-JEPA/DINOv2 key names.

    pos: 'learned' (random) or 'sincos' (a fixed table, as MoCo v3 and I-JEPA store theirs; [cls] gets zeros, as
    MoCo v3's does). The loader reads whatever table the file holds, so its formula only has to be plausible.
    DINOv2's position embedding covers [cls] and the patches, never the registers; so does everyone else's.
    """
    w = Weights(seed)
    sd = {"patch_embed.proj.weight": w(dim, 3, patch, patch), "patch_embed.proj.bias": w(dim),
          "norm.weight": w(dim, offset=1.0), "norm.bias": w(dim)}
    table = sincos_2d(dim, grid) if pos == "sincos" else w(1, grid * grid, dim)
    if cls:
        sd["cls_token"] = w(1, 1, dim)
        first = torch.zeros(1, 1, dim) if pos == "sincos" else w(1, 1, dim)
        table = torch.cat([first, table], dim=1)
    sd["pos_embed"] = table
    if registers:
        sd["register_tokens"] = w(1, registers, dim)
    sd.update(block_weights(w, dim, depth, layer_scale=layer_scale))
    return sd


def beit_state(seed=2, *, rel="shared", abs_pos=False, dim=64, depth=2, heads=2, patch=8, grid=4):
    """BEiT/SimMIM encoder weights: q/v biases, gamma_1/2, a shared or per-block relative position table."""
    w = Weights(seed)
    table = (2 * grid - 1) ** 2 + 3
    sd = {"cls_token": w(1, 1, dim), "patch_embed.proj.weight": w(dim, 3, patch, patch),
          "patch_embed.proj.bias": w(dim), "norm.weight": w(dim, offset=1.0), "norm.bias": w(dim)}
    if abs_pos:
        sd["pos_embed"] = w(1, grid * grid + 1, dim)
    if rel == "shared":
        sd["rel_pos_bias.relative_position_bias_table"] = w(table, heads, scale=1.0)
        sd["rel_pos_bias.relative_position_index"] = beit_index(grid)
    sd.update(block_weights(w, dim, depth, layer_scale="gamma", beit=True))
    if rel == "block":
        for i in range(depth):
            sd[f"blocks.{i}.attn.relative_position_bias_table"] = w(table, heads, scale=1.0)
            sd[f"blocks.{i}.attn.relative_position_index"] = beit_index(grid)
    return sd


def sincos_2d(dim, grid):
    """[1, grid*grid, dim] fixed 2-D sin-cos table as I-JEPA builds it: half the channels encode each axis."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    w_grid, h_grid = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    table = np.concatenate([one_axis(dim // 2, w_grid), one_axis(dim // 2, h_grid)], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


def beit_index(grid):
    """BEiT relative position index, written out from its definition ([cls] is token 0)."""
    side, area = 2 * grid - 1, grid * grid
    size = side * side + 3
    index = torch.empty(area + 1, area + 1, dtype=torch.long)
    for a in range(area):
        for b in range(area):
            dy, dx = a // grid - b // grid + grid - 1, a % grid - b % grid + grid - 1
            index[a + 1, b + 1] = dy * side + dx
    index[0, :], index[:, 0], index[0, 0] = size - 3, size - 2, size - 1
    return index


def prefixed(prefix, sd):
    return {prefix + k: v for k, v in sd.items()}


def projection_head(w, prefix, dim, hidden=32, out=16):
    """A DINO-style MLP head or MoCo v3's projector/predictor (with BatchNorm buffers): not part of the encoder."""
    return {prefix + "0.weight": w(hidden, dim), prefix + "0.bias": w(hidden), prefix + "1.weight": w(hidden),
            prefix + "1.running_mean": w(hidden), prefix + "1.num_batches_tracked": torch.tensor(3),
            prefix + "3.weight": w(out, hidden)}


# ------------------------------------------------------------------------------------------ release files

def save_dino_training(path, teacher, student, *, ibot=False, ddp_teacher=False):
    """main_dino.py / main_ibot.py: {'student': DDP(MultiCropWrapper), 'teacher': MultiCropWrapper, ...}."""
    w = Weights(5)
    dim = teacher["cls_token"].shape[-1]
    extra = {"backbone.masked_embed": w(1, dim)} if ibot else {}  # iBOT's mask embedding lives in the backbone
    teacher_sd = {**prefixed("backbone.", teacher), **extra, **projection_head(w, "head.mlp.", dim)}
    student_sd = {**prefixed("module.backbone.", student), **prefixed("module.", extra),
                  **projection_head(w, "module.head.mlp.", dim)}
    if ddp_teacher:
        teacher_sd = prefixed("module.", teacher_sd)
    loss = "ibot_loss" if ibot else "dino_loss"
    torch.save({"student": student_sd, "teacher": teacher_sd, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 3, "args": argparse.Namespace(arch="vit_small"), loss: {"center": w(1, 16)}}, path)


def save_dinov2_teacher_chunked(path, teacher, chunks=2):
    """DINOv2 training's teacher_checkpoint.pth: blocks wrapped in BlockChunks (blocks.<chunk>.<i>), heads."""
    w = Weights(6)
    depth = len({k.split(".")[1] for k in teacher if k.startswith("blocks.")})
    per_chunk = -(-depth // chunks)
    sd = {}
    for k, v in teacher.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // per_chunk}.{i}." + k.split(".", 2)[2]
        sd["backbone." + k] = v
    dim = teacher["cls_token"].shape[-1]
    sd.update(projection_head(w, "dino_head.mlp.", dim))
    sd.update(projection_head(w, "ibot_head.mlp.", dim))
    torch.save({"teacher": sd}, path)


def save_mocov3(path, base, momentum):
    """main_moco.py: {'state_dict': DDP(MoCo_ViT).state_dict()}; base_encoder.head is the projector."""
    w = Weights(7)
    dim = base["cls_token"].shape[-1]
    sd = {**prefixed("module.base_encoder.", base), **projection_head(w, "module.base_encoder.head.", dim),
          **prefixed("module.momentum_encoder.", momentum),
          **projection_head(w, "module.momentum_encoder.head.", dim),
          **projection_head(w, "module.predictor.", 16)}
    torch.save({"epoch": 10, "arch": "vit_small", "state_dict": sd, "optimizer": {"state": {}},
                "scaler": {"scale": 1024.0}}, path)


def save_ijepa(path, context, target):
    """I-JEPA train.py: encoder and target_encoder are DDP-wrapped (module.*), plus the predictor."""
    w = Weights(8)
    predictor = {"module.predictor_embed.weight": w(16, 64), "module.mask_token": w(1, 1, 16),
                 "module.predictor_pos_embed": w(1, 16, 16)}
    torch.save({"encoder": prefixed("module.", context), "predictor": predictor,
                "target_encoder": prefixed("module.", target), "opt": {"state": {}}, "scaler": None, "epoch": 300,
                "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 0.001}, path)


def save_beitv2_pretraining(path, encoder):
    """BEiT-v2 pretraining: {'model': VisionTransformerForMaskedImageModelingCLS} with lm_head, cls_pt_layers."""
    w = Weights(9)
    dim = encoder["cls_token"].shape[-1]
    extra = {"mask_token": w(1, 1, dim), "lm_head.weight": w(32, dim), "lm_head.bias": w(32)}
    extra.update(prefixed("cls_pt_layers.0.", {k.split(".", 2)[2]: v for k, v in encoder.items()
                                               if k.startswith("blocks.0.")}))
    torch.save({"model": {**encoder, **extra}, "epoch": 299, "args": argparse.Namespace(model="beit")}, path)


# ------------------------------------------------------------------------------------------ forwards

def _layer_norm(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=EPS)


def _scale(sd, b, which):
    """The layer scale of branch `which` (1: attention, 2: MLP) under either release's name, or 1."""
    for key in (f"{b}ls{which}.gamma", f"{b}gamma_{which}"):
        if key in sd:
            return sd[key]
    return 1.0


def block(sd, i, t, heads, rel_bias=None):
    """One pre-norm block as every release writes it; BEiT's attention adds q/v biases and a relative bias."""
    b = f"blocks.{i}."
    B, T, D = t.shape
    if b + "attn.q_bias" in sd:
        bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros(D), sd[b + "attn.v_bias"]])
    else:
        bias = sd[b + "attn.qkv.bias"]
    qkv = F.linear(_layer_norm(sd, b + "norm1", t), sd[b + "attn.qkv.weight"], bias)
    q, k, v = qkv.reshape(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    scores = (q * (D // heads) ** -0.5) @ k.transpose(-2, -1)
    if rel_bias is not None:
        scores = scores + rel_bias
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    t = t + _scale(sd, b, 1) * F.linear(y, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
    h = F.gelu(F.linear(_layer_norm(sd, b + "norm2", t), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
    return t + _scale(sd, b, 2) * F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])


def _patches(sd, x):
    weight = sd["patch_embed.proj.weight"]
    return F.conv2d(x, weight, sd["patch_embed.proj.bias"], stride=weight.shape[-1]).flatten(2).transpose(1, 2)


def embed(sd, x, pos_embed=None):
    """Tokens entering block 0, as DINO/iBOT/MAE/MoCo v3 (cat [cls], add position), I-JEPA (no [cls]: add
    position) and DINOv2 (then registers, which get no position, right after [cls]) build them."""
    t = _patches(sd, x)
    pos = sd["pos_embed"] if pos_embed is None else pos_embed
    if "cls_token" in sd:
        t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], dim=1)
    t = t + pos
    if "register_tokens" in sd:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(len(x), -1, -1), t[:, 1:]], dim=1)
    return t


def vit_forward(sd, x, heads, *, final_norm=False, pos_embed=None, blocks=None):
    """DINO / iBOT / MAE / MoCo v3 / I-JEPA / DINOv2 encoder tokens (before the final norm unless asked)."""
    t = embed(sd, x, pos_embed)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth if blocks is None else blocks):
        t = block(sd, i, t, heads)
    return _layer_norm(sd, "norm", t) if final_norm else t


def beit_forward(sd, x, heads, grid, *, final_norm=False):
    """BEiT / BEiT-v2 / SimMIM encoder tokens: [cls], optional absolute position, relative position bias."""
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), _patches(sd, x)], dim=1)
    if "pos_embed" in sd:
        t = t + sd["pos_embed"]
    index = beit_index(grid)
    shared = sd.get("rel_pos_bias.relative_position_bias_table")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        table = sd.get(f"blocks.{i}.attn.relative_position_bias_table", shared)
        rel = None if table is None else table[index].permute(2, 0, 1)
        t = block(sd, i, t, heads, rel)
    return _layer_norm(sd, "norm", t) if final_norm else t
