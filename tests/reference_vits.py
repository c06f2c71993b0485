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
import math

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


# ------------------------------------------------------------------------------------------ rotary releases
# DINOv3 (facebookresearch/dinov3 models/vision_transformer.py, layers/{attention,rope_position_encoding,
# ffn_layers}.py), EVA02 MIM (baaivision/EVA EVA-02/asuka modeling_pretrain.py, modeling_finetune.py, rope.py),
# PE (facebookresearch/perception_models core/vision_encoder/{pe,rope}.py), CAPI (facebookresearch/capi model.py)
# and Franca (valeoai/Franca: DINOv2's ViT with SwiGLU). Each forward returns (tokens before the final norm,
# tokens after it, [per-block attention probabilities]); the attention is written as each release computes it.

def _ln(x, w, b, eps):
    return F.layer_norm(x, x.shape[-1:], w, b, eps=eps)


def _rms(x, w, eps=1e-5):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _halves(x):  # rotate_half of DINOv3 and CAPI: [-x2, x1] over the two halves of the channels
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _pairs(x):  # rotate_half of EVA02 and PE: over interleaved channel pairs (x0, x1) -> (-x1, x0)
    x = x.reshape(*x.shape[:-1], -1, 2)
    return torch.stack([-x[..., 1], x[..., 0]], dim=-1).flatten(-2)


def _attend(q, k, v):
    p = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return p, (p @ v).transpose(1, 2).flatten(2)


def dinov3_state(seed=50, *, dim=64, depth=2, heads=2, patch=16, storage=4, swiglu=False, qkv_bias=True, ffn=4):
    """hub `dinov3_vit*16_pretrain_*.pth`: a bare state dict, periods stored rounded to bf16 (trained in bf16)."""
    w = Weights(seed)
    head = dim // heads
    sd = {"cls_token": w(1, 1, dim), "storage_tokens": w(1, storage, dim), "mask_token": torch.zeros(1, dim),
          "patch_embed.proj.weight": w(dim, 3, patch, patch), "patch_embed.proj.bias": w(dim),
          "rope_embed.periods": (100.0 ** (2 * torch.arange(head // 4) / (head // 2))).bfloat16(),
          "norm.weight": w(dim, offset=1.0), "norm.bias": w(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        mask = torch.ones(3 * dim)
        mask[dim:2 * dim] = 0
        sd.update({b + "norm1.weight": w(dim, offset=1.0), b + "norm1.bias": w(dim),
                   b + "attn.qkv.weight": w(3 * dim, dim), b + "attn.proj.weight": w(dim, dim),
                   b + "attn.proj.bias": w(dim), b + "ls1.gamma": w(dim, scale=0.5), b + "ls2.gamma": w(dim, scale=0.5),
                   b + "norm2.weight": w(dim, offset=1.0), b + "norm2.bias": w(dim)})
        sd[b + "attn.qkv.bias"] = w(3 * dim) if qkv_bias else torch.zeros(3 * dim)
        sd[b + "attn.qkv.bias_mask"] = mask
        if swiglu:  # SwiGLUFFN, align_to 8 in the hub models that use "swiglu"
            hidden = int(ffn * dim * 2 / 3)
            hidden += -hidden % 8
            sd.update({b + "mlp.w1.weight": w(hidden, dim), b + "mlp.w1.bias": w(hidden),
                       b + "mlp.w2.weight": w(hidden, dim), b + "mlp.w2.bias": w(hidden),
                       b + "mlp.w3.weight": w(dim, hidden), b + "mlp.w3.bias": w(dim)})
        else:
            sd.update({b + "mlp.fc1.weight": w(ffn * dim, dim), b + "mlp.fc1.bias": w(ffn * dim),
                       b + "mlp.fc2.weight": w(dim, ffn * dim), b + "mlp.fc2.bias": w(dim)})
    return sd


def dinov3_forward(sd, x, heads, eps=1e-5):
    """DinoVisionTransformer.forward_features in eval: x_prenorm and norm(x), with attention per block."""
    weight = sd["patch_embed.proj.weight"]
    t = F.conv2d(x, weight, sd["patch_embed.proj.bias"], stride=weight.shape[-1])
    B, D, H, W = t.shape
    t = torch.cat([sd["cls_token"].expand(B, -1, -1) + 0 * sd["mask_token"],
                   sd["storage_tokens"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], dim=1)
    periods = sd["rope_embed.periods"].float()  # loaded into the hub model's fp32 buffer
    coords = torch.stack(torch.meshgrid(torch.arange(0.5, H) / H, torch.arange(0.5, W) / W, indexing="ij"), -1)
    coords = 2.0 * coords.flatten(0, 1) - 1.0
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    sin, cos = angles.sin(), angles.cos()
    attns = []
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        h = _ln(t, sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] * sd[b + "attn.qkv.bias_mask"])
        q, k, v = qkv.reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        n = t.shape[1] - H * W  # rope on the patches only
        q = torch.cat([q[:, :, :n], q[:, :, n:] * cos + _halves(q[:, :, n:]) * sin], dim=2)
        k = torch.cat([k[:, :, :n], k[:, :, n:] * cos + _halves(k[:, :, n:]) * sin], dim=2)
        p, y = _attend(q, k, v)
        attns.append(p)
        t = t + sd[b + "ls1.gamma"] * F.linear(y, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = _ln(t, sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        if b + "mlp.w1.weight" in sd:
            h = F.silu(F.linear(h, sd[b + "mlp.w1.weight"], sd[b + "mlp.w1.bias"])) * \
                F.linear(h, sd[b + "mlp.w2.weight"], sd[b + "mlp.w2.bias"])
            h = F.linear(h, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
        else:
            h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + sd[b + "ls2.gamma"] * h
    return t, _ln(t, sd["norm.weight"], sd["norm.bias"], eps), attns


def eva02_state(seed=51, *, dim=64, depth=2, heads=2, patch=14, grid=16):
    """EVA02 B/L MIM pretraining (VisionTransformerForMaskedImageModeling, subln + naive SwiGLU): separate q/k/v
    with q/v biases, rope buffers in every attention, mask_token and lm_head. `grid` is the pretraining grid."""
    w = Weights(seed)
    head = dim // heads
    hidden = int(dim * 4 * 2 / 3)
    cos, sin = eva02_rope(head, grid, grid)
    sd = {"cls_token": w(1, 1, dim), "mask_token": w(1, 1, dim), "pos_embed": w(1, 1 + grid * grid, dim),
          "patch_embed.proj.weight": w(dim, 3, patch, patch), "patch_embed.proj.bias": w(dim),
          "rope.freqs_cos": cos, "rope.freqs_sin": sin, "norm.weight": w(dim, offset=1.0), "norm.bias": w(dim),
          "lm_head.weight": w(32, dim), "lm_head.bias": w(32)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": w(dim, offset=1.0), b + "norm1.bias": w(dim),
                   b + "attn.q_proj.weight": w(dim, dim), b + "attn.k_proj.weight": w(dim, dim),
                   b + "attn.v_proj.weight": w(dim, dim), b + "attn.q_bias": w(dim), b + "attn.v_bias": w(dim),
                   b + "attn.rope.freqs_cos": cos, b + "attn.rope.freqs_sin": sin,
                   b + "attn.proj.weight": w(dim, dim), b + "attn.proj.bias": w(dim),
                   b + "norm2.weight": w(dim, offset=1.0), b + "norm2.bias": w(dim),
                   b + "mlp.w1.weight": w(hidden, dim), b + "mlp.w1.bias": w(hidden),
                   b + "mlp.w2.weight": w(hidden, dim), b + "mlp.w2.bias": w(hidden),
                   b + "mlp.ffn_ln.weight": w(hidden, offset=1.0), b + "mlp.ffn_ln.bias": w(hidden),
                   b + "mlp.w3.weight": w(dim, hidden), b + "mlp.w3.bias": w(dim)})
    return sd


def eva02_rope(head_dim, grid, pt_grid):
    """VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=pt_grid, ft_seq_len=grid): (cos, sin) [grid², head]."""
    d = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[:d // 2].float() / d))
    t = torch.arange(grid) / grid * pt_grid
    f = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # '... n -> ... (n r)', r=2
    f = torch.cat([f[:, None, :].expand(grid, grid, -1), f[None, :, :].expand(grid, grid, -1)], dim=-1)
    f = f.reshape(-1, f.shape[-1])
    return f.cos(), f.sin()


def eva02_forward(sd, x, heads, pt_grid=16, eps=1e-6):
    """EVA02 MIM forward_features without masking (forward at the fine-tuning grid, rope at ft_seq_len)."""
    t = _patches(sd, x)
    B, N, D = t.shape
    grid = math.isqrt(N)
    cos, sin = eva02_rope(D // heads, grid, pt_grid)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], dim=1) + sd["pos_embed"]
    attns = []
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        h = _ln(t, sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        q = F.linear(h, sd[b + "attn.q_proj.weight"], sd[b + "attn.q_bias"]).reshape(B, -1, heads, D // heads)
        k = F.linear(h, sd[b + "attn.k_proj.weight"]).reshape(B, -1, heads, D // heads)
        v = F.linear(h, sd[b + "attn.v_proj.weight"], sd[b + "attn.v_bias"]).reshape(B, -1, heads, D // heads)
        q, k, v = (a.permute(0, 2, 1, 3) for a in (q, k, v))
        q = torch.cat([q[:, :, :1], q[:, :, 1:] * cos + _pairs(q[:, :, 1:]) * sin], dim=2)
        k = torch.cat([k[:, :, :1], k[:, :, 1:] * cos + _pairs(k[:, :, 1:]) * sin], dim=2)
        p, y = _attend(q, k, v)
        attns.append(p)
        t = t + F.linear(y, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = _ln(t, sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        h = F.silu(F.linear(h, sd[b + "mlp.w1.weight"], sd[b + "mlp.w1.bias"])) * \
            F.linear(h, sd[b + "mlp.w2.weight"], sd[b + "mlp.w2.bias"])
        h = _ln(h, sd[b + "mlp.ffn_ln.weight"], sd[b + "mlp.ffn_ln.bias"], eps)
        t = t + F.linear(h, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
    return t, _ln(t, sd["norm.weight"], sd["norm.bias"], eps), attns


def pe_state(seed=52, *, dim=64, depth=2, patch=16, grid=24, cls=True, ln_post=True, out=32):
    """PE vision tower (pe.py VisionTransformer): conv1 without bias, class_embedding, positional_embedding,
    ln_pre, transformer.resblocks.N (nn.MultiheadAttention names), ln_post, attn_pool and proj."""
    w = Weights(seed)
    sd = {"conv1.weight": w(dim, 3, patch, patch), "positional_embedding": w(int(cls) + grid * grid, dim),
          "ln_pre.weight": w(dim, offset=1.0), "ln_pre.bias": w(dim)}
    if cls:
        sd["class_embedding"] = w(dim)
    for i in range(depth):
        b = f"transformer.resblocks.{i}."
        sd.update({b + "ln_1.weight": w(dim, offset=1.0), b + "ln_1.bias": w(dim),
                   b + "attn.in_proj_weight": w(3 * dim, dim), b + "attn.in_proj_bias": w(3 * dim),
                   b + "attn.out_proj.weight": w(dim, dim), b + "attn.out_proj.bias": w(dim),
                   b + "ln_2.weight": w(dim, offset=1.0), b + "ln_2.bias": w(dim),
                   b + "mlp.c_fc.weight": w(4 * dim, dim), b + "mlp.c_fc.bias": w(4 * dim),
                   b + "mlp.c_proj.weight": w(dim, 4 * dim), b + "mlp.c_proj.bias": w(dim)})
    if ln_post:  # PE-Core: ln_post, attention pooling and projection; PE-Spatial has none of them
        sd.update({"ln_post.weight": w(dim, offset=1.0), "ln_post.bias": w(dim), "proj": w(dim, out),
                   "attn_pool.probe": w(1, 1, dim), "attn_pool.attn.in_proj_weight": w(3 * dim, dim),
                   "attn_pool.attn.in_proj_bias": w(3 * dim), "attn_pool.attn.out_proj.weight": w(dim, dim),
                   "attn_pool.attn.out_proj.bias": w(dim), "attn_pool.layernorm.weight": w(dim, offset=1.0),
                   "attn_pool.layernorm.bias": w(dim), "attn_pool.mlp.c_fc.weight": w(4 * dim, dim),
                   "attn_pool.mlp.c_fc.bias": w(4 * dim), "attn_pool.mlp.c_proj.weight": w(dim, 4 * dim),
                   "attn_pool.mlp.c_proj.bias": w(dim)})
    return sd


def pe_forward(sd, x, heads, eps=1e-5):
    """VisionTransformer.forward_features(norm=False / True): Rope2D over the patch grid ([cls] not rotated),
    the position table resampled bilinearly when the grid differs from the pretraining one."""
    weight = sd["conv1.weight"]
    t = F.conv2d(x, weight, stride=weight.shape[-1])
    B, D, gh, gw = t.shape
    t = t.permute(0, 2, 3, 1).reshape(B, -1, D)
    cls = "class_embedding" in sd
    pos = sd["positional_embedding"]
    if cls:
        t = torch.cat([sd["class_embedding"].view(1, 1, -1).expand(B, -1, -1), t], dim=1)
        first, pos = pos[:1], pos[1:]
    side = math.isqrt(pos.shape[0])
    if side != gh or side != gw:
        pos = F.interpolate(pos.reshape(1, side, side, D).permute(0, 3, 1, 2), size=(gh, gw), mode="bilinear",
                            align_corners=False).permute(0, 2, 3, 1).reshape(-1, D)
    t = t + (torch.cat([first, pos]) if cls else pos)[None]
    # Rope2D: RotaryEmbedding(head_dim // 2) "lang" frequencies; positions start at 1 when [cls] takes row 0
    d = D // heads // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[:d // 2].float() / d))
    ys, xs = torch.arange(gh) + int(cls), torch.arange(gw) + int(cls)
    fy = torch.einsum("i,f->if", ys.float(), freqs).repeat_interleave(2, -1)[:, None].expand(gh, gw, -1)
    fx = torch.einsum("i,f->if", xs.float(), freqs).repeat_interleave(2, -1)[None, :].expand(gh, gw, -1)
    f = torch.cat([fx, fy], dim=-1).reshape(gh * gw, -1)
    if cls:
        f = torch.cat([torch.zeros(1, f.shape[-1]), f])
    t = _ln(t, sd["ln_pre.weight"], sd["ln_pre.bias"], eps)
    attns = []
    depth = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(depth):
        b = f"transformer.resblocks.{i}."
        h = _ln(t, sd[b + "ln_1.weight"], sd[b + "ln_1.bias"], eps)
        q, k, v = F.linear(h, sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"]).reshape(
            B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k = (a * f.cos() + _pairs(a) * f.sin() for a in (q, k))
        p, y = _attend(q, k, v)
        attns.append(p)
        y = F.linear(y, sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"])
        t = t + sd.get(b + "ls_1.gamma", 1.0) * y
        h = _ln(t, sd[b + "ln_2.weight"], sd[b + "ln_2.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])),
                     sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        t = t + sd.get(b + "ls_2.gamma", 1.0) * h
    normed = _ln(t, sd["ln_post.weight"], sd["ln_post.bias"], eps) if "ln_post.weight" in sd else None
    return t, normed, attns


def capi_state(seed=53, *, dim=64, depth=2, dec_depth=1, heads=2, patch=14, registers=16):
    """CAPI's released `capi_vitl14_*.pth`: the student's state dict, backbone.* (EncoderDecoder: encoder,
    decoder, mask_token, registers, patch_embed; the norms have no weights) and head.* (the clustering head)."""
    w = Weights(seed)
    head = dim // heads

    def blocks(prefix, n):
        out = {}
        for i in range(n):
            b = f"{prefix}.blocks.{i}."
            out.update({b + "residual1.norm.weight": w(dim, offset=1.0),
                        b + "residual1.fn.q_proj.weight": w(dim, dim), b + "residual1.fn.k_proj.weight": w(dim, dim),
                        b + "residual1.fn.v_proj.weight": w(dim, dim), b + "residual1.fn.proj.weight": w(dim, dim),
                        b + "residual1.fn.rope.freqs": capi_freqs(head) * (1 + w(1, head, scale=0.05)),
                        b + "residual2.norm.weight": w(dim, offset=1.0),
                        b + "residual2.fn.fc1.weight": w(4 * dim, dim), b + "residual2.fn.fc2.weight": w(dim, 4 * dim)})
        return out
    sd = {"registers": w(1, registers, dim), "mask_token": w(1, dim), "patch_embed.weight": w(dim, 3, patch, patch),
          "patch_embed.bias": w(dim), **blocks("encoder", depth), **blocks("decoder", dec_depth)}
    return {**prefixed("backbone.", sd), "head.last_layer.weight_g": w(32, 1), "head.last_layer.weight_v": w(32, dim)}


def capi_freqs(head_dim, max_freq=7, min_freq=7e-4):
    """Rope._device_weight_init: x-channels in the first half, y in the second, angular frequencies."""
    f = max_freq * (max_freq / min_freq) ** torch.linspace(0, -1, head_dim // 4)
    f = torch.cat([f, f])
    out = torch.zeros(2, head_dim)
    out[0, :head_dim // 2] = f
    out[1, -head_dim // 2:] = f
    return out * 2 * math.pi


def capi_forward(sd, x, heads):
    """EncoderDecoder.forward_features' encoder part (all patches visible), enc_norm without weight."""
    sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    t = F.conv2d(x, sd["patch_embed.weight"], sd["patch_embed.bias"], stride=sd["patch_embed.weight"].shape[-1])
    B, D, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)
    coords = torch.cartesian_prod(torch.linspace(0, 1, h), torch.linspace(0, 1, w))
    n = sd["registers"].shape[1]
    side = n // 4
    c = torch.arange(side) / side
    edge = torch.zeros(n, 2)
    edge[:side, 0], edge[:side, 1] = c, 0
    edge[side:2 * side, 0], edge[side:2 * side, 1] = 1, c
    edge[2 * side:3 * side, 0], edge[2 * side:3 * side, 1] = 1 - c, 1
    edge[3 * side:, 0], edge[3 * side:, 1] = 0, 1 - c
    lo, hi = coords.min(0, keepdim=True).values, coords.max(0, keepdim=True).values
    coords = torch.cat([lo + edge * (hi - lo), coords])  # scale_reg_to_visible
    t = torch.cat([sd["registers"].expand(B, -1, -1), t], dim=1)
    attns = []
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")})
    for i in range(depth):
        b = f"encoder.blocks.{i}."
        hdn = _rms(t, sd[b + "residual1.norm.weight"])
        q, k, v = (F.linear(hdn, sd[b + f"residual1.fn.{p}_proj.weight"]).reshape(B, -1, heads, D // heads)
                   .transpose(1, 2) for p in "qkv")
        angle = coords @ sd[b + "residual1.fn.rope.freqs"]
        q, k = (a * angle.cos() + _halves(a) * angle.sin() for a in (q, k))
        p, y = _attend(q, k, v)
        attns.append(p)
        t = t + F.linear(y, sd[b + "residual1.fn.proj.weight"])
        hdn = _rms(t, sd[b + "residual2.norm.weight"])
        t = t + F.linear(F.gelu(F.linear(hdn, sd[b + "residual2.fn.fc1.weight"])), sd[b + "residual2.fn.fc2.weight"])
    return t, _rms(t, None), attns


def franca_state(seed=54, *, dim=64, depth=2, patch=14, grid=3):
    """Franca's teacher backbone (DINOv2's ViT, ffn_layer swiglufused, layer scale, no registers)."""
    w = Weights(seed)
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8  # SwiGLUFFNFused
    sd = vit_state(seed, dim=dim, depth=depth, patch=patch, grid=grid, layer_scale="ls")
    sd["mask_token"] = torch.zeros(1, dim)
    for i in range(depth):
        b = f"blocks.{i}.mlp."
        for key in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            del sd[b + key]
        sd.update({b + "w12.weight": w(2 * hidden, dim), b + "w12.bias": w(2 * hidden),
                   b + "w3.weight": w(dim, hidden), b + "w3.bias": w(dim)})
    return sd


def save_franca(path, teacher, chunks=2):
    """The released franca_vitl14_*.pth: {'teacher': backbone.blocks.<chunk>.<i>.* (BlockChunk), dino_head,
    ibot_head}, the layout the hub loader strips of `backbone.`."""
    save_dinov2_teacher_chunked(path, teacher, chunks=chunks)


def franca_forward(sd, x, heads):
    """DINOv2's forward_features with SwiGLUFFNFused (x_prenorm, x_norm)."""
    t = embed(sd, x)
    B, _, D = t.shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        h = _layer_norm(sd, b + "norm1", t)
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(
            B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        _, y = _attend(q, k, v)
        t = t + sd[b + "ls1.gamma"] * F.linear(y, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        x12 = F.linear(_layer_norm(sd, b + "norm2", t), sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"])
        x1, x2 = x12.chunk(2, dim=-1)
        t = t + sd[b + "ls2.gamma"] * F.linear(F.silu(x1) * x2, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
    return t, _layer_norm(sd, "norm", t)


def dino_interpolate(pos_embed, w0, h0, offset=0.1):
    """DINOv2 models/vision_transformer.py interpolate_pos_encoding (interpolate_offset 0.1, no antialias); DINO
    and iBOT do the same (w0 + 0.1 scale factors, bicubic)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    M = math.isqrt(patches.shape[1])
    table = F.interpolate(patches.reshape(1, M, M, -1).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
                          scale_factor=(float(w0 + offset) / M, float(h0 + offset) / M))
    assert table.shape[-2:] == (w0, h0)
    return torch.cat([cls, table.permute(0, 2, 3, 1).reshape(1, -1, patches.shape[-1])], dim=1)
