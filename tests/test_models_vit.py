"""models_vit: every checkpoint format against an independent forward, capture, strictness, errors."""
import argparse
import fractions
from functools import partial

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

import models_vit
from models_vit import build_encoder, capture_attention
from util.errors import UserError

TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)  # overrides for vit_tiny_patch16
TOL = 1e-5


def timm_vit(img_size=32, **kwargs):
    """timm's own ViT with MAE hyper-params and non-trivial norm/bias weights."""
    torch.manual_seed(0)
    args = dict(img_size=img_size, num_classes=0, global_pool="", norm_layer=partial(nn.LayerNorm, eps=1e-6), **TINY)
    net = VisionTransformer(**{**args, **kwargs}).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name or name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.add_(0.3 * torch.randn_like(p))
    return net


def images(size=32, batch=3):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def load(path, size=32, **kwargs):
    return build_encoder("vit_tiny_patch16", str(path), input_size=size, **TINY, **kwargs)


def timm_tokens(net, x, block=None, final_norm=False):
    t = net._pos_embed(net.patch_embed(x))
    for blk in net.blocks[: None if block is None else block + 1]:
        t = blk(t)
    return net.norm(t) if final_norm else t


@pytest.mark.parametrize("prefix", ["", "module."])
def test_mae_checkpoint_matches_timm(tmp_path, prefix, capsys):
    net = timm_vit()
    state = {prefix + k: v for k, v in net.state_dict().items()}
    state.update({"mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.randn(32, 64),
                  "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_pred.weight": torch.randn(192, 32)})
    torch.save({"model": state, "epoch": 7, "args": argparse.Namespace(lr=0.1)}, tmp_path / "mae.pth")
    enc = load(tmp_path / "mae.pth")
    assert "loaded" in capsys.readouterr().out
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert (enc.num_prefix_tokens, enc.patch_size, enc.grid_size, enc.embed_dim, enc.depth) == (1, 8, (4, 4), 64, 2)
    x = images()
    with torch.no_grad():
        tokens = enc.forward_tokens(x)
        assert tokens.shape == (3, 17, 64)
        assert (tokens - timm_tokens(net, x)).abs().max() < TOL
        assert (enc.forward_tokens(x, block=0) - timm_tokens(net, x, block=0)).abs().max() < TOL
        assert torch.equal(enc.forward_tokens(x, block=-1), tokens)
        enc.final_norm = True  # timm's forward_features ends with the final norm
        assert (enc.forward_tokens(x) - net.forward_features(x)).abs().max() < TOL
    with pytest.raises(UserError, match="block 2 does not exist"):
        enc.forward_tokens(x, block=2)


def test_timm_state_dict_resampled_to_new_input_size(tmp_path):
    net = timm_vit(num_classes=5, global_pool="token")  # head.* is dropped silently
    torch.save(net.state_dict(), tmp_path / "timm.pth")
    enc = load(tmp_path / "timm.pth", size=48)
    assert enc.grid_size == (6, 6)
    expected = resample_abs_pos_embed(net.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    assert torch.equal(enc.pos_embed, expected)
    dynamic = timm_vit(dynamic_img_size=True)  # timm resamples its pos-embed on the fly for other sizes
    dynamic.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("head")})
    x = images(48)
    with torch.no_grad():
        assert (enc.forward_tokens(x) - timm_tokens(dynamic, x)).abs().max() < TOL


def test_timm_name_copies_weights_and_checks_heads(monkeypatch):
    net = timm_vit()
    monkeypatch.setattr(models_vit.timm, "create_model", lambda name, pretrained, num_classes: net)
    enc = build_encoder("vit_tiny_patch16", "vit_base_patch16_224.mae", input_size=32, **TINY)
    x = images()
    with torch.no_grad():
        assert (enc.forward_tokens(x) - timm_tokens(net, x)).abs().max() < TOL
    with pytest.raises(UserError, match="has 2 heads"):
        build_encoder("vit_tiny_patch16", "vit_base_patch16_224.mae", input_size=32, **{**TINY, "num_heads": 4})


def test_no_cls_token(tmp_path):
    net = timm_vit(class_token=False)
    torch.save(net.state_dict(), tmp_path / "ijepa.pth")
    enc = load(tmp_path / "ijepa.pth", no_cls_token=True)
    x = images()
    with torch.no_grad():
        tokens = enc.forward_tokens(x)
    assert enc.num_prefix_tokens == 0 and tokens.shape == (3, 16, 64)
    assert (tokens - timm_tokens(net, x)).abs().max() < TOL
    with pytest.raises(UserError, match="no_cls_token"):
        load(tmp_path / "ijepa.pth")


# ---------------------------------------------------------------- SimMIM

def simmim_index(grid):
    """BEiT relative position index, written out from its definition (cls is token 0)."""
    side, area = 2 * grid - 1, grid * grid
    size = side * side + 3
    index = torch.empty(area + 1, area + 1, dtype=torch.long)
    for a in range(area):
        for b in range(area):
            dy, dx = a // grid - b // grid + grid - 1, a % grid - b % grid + grid - 1
            index[a + 1, b + 1] = dy * side + dx
    index[0, :], index[:, 0], index[0, 0] = size - 3, size - 2, size - 1
    return index


def simmim_state(rel="shared", abs_pos=False, grid=4, dim=64, depth=2, heads=2):
    g = torch.Generator().manual_seed(2)
    r = lambda *shape, s=0.1: s * torch.randn(*shape, generator=g)  # noqa: E731
    table = (2 * grid - 1) ** 2 + 3
    sd = {"cls_token": r(1, 1, dim), "mask_token": r(1, 1, dim), "patch_embed.proj.weight": r(dim, 3, 8, 8),
          "patch_embed.proj.bias": r(dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    if abs_pos:
        sd["pos_embed"] = r(1, grid * grid + 1, dim)
    if rel == "shared":
        sd["rel_pos_bias.relative_position_bias_table"] = r(table, heads, s=1.0)
        sd["rel_pos_bias.relative_position_index"] = simmim_index(grid)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim),
                   b + "attn.q_bias": r(dim), b + "attn.v_bias": r(dim), b + "attn.proj.weight": r(dim, dim),
                   b + "attn.proj.bias": r(dim), b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                   b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                   b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim),
                   b + "gamma_1": r(dim, s=0.5), b + "gamma_2": r(dim, s=0.5)})
        if rel == "block":
            sd[b + "attn.relative_position_bias_table"] = r(table, heads, s=1.0)
            sd[b + "attn.relative_position_index"] = simmim_index(grid)
    return sd


def simmim_reference(sd, x, heads=2, grid=4, final_norm=False):
    """SimMIM's ViT forward in plain torch (BEiT attention: q/v bias only, relative bias, layer-scale gamma)."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], dim=1)
    if "pos_embed" in sd:
        t = t + sd["pos_embed"]
    B, T, D = t.shape
    index = simmim_index(grid)
    ln = lambda v, name: F.layer_norm(v, (D,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(sum(k.endswith("gamma_1") for k in sd)):
        b = f"blocks.{i}."
        bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros(D), sd[b + "attn.v_bias"]])
        q, k, v = F.linear(ln(t, b + "norm1"), sd[b + "attn.qkv.weight"], bias).reshape(B, T, 3, heads, -1).permute(
            2, 0, 3, 1, 4)
        scores = (q * (D // heads) ** -0.5) @ k.transpose(-2, -1)
        table = sd.get(b + "attn.relative_position_bias_table", sd.get("rel_pos_bias.relative_position_bias_table"))
        if table is not None:
            scores = scores + table[index].permute(2, 0, 1)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        t = t + sd[b + "gamma_1"] * F.linear(y, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(t, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        t = t + sd[b + "gamma_2"] * F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return ln(t, "norm") if final_norm else t


@pytest.mark.parametrize("rel,abs_pos", [("shared", False), ("block", True), ("none", True)])
def test_simmim_checkpoint_matches_reference(tmp_path, rel, abs_pos):
    sd = simmim_state(rel, abs_pos)
    wrapped = {"encoder." + k: v for k, v in sd.items()}
    wrapped.update({"decoder.0.weight": torch.randn(192, 64, 1, 1), "decoder.0.bias": torch.randn(192)})
    # SimMIM also pickles its yacs config: a non-tensor object that weights_only loading refuses
    torch.save({"model": wrapped, "config": fractions.Fraction(1, 3)}, tmp_path / "simmim.pth")
    enc = load(tmp_path / "simmim.pth", simmim=True)
    x = images()
    with torch.no_grad():
        assert (enc.forward_tokens(x) - simmim_reference(sd, x)).abs().max() < TOL
        enc.final_norm = True
        assert (enc.forward_tokens(x) - simmim_reference(sd, x, final_norm=True)).abs().max() < TOL


def test_simmim_relative_bias_resized_for_new_grid(tmp_path):
    torch.save({"model": {"encoder." + k: v for k, v in simmim_state().items()}}, tmp_path / "s.pth")
    enc = load(tmp_path / "s.pth", size=48, simmim=True)
    assert enc.rel_pos_bias.relative_position_bias_table.shape == (11 * 11 + 3, 2)
    assert enc.forward_tokens(images(48)).shape == (3, 37, 64)


# ---------------------------------------------------------------- attention capture

def check_capture_reproduces_blocks(enc, x):
    with torch.no_grad():
        fused = enc.forward_tokens(x)
        with capture_attention(enc) as cap:
            captured = enc.forward_tokens(x)
        assert torch.equal(fused, captured)
        t = enc._pos_embed(enc.patch_embed(x))
        for i, blk in enumerate(enc.blocks):
            rec = cap.records[i]
            attn = rec["attn"]
            assert attn.dtype == torch.float32 and attn.shape == (3, 2, 17, 17)
            assert (attn.sum(-1) - 1).abs().max() < 1e-6
            assert (rec["resid_norm"] - t.norm(dim=-1)).abs().max() < TOL
            v = blk.attn.qkv(blk.norm1(t)).reshape(3, 17, 3, 2, 32).permute(2, 0, 3, 1, 4)[2]
            branch = blk.ls1(blk.attn.proj((attn @ v).transpose(1, 2).reshape(3, 17, 64)))
            assert (rec["attn_out_norm"] - branch.norm(dim=-1)).abs().max() < TOL
            t = t + branch
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
            assert (rec["out"] - t).abs().max() < TOL
        assert torch.equal(cap.records[-1]["out"], captured)


def test_capture_reproduces_block_outputs_mae(tmp_path):
    torch.save(timm_vit().state_dict(), tmp_path / "timm.pth")
    enc = load(tmp_path / "timm.pth")
    assert enc.blocks[0].attn.fused_attn  # the normal path really is SDPA
    check_capture_reproduces_blocks(enc, images())


def test_capture_reproduces_block_outputs_simmim(tmp_path):
    torch.save({"model": {"encoder." + k: v for k, v in simmim_state().items()}}, tmp_path / "s.pth")
    check_capture_reproduces_blocks(load(tmp_path / "s.pth", simmim=True), images())


def test_capture_selected_blocks_replaced_each_forward_and_hooks_removed(tmp_path):
    torch.save(timm_vit().state_dict(), tmp_path / "timm.pth")
    enc = load(tmp_path / "timm.pth")
    with torch.no_grad(), capture_attention(enc, blocks=[-1]) as cap:
        enc.forward_tokens(images())
        assert list(cap.records) == [1]
        enc.forward_tokens(images(), block=0)
        assert list(cap.records) == []
    modules = [enc.patch_embed] + [m for blk in enc.blocks for m in (blk, blk.attn, blk.ls1)]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


# ---------------------------------------------------------------- strictness and errors

@pytest.mark.parametrize("change,named", [
    ({"depth": 3}, "unexpected: blocks.2."),
    ({"embed_dim": 96}, "patch_embed.proj.weight (96, 3, 8, 8) vs (64, 3, 8, 8)")])
def test_other_architecture_fails_naming_keys(tmp_path, change, named):
    torch.save({"model": timm_vit(**change).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(UserError) as err:
        load(tmp_path / "other.pth")
    assert named in str(err.value) and "\n" not in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="missing.pth does not exist"):
        load(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a torch checkpoint"):
        load(tmp_path / "junk.pth")
    torch.save({"state": {"w": torch.zeros(1)}, "epoch": 1}, tmp_path / "keyed.pth")
    with pytest.raises(UserError, match="no 'model' entry; it holds: epoch, state"):
        load(tmp_path / "keyed.pth")


def test_timm_names_fail_with_one_clear_line(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="'not_a_vit_xyz'.*unknown timm model"):
        build_encoder("vit_base_patch16", "not_a_vit_xyz")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="'vit_base_patch16_224.mae' could not be downloaded") as err:
        build_encoder("vit_base_patch16", "vit_base_patch16_224.mae")
    assert "\n" not in str(err.value)


def test_random_init_and_input_size(capsys):
    enc = build_encoder("vit_tiny_patch16", input_size=32, **TINY)
    assert "random-initialised encoder" in capsys.readouterr().out
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert enc.forward_tokens(images()).shape == (3, 17, 64)
    assert set(models_vit.MODELS) == {"vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16",
                                      "vit_large_patch16", "vit_huge_patch14", "vit_mini_patch8"}
    with pytest.raises(UserError, match="not divisible by the patch size 8"):
        build_encoder("vit_tiny_patch16", input_size=36, **TINY)
    with pytest.raises(UserError, match="unknown model"):
        build_encoder("resnet_nonsense")
