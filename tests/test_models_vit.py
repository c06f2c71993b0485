"""models_vit: every release layout against that release's own forward, capture on every family, strictness, errors.

The references (tests/reference_vits.py) are each release's forward written out in plain torch, fed random
weights saved under the release's own key names and file layout; no layout flag is passed to the loader.
Set BEYOND_CLS_DIFF_LOG=<file> to collect the measured max abs differences per layout.
"""
import argparse
import os
from functools import partial

import huggingface_hub
import pytest
import reference_vits as ref
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import eva as timm_eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import models_vit
from helpers import fake_yacs_cfgnode, forget_fake_yacs
from models_vit import architecture, build_encoder, capture_attention
from util.release_layouts import NonFiniteWeights

TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)  # overrides for vit_tiny_patch16
TINY14 = dict(embed_dim=64, depth=2, num_heads=2)  # overrides for the patch-14 DINOv2 names
TOL = 1e-5


def images(size=32, batch=3):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def load(path, model="vit_tiny_patch16", size=32, **kwargs):
    arch = TINY if model == "vit_tiny_patch16" else {}
    return build_encoder(model, str(path), input_size=size, **{**arch, **kwargs})


def assert_matches(layout, tokens, expected):
    """Max abs difference below TOL; logged per layout when BEYOND_CLS_DIFF_LOG names a file."""
    assert tokens.shape == expected.shape
    diff = (tokens - expected).abs().max().item()
    if os.environ.get("BEYOND_CLS_DIFF_LOG"):
        with open(os.environ["BEYOND_CLS_DIFF_LOG"], "a") as f:
            f.write(f"{layout}\t{diff:.3g}\n")
    assert diff < TOL, (layout, diff)


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


def timm_tokens(net, x, block=None):
    t = net._pos_embed(net.patch_embed(x))
    for blk in net.blocks[: None if block is None else block + 1]:
        t = blk(t)
    return t


# ---------------------------------------------------------------- MAE, timm state dicts

@pytest.mark.parametrize("prefix", ["", "module."])
def test_mae_checkpoint_matches_reference(tmp_path, prefix, capsys):
    sd = ref.vit_state(0)
    state = {prefix + k: v for k, v in sd.items()}
    state.update({"mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.randn(32, 64),
                  "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_pred.weight": torch.randn(192, 32)})
    torch.save({"model": state, "epoch": 7, "args": argparse.Namespace(lr=0.1)}, tmp_path / "mae.pth")
    enc = load(tmp_path / "mae.pth")
    assert "loaded MAE checkpoint" in capsys.readouterr().out
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert (enc.num_prefix_tokens, enc.patch_size, enc.grid_size, enc.embed_dim, enc.depth) == (1, 8, (4, 4), 64, 2)
    x = images()
    with torch.no_grad():
        tokens = enc.forward_tokens(x)
        assert_matches("MAE", tokens, ref.vit_forward(sd, x, 2))
        assert_matches("MAE block 0", enc.forward_tokens(x, block=0), ref.vit_forward(sd, x, 2, blocks=1))
        assert torch.equal(enc.forward_tokens(x, block=-1), tokens)
        enc.final_norm = True
        assert_matches("MAE final norm", enc.forward_tokens(x), ref.vit_forward(sd, x, 2, final_norm=True))
    for block in (2, -3, 12):
        with pytest.raises(ValueError, match=f"block {block} does not exist in a 2-block encoder"):
            enc.block_index(block)


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
        assert_matches("timm resampled", enc.forward_tokens(x), timm_tokens(dynamic, x))


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "beitv2_base_patch16_224"])
def test_timm_architecture_name_and_its_state_dict(tmp_path, name):
    """A timm name as the architecture; a file of timm's own state dict of it; timm's own forward as reference."""
    arch = dict(embed_dim=64, depth=2, num_heads=2) | ({} if "dinov2" in name else {"patch_size": 8})
    size = 42 if "dinov2" in name else 32
    torch.manual_seed(3)
    net = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **arch).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(net.state_dict(), tmp_path / "timm.pth")
    enc = build_encoder(name, str(tmp_path / "timm.pth"), input_size=size, **arch)
    x = images(size)
    with torch.no_grad():
        enc.final_norm = True
        assert_matches(f"timm {name}", enc.forward_tokens(x), net.forward_features(x))


# ---------------------------------------------------------------- DINO, iBOT

def test_dino_training_checkpoint_takes_the_teacher(tmp_path, capsys):
    teacher, student = ref.vit_state(10), ref.vit_state(11)
    ref.save_dino_training(tmp_path / "dino.pth", teacher, student)
    enc = load(tmp_path / "dino.pth")
    summary = capsys.readouterr().out
    assert "DINO/iBOT/DINOv2 training checkpoint" in summary and "sub-model 'teacher'" in summary
    x = images()
    with torch.no_grad():
        assert_matches("DINO teacher", enc.forward_tokens(x), ref.vit_forward(teacher, x, 2))
        student_enc = load(tmp_path / "dino.pth", checkpoint_key="student")
        assert_matches("DINO student", student_enc.forward_tokens(x), ref.vit_forward(student, x, 2))
    torch.save(teacher, tmp_path / "dino_deitsmall8_pretrain.pth")  # DINO's released backbone: a bare state dict
    with torch.no_grad():
        assert_matches("DINO released backbone", load(tmp_path / "dino_deitsmall8_pretrain.pth").forward_tokens(x),
                       ref.vit_forward(teacher, x, 2))


def test_ibot_training_checkpoint_with_layer_scale_and_ddp_teacher(tmp_path):
    teacher, student = ref.vit_state(12, layer_scale="gamma"), ref.vit_state(13, layer_scale="gamma")
    ref.save_dino_training(tmp_path / "ibot.pth", teacher, student, ibot=True, ddp_teacher=True)
    x = images()
    with torch.no_grad():
        assert_matches("iBOT teacher", load(tmp_path / "ibot.pth").forward_tokens(x), ref.vit_forward(teacher, x, 2))
    # iBOT's released backbones (checkpoint_teacher.pth): {'state_dict': the teacher backbone}
    torch.save({"state_dict": teacher}, tmp_path / "checkpoint_teacher.pth")
    with torch.no_grad():
        assert_matches("iBOT released backbone", load(tmp_path / "checkpoint_teacher.pth").forward_tokens(x),
                       ref.vit_forward(teacher, x, 2))


# ---------------------------------------------------------------- MoCo v3

def test_mocov3_checkpoint_takes_the_base_encoder_without_projector(tmp_path, capsys):
    assert architecture("vit_small_patch16_mocov3")["num_heads"] == 12  # MoCo v3's ViT-S, unlike timm's 6
    mocov3_tiny = dict(patch_size=8, embed_dim=48, depth=2)  # keeps the preset's 12 heads
    base, momentum = ref.vit_state(20, dim=48, pos="sincos"), ref.vit_state(21, dim=48, pos="sincos")
    ref.save_mocov3(tmp_path / "moco.pth.tar", base, momentum)
    enc = build_encoder("vit_small_patch16_mocov3", str(tmp_path / "moco.pth.tar"), input_size=32, **mocov3_tiny)
    assert "MoCo v3 checkpoint" in capsys.readouterr().out and enc.blocks[0].attn.num_heads == 12
    x = images()
    with torch.no_grad():
        assert_matches("MoCo v3 base encoder", enc.forward_tokens(x), ref.vit_forward(base, x, 12))
        momentum_enc = build_encoder("vit_small_patch16_mocov3", str(tmp_path / "moco.pth.tar"), input_size=32,
                                     checkpoint_key="momentum_encoder", **mocov3_tiny)
        assert_matches("MoCo v3 momentum encoder", momentum_enc.forward_tokens(x), ref.vit_forward(momentum, x, 12))


# ---------------------------------------------------------------- I-JEPA

@pytest.mark.parametrize("model", ["vit_tiny_patch16", "vit_huge_patch14_gap_224"])
def test_ijepa_checkpoint_takes_the_target_encoder_without_cls(tmp_path, model, capsys):
    context = ref.vit_state(30, cls=False, pos="sincos")
    target = ref.vit_state(31, cls=False, pos="sincos")
    ref.save_ijepa(tmp_path / "IN1K-vit.h.14-300e.pth.tar", context, target)
    path = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    enc = load(path, model, **({} if model == "vit_tiny_patch16" else TINY))
    assert "I-JEPA checkpoint" in capsys.readouterr().out
    assert (enc.num_prefix_tokens, enc.has_class_token) == (0, False)  # recognised from the file: no flag
    x = images()
    with torch.no_grad():
        assert_matches(f"I-JEPA target encoder ({model})", enc.forward_tokens(x), ref.vit_forward(target, x, 2))
        context_enc = load(path, model, checkpoint_key="encoder", **({} if model == "vit_tiny_patch16" else TINY))
        assert_matches("I-JEPA context encoder", context_enc.forward_tokens(x), ref.vit_forward(context, x, 2))
    with pytest.raises(ValueError, match="has no 'predictr' entry; it holds: encoder"):
        load(path, checkpoint_key="predictr")


# ---------------------------------------------------------------- DINOv2

def dinov2_state(registers):
    return ref.vit_state(40 + registers, patch=14, grid=3, registers=registers, layer_scale="ls") | {
        "mask_token": torch.zeros(1, 64)}


@pytest.mark.parametrize("model,registers", [("vit_small_patch14_reg4_dinov2", 4), ("vit_small_patch14_dinov2", 0),
                                             ("vit_tiny_patch16", 4)])
def test_dinov2_bare_state_dict(tmp_path, model, registers, capsys):
    sd = dinov2_state(registers)
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    arch = TINY14 if "dinov2" in model else dict(TINY14, patch_size=14)  # the preset takes the rest from the file
    enc = build_encoder(model, str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"), input_size=42, **arch)
    assert "DINOv2 checkpoint" in capsys.readouterr().out
    assert (enc.num_prefix_tokens, enc.num_reg_tokens, enc.grid_size) == (1 + registers, registers, (3, 3))
    x = images(42)
    with torch.no_grad():
        assert_matches(f"DINOv2 {registers} registers ({model})", enc.forward_tokens(x), ref.vit_forward(sd, x, 2))
        enc.final_norm = True
        assert_matches("DINOv2 final norm", enc.forward_tokens(x), ref.vit_forward(sd, x, 2, final_norm=True))


def test_dinov2_registers_get_no_position_at_another_input_size(tmp_path):
    # [cls] keeps its own position; the patch table is resampled as DINOv2's own forward does (3x3 -> 4x4 and,
    # shrinking like DINOv2's 37x37 table at 224 px, 6x6 -> 3x3)
    for size, stored in ((56, 3), (42, 6)):
        sd = ref.vit_state(44, patch=14, grid=stored, registers=4, layer_scale="ls")
        sd["mask_token"] = torch.zeros(1, 64)
        torch.save(sd, tmp_path / "dinov2.pth")
        enc = build_encoder("vit_small_patch14_reg4_dinov2", str(tmp_path / "dinov2.pth"), input_size=size, **TINY14)
        x = images(size)
        with torch.no_grad():
            assert_matches(f"DINOv2 resampled {stored}->{size // 14}", enc.forward_tokens(x),
                           ref.vit_forward(sd, x, 2, pos_embed=ref.dino_interpolate(sd["pos_embed"], size // 14,
                                                                                   size // 14)))


def test_dinov2_training_teacher_with_chunked_blocks(tmp_path):
    sd = dinov2_state(4)
    ref.save_dinov2_teacher_chunked(tmp_path / "teacher_checkpoint.pth", sd)
    enc = build_encoder("vit_small_patch14_reg4_dinov2", str(tmp_path / "teacher_checkpoint.pth"), input_size=42,
                        **TINY14)
    x = images(42)
    with torch.no_grad():
        assert_matches("DINOv2 training teacher", enc.forward_tokens(x), ref.vit_forward(sd, x, 2))


# ---------------------------------------------------------------- SimMIM, BEiT

@pytest.mark.parametrize("rel,abs_pos", [("shared", False), ("block", True), ("none", True)])
def test_simmim_checkpoint_matches_reference(tmp_path, rel, abs_pos, capsys, monkeypatch):
    sd = ref.beit_state(rel=rel, abs_pos=abs_pos)
    wrapped = {"encoder." + k: v for k, v in sd.items()}
    wrapped.update({"decoder.0.weight": torch.randn(192, 64, 1, 1), "decoder.0.bias": torch.randn(192)})
    # SimMIM also pickles its yacs config, which loads as plain data without yacs (util.checkpoint's allow-list)
    config = fake_yacs_cfgnode(tmp_path, monkeypatch)({"MODEL": {"TYPE": "vit"}})
    torch.save({"model": wrapped, "config": config}, tmp_path / "simmim.pth")
    forget_fake_yacs(tmp_path, monkeypatch)
    enc = load(tmp_path / "simmim.pth")  # recognised without the SimMIM switch
    assert "SimMIM checkpoint" in capsys.readouterr().out
    x = images()
    with torch.no_grad():
        assert_matches(f"SimMIM rel={rel} abs={abs_pos}", enc.forward_tokens(x), ref.beit_forward(sd, x, 2, 4))
        enc.final_norm = True
        assert_matches("SimMIM final norm", enc.forward_tokens(x), ref.beit_forward(sd, x, 2, 4, final_norm=True))
    assert load(tmp_path / "simmim.pth", simmim=True).depth == 2  # the old switch still works


def test_beitv2_pretraining_checkpoint(tmp_path, capsys):
    sd = ref.beit_state(3, rel="shared")
    ref.save_beitv2_pretraining(tmp_path / "beitv2_base_patch16_224_pt1k.pth", sd)
    for model, arch in (("vit_tiny_patch16", {}), ("beitv2_base_patch16_224", TINY)):
        enc = load(tmp_path / "beitv2_base_patch16_224_pt1k.pth", model, **arch, **(
            {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False} if model.startswith("beit") else {}))
        assert "BEiT/BEiT-v2 checkpoint" in capsys.readouterr().out
        x = images()
        with torch.no_grad():
            assert_matches(f"BEiT-v2 pretraining ({model})", enc.forward_tokens(x), ref.beit_forward(sd, x, 2, 4))


def test_relative_bias_resized_for_new_grid(tmp_path):
    torch.save({"model": {"encoder." + k: v for k, v in ref.beit_state().items()}}, tmp_path / "s.pth")
    enc = load(tmp_path / "s.pth", size=48)
    assert enc.rel_pos_bias.relative_position_bias_table.shape == (11 * 11 + 3, 2)
    assert enc.forward_tokens(images(48)).shape == (3, 37, 64)


# ---------------------------------------------------------------- attention capture

def attention_branch(blk, t, attn):
    """The block's attention branch rebuilt from captured probabilities and the block's own weights."""
    B, T, D = t.shape
    heads = attn.shape[1]
    x = blk.norm1(t)
    if hasattr(blk.attn, "q_bias"):  # timm Beit: q/v bias only, layer scale gamma_1
        qkv = nn.functional.linear(x, blk.attn.qkv.weight,
                                   torch.cat([blk.attn.q_bias, torch.zeros(D), blk.attn.v_bias]))
        scale = blk.gamma_1
    else:
        qkv, scale = blk.attn.qkv(x), blk.ls1.gamma if hasattr(blk.ls1, "gamma") else 1.0
    v = qkv.reshape(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)[2]
    return scale * blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, T, D))


def mlp_branch(blk, t):
    scale = blk.gamma_2 if hasattr(blk, "gamma_2") else blk.ls2.gamma if hasattr(blk.ls2, "gamma") else 1.0
    return scale * blk.mlp(blk.norm2(t))


def check_capture_reproduces_blocks(enc, x, tokens):
    with torch.no_grad():
        fused = enc.forward_tokens(x)
        with capture_attention(enc) as cap:
            captured = enc.forward_tokens(x)
        assert torch.equal(fused, captured)
        t, _ = enc._embed(x)
        for i, blk in enumerate(enc.blocks):
            rec = cap.records[i]
            attn = rec["attn"]
            assert attn.dtype == torch.float32 and attn.shape == (len(x), 2, tokens, tokens)
            assert (attn.sum(-1) - 1).abs().max() < 1e-6
            assert (rec["resid_norm"] - t.norm(dim=-1)).abs().max() < TOL
            branch = attention_branch(blk, t, attn)
            assert (rec["attn_out_norm"] - branch.norm(dim=-1)).abs().max() < TOL
            t = t + branch
            t = t + mlp_branch(blk, t)
            assert (rec["out"] - t).abs().max() < TOL
        assert torch.equal(cap.records[-1]["out"], captured)


def test_capture_reproduces_block_outputs_mae(tmp_path):
    torch.save(timm_vit().state_dict(), tmp_path / "timm.pth")
    enc = load(tmp_path / "timm.pth")
    assert enc.blocks[0].attn.fused_attn  # the normal path really is SDPA
    check_capture_reproduces_blocks(enc, images(), 17)


@pytest.mark.parametrize("rel", ["shared", "block"])
def test_capture_reproduces_block_outputs_relative_bias(tmp_path, rel):
    torch.save({"model": {"encoder." + k: v for k, v in ref.beit_state(rel=rel).items()}}, tmp_path / "s.pth")
    check_capture_reproduces_blocks(load(tmp_path / "s.pth"), images(), 17)


def test_capture_reproduces_block_outputs_registers(tmp_path):
    torch.save(dinov2_state(4), tmp_path / "reg.pth")
    enc = build_encoder("vit_small_patch14_reg4_dinov2", str(tmp_path / "reg.pth"), input_size=42, **TINY14)
    check_capture_reproduces_blocks(enc, images(42), 1 + 4 + 9)


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
    with pytest.raises(ValueError, match="block 5 does not exist"), capture_attention(enc, blocks=[5]):
        pass


# ---------------------------------------------------------------- strictness and errors

@pytest.mark.parametrize("change,named", [
    ({"depth": 3}, "unexpected: blocks.2."),
    ({"embed_dim": 96}, "patch_embed.proj.weight (96, 3, 8, 8) vs (64, 3, 8, 8)")])
def test_other_architecture_fails_naming_keys(tmp_path, change, named):
    torch.save({"model": timm_vit(**change).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(ValueError) as err:
        load(tmp_path / "other.pth")
    assert named in str(err.value) and "does not fit vit_tiny_patch16" in str(err.value)
    assert "\n" not in str(err.value) and "--" not in str(err.value)


@pytest.mark.parametrize("model,arch,named", [
    ("vit_tiny_patch16", TINY, "patch_embed.proj.weight (64, 3, 14, 14) vs (64, 3, 8, 8)"),  # DINOv2 into patch 8
    ("vit_small_patch14_dinov2", TINY14, "unexpected: register_tokens")])  # registers into a model without
def test_recognised_layout_that_does_not_fit_names_keys_and_shapes(tmp_path, model, arch, named):
    torch.save(dinov2_state(4), tmp_path / "dinov2.pth")
    with pytest.raises(ValueError) as err:
        build_encoder(model, str(tmp_path / "dinov2.pth"), input_size=56, **arch)
    message = str(err.value)
    assert f"DINOv2 checkpoint {tmp_path / 'dinov2.pth'}" in message and named in message, message
    assert "looks like embed_dim 64, patch 14, depth 2, [cls], 4 registers" in message and "\n" not in message


def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path):
    sd = ref.vit_state(0)
    sd["blocks.1.attn.qkv.weight"][0, :2] = float("nan")
    sd["norm.bias"][3] = float("inf")
    torch.save({"model": sd}, tmp_path / "diverged.pth")
    with pytest.raises(NonFiniteWeights, match=r"non-finite weights: norm\.bias \(0 NaN, 1 inf\), "
                                               r"blocks\.1\.attn\.qkv\.weight \(2 NaN, 0 inf\)"):
        load(tmp_path / "diverged.pth")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        load(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a torch or safetensors checkpoint"):
        load(tmp_path / "junk.pth")
    torch.save({"state": {"w": torch.zeros(1)}, "epoch": 1}, tmp_path / "keyed.pth")
    with pytest.raises(ValueError, match=r"no encoder of a known release layout; it holds: state \(a dict of 1 "
                                         r"entries\), epoch \(an int\)"):
        load(tmp_path / "keyed.pth")
    with pytest.raises(ValueError, match="has no 'model' entry; it holds: state"):
        load(tmp_path / "keyed.pth", checkpoint_key="model")
    torch.save({"model": torch.zeros(3), "epoch": 1}, tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match=r"'model' of .*tensor.pth holds a tensor of shape \(3,\), not a state dict"):
        load(tmp_path / "tensor.pth", checkpoint_key="model")
    torch.save({"model": [1, 2], "epoch": 1}, tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"it holds: model \(a list\), epoch \(an int\)"):
        load(tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a SimMIM/BEiT checkpoint"):
        torch.save({"model": ref.vit_state(0)}, tmp_path / "mae.pth")
        load(tmp_path / "mae.pth", simmim=True)


def test_no_cls_token_is_recognised_and_checked(tmp_path):
    net = timm_vit(class_token=False)
    torch.save(net.state_dict(), tmp_path / "nocls.pth")
    enc = load(tmp_path / "nocls.pth")
    x = images()
    with torch.no_grad():
        assert_matches("timm without [cls]", enc.forward_tokens(x), timm_tokens(net, x))
    assert load(tmp_path / "nocls.pth", no_cls_token=True).num_prefix_tokens == 0
    torch.save(timm_vit().state_dict(), tmp_path / "cls.pth")
    with pytest.raises(ValueError, match=r"has a \[cls\] token"):
        load(tmp_path / "cls.pth", no_cls_token=True)


@pytest.fixture
def fake_timm_hub(monkeypatch):
    """timm.create_model whose 'pretrained' weights are a fixed tiny ViT: the download path without a network."""
    real = timm.create_model
    pretrained_net = timm_vit()

    def create_model(name, pretrained=False, **kwargs):
        net = real(name, pretrained=False, **{**kwargs, **TINY})
        if pretrained:
            net.load_state_dict(pretrained_net.state_dict())
        return net
    models_vit._timm_architecture.cache_clear()
    monkeypatch.setattr(models_vit.timm, "create_model", create_model)
    yield pretrained_net
    models_vit._timm_architecture.cache_clear()


def test_timm_pretrained_name_copies_weights_and_checks_sizes(fake_timm_hub):
    enc = build_encoder("vit_tiny_patch16", "vit_base_patch16_224.mae", input_size=32, **TINY)
    x = images()
    with torch.no_grad():
        assert_matches("timm pretrained name", enc.forward_tokens(x), timm_tokens(fake_timm_hub, x))
    with pytest.raises(ValueError, match="num_heads 2 vs 4"):
        build_encoder("vit_tiny_patch16", "vit_base_patch16_224.mae", input_size=32, **{**TINY, "num_heads": 4})


def test_timm_names_fail_with_one_clear_line(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="'not_a_vit_xyz'.*unknown timm model"):
        build_encoder("vit_base_patch16", "not_a_vit_xyz")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'vit_base_patch16_224.mae' could not be downloaded") as err:
        build_encoder("vit_base_patch16", "vit_base_patch16_224.mae")
    assert "\n" not in str(err.value)


def test_architecture_of_presets_and_timm_names_without_weights():
    assert architecture("vit_tiny_patch16") == dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                                                    mlp_ratio=4.0, qkv_bias=True, family=None, class_token=None,
                                                    reg_tokens=None, img_size=None, source="preset")
    reg = architecture("vit_small_patch14_reg4_dinov2")
    assert {k: reg[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "class_token", "reg_tokens",
                                "img_size", "family")} == dict(patch_size=14, embed_dim=384, depth=12, num_heads=6,
                                                               class_token=True, reg_tokens=4, img_size=518,
                                                               family="vit")
    assert architecture("vit_huge_patch14_gap_224")["class_token"] is False
    assert architecture("beitv2_base_patch16_224")["family"] == "beit"
    with pytest.raises(ValueError, match="unknown model 'resnet_nonsense'"):
        architecture("resnet_nonsense")
    assert architecture("eva02_base_patch14_224")["family"] == "eva"
    hiera = architecture("hiera_base_224")
    assert (hiera["family"], hiera["patch_size"], hiera["embed_dim"], hiera["depth"]) == ("hiera", 32, 768, 24)
    aimv2 = architecture("aimv2_large_patch14_224")  # SwiGLU: was an AttributeError traceback
    assert (aimv2["class_token"], aimv2["mlp_ratio"]) == (False, 2816 / 1024)
    with pytest.raises(ValueError, match="'samvit_base_patch16' is built from VisionTransformerSAM"):
        architecture("samvit_base_patch16")
    with pytest.raises(ValueError, match="Block blocks of DiffAttention"):
        architecture("vit_dwee_patch16_reg1_gap_256")
    for name, kind in (("vit_base_patch16_xp_224", "ParallelScalingBlock blocks;"),  # blocks without .attn
                       ("vit_small_patch16_18x2_224", "ParallelThingsBlock blocks;"),
                       ("vit_relpos_small_patch16_224", "VisionTransformerRelPos with RelPosBlock"),
                       ("hieradet_small", "HieraDet with MultiScaleBlock"), ("DiT-XL/2", "diffusion transformer")):
        with pytest.raises(ValueError, match=kind):
            architecture(name)


def test_random_init_and_input_size(capsys):
    enc = build_encoder("vit_tiny_patch16", input_size=32, **TINY)
    assert "random-initialised encoder" in capsys.readouterr().out
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert enc.forward_tokens(images()).shape == (3, 17, 64)
    assert {"vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14",
            "vit_small_patch16_mocov3", "vit_base_patch16_mocov3"} <= set(models_vit.MODELS)
    assert build_encoder("vit_tiny_patch16", input_size=32, no_cls_token=True, **TINY).num_prefix_tokens == 0
    reg = build_encoder("vit_small_patch14_reg4_dinov2", input_size=28, **TINY14)
    assert reg.forward_tokens(images(28)).shape == (3, 1 + 4 + 4, 64)
    with pytest.raises(ValueError, match="input size 36 is not a positive multiple of the patch size 8"):
        build_encoder("vit_tiny_patch16", input_size=36, **TINY)
    with pytest.raises(ValueError, match="unknown model"):
        build_encoder("resnet_nonsense")


# ---------------------------------------------------------------- timm's Eva, Hiera, NaFlexVit, AIMv2 by name

SMALL = dict(embed_dim=64, depth=2, num_heads=2)
TIMM_FAMILIES = [  # (timm name, size overrides, input size): one of each attention/rope/norm variant
    ("vit_small_patch16_dinov3_qkvb", SMALL, 48),  # DINOv3: rope (half rotation), registers, q/v bias, layer scale
    ("vit_small_patch16_dinov3", SMALL, 48),  # DINOv3 without qkv bias
    ("eva02_tiny_patch14_224", SMALL, 42),  # EVA02: interleaved rope over [cls]-less patches, packed SwiGLU
    ("eva02_base_patch14_224", SMALL, 42),  # separate q/k/v, SwiGLU with its inner norm
    ("eva02_base_patch16_clip_224", SMALL, 48),  # EVA02-CLIP: norm inside attention
    ("eva02_enormous_patch14_clip_224", SMALL, 42),  # post-norm blocks
    ("vit_pe_core_tiny_patch16_384", SMALL, 48),  # PE-Core: AttentionRope, pre-norm, [cls] without rope
    ("vit_pe_spatial_tiny_patch16_512", SMALL, 48),  # PE-Spatial: no final norm
    ("vit_small_patch16_rope_mixed_224", SMALL, 48),  # a rotary embedding per block
    ("aimv2_large_patch14_224", dict(SMALL, num_heads=4), 42),  # AIMv2: SwiGLU, RMSNorm, no [cls]
    ("hiera_tiny_224", dict(embed_dim=16, num_heads=1, stages=(1, 1, 2, 2)), 64),  # Hiera: last stage
    ("hiera_small_abswin_256", dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 2)), 64),  # windowed abs pos
    ("naflexvit_base_patch16_gap", SMALL, 48),  # NaFlexVit on plain images
]


def perturbed(net, seed=0):
    """Every parameter moved off timm's init (zero biases, 1e-5 layer scales would hide swapped keys)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.5 * noise) if "gamma" in name else p.add_(0.1 * noise)
    return net


def softmax_seen_by(attn_module, run):
    """The probabilities timm's own non-fused path of `attn_module` feeds to its attn_drop during run()."""
    seen = []
    handle = attn_module.attn_drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    attn_module.fused_attn = False
    try:
        run()
    finally:
        attn_module.fused_attn = True
        handle.remove()
    return seen[0]


def attention_output_with(attn_module, probabilities, run):
    """(the module's own output, its output when its non-fused softmax is replaced by `probabilities`)."""
    outputs = []
    hook = attn_module.register_forward_hook(lambda m, args, out: outputs.append(out))
    run()
    replace = attn_module.attn_drop.register_forward_hook(lambda m, args, out: probabilities.to(out.dtype))
    attn_module.fused_attn = False
    try:
        run()
    finally:
        attn_module.fused_attn = True
        replace.remove()
        hook.remove()
    return outputs


def module_io(module, run):
    """(input, output) of `module` during run()."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    run()
    handle.remove()
    return seen[0]


def hiera_attention(attn_module, x):
    """Hiera's global MaskUnitAttention written out: (probabilities, output)."""
    B, T, _ = x.shape
    q, k, v = attn_module.qkv(x).reshape(B, T, 3, attn_module.heads, -1).permute(2, 0, 3, 1, 4)
    p = ((q * attn_module.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return p, attn_module.proj((p @ v).transpose(1, 2).reshape(B, T, -1))


def check_capture_is_the_blocks_softmax(enc, x, label):
    """Captured attention = the softmax timm's own code computes, and attn @ v through the module's own
    projection gives the module's own (fused) output; capturing changes no token."""
    with torch.no_grad():
        fused = enc.forward_tokens(x)
        with capture_attention(enc) as cap:
            captured = enc.forward_tokens(x)
        assert torch.equal(fused, captured)
        blocks = range(enc.first_attention_block, enc.depth)
        assert sorted(cap.records) == list(blocks)
        tokens = enc.num_prefix_tokens + enc.grid_size[0] * enc.grid_size[1]
        for i in blocks:
            attn = cap.records[i]["attn"]
            assert attn.dtype == torch.float32 and attn.shape == (len(x), enc.blocks[i].attn.num_heads, tokens, tokens)
            module = enc.blocks[i].attn
            if enc.family == "hiera":
                seen_input, own = module_io(module, lambda: enc.forward_tokens(x))
                expected, output = hiera_attention(module, seen_input)
                assert (output - own).abs().max() < TOL, label
            else:
                expected = softmax_seen_by(module, lambda: enc.forward_tokens(x))
                own, replaced = attention_output_with(module, attn, lambda: enc.forward_tokens(x))
                assert (replaced - own).abs().max() < TOL, (label, i, (replaced - own).abs().max())
            diff = (attn - expected).abs().max().item()
            assert diff < 1e-6, (label, i, diff)
            run = lambda: enc.forward_tokens(x)  # noqa: E731
            branch, _ = module_io(enc.blocks[i].drop_path1, run)  # what the block adds from its attention
            block_in, block_out = module_io(enc.blocks[i], run)
            rec = cap.records[i]
            assert (rec["attn_out_norm"] - branch.norm(dim=-1)).abs().max() < TOL, label
            assert (rec["resid_norm"] - block_in.norm(dim=-1)).abs().max() < TOL and torch.equal(rec["out"], block_out)


@pytest.mark.parametrize("name,arch,size", TIMM_FAMILIES, ids=[t[0] for t in TIMM_FAMILIES])
def test_timm_family_tokens_blocks_and_attention(name, arch, size):
    """Random weights of each family by its timm name: tokens = timm's own forward_features and
    forward_intermediates (for --return_block), --final_norm = timm's norm, capture = the block's softmax."""
    torch.manual_seed(0)
    enc = perturbed(build_encoder(name, input_size=size, verbose=False, **arch))
    reference = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", img_size=size, **arch)
    reference.load_state_dict(enc.state_dict())
    reference.eval()
    x = images(size)
    with torch.no_grad():
        if enc.family == "hiera":
            assert_matches(f"timm {name}", enc.forward_tokens(x), reference.forward_features(x))
            stage = reference.forward_intermediates(x, indices=[enc.first_grid_block], coarse=False,
                                                    output_fmt="NHWC", intermediates_only=True)[0]
            assert_matches(f"timm {name} first last-stage block", enc.forward_tokens(x, block=enc.first_grid_block),
                           stage.flatten(1, 2))
            with pytest.raises(ValueError, match=r"block 0 of this hiera encoder is not one whose tokens are its "
                                                 r"final 2x2 patch grid \(use blocks"):
                enc.forward_tokens(x, block=0)
            with pytest.raises(ValueError, match="whose attention runs over"):
                capture_attention(enc, blocks=[enc.first_grid_block]).__enter__()
            with pytest.raises(ValueError, match="Hiera normalises only its pooled vector"):
                build_encoder(name, input_size=size, verbose=False, final_norm=True, **arch)
        else:
            enc.final_norm = True
            assert_matches(f"timm {name}", enc.forward_tokens(x), reference.forward_features(x))
            enc.final_norm = False
            if enc.family != "naflex":
                middle = reference.forward_intermediates(x, indices=[0], return_prefix_tokens=True, norm=False,
                                                         output_fmt="NLC", intermediates_only=True)[0]
                patches, prefix = middle if isinstance(middle, tuple) else (middle, middle[:, :0])
                assert_matches(f"timm {name} block 0", enc.forward_tokens(x, block=0),
                               torch.cat([prefix, patches], dim=1))
    check_capture_is_the_blocks_softmax(enc, x, name)


def test_grouped_query_attention_capture():
    """Eva's AttentionRope with fewer k/v heads than q heads (Sapiens2): k repeated per group, as timm does."""
    net = timm_eva.Eva(img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_kv_heads=2,
                       qkv_fused=False, attn_type="rope", use_rot_pos_emb=True, use_abs_pos_emb=False,
                       num_classes=0, global_pool="")
    enc = perturbed(models_vit._as_encoder(net, "gqa"))
    check_capture_is_the_blocks_softmax(enc.eval(), images(48), "GQA")


def test_captured_attention_is_float32_under_bf16_autocast(tmp_path):
    """Issue 26: under bf16 autocast the scores were rounded to bf16 (steps of 0.125 near 25) before the
    softmax; now q, k, scores and softmax are float32, matching the fp32 softmax of the block's own q and k."""
    net = timm_vit()
    with torch.no_grad():
        for blk in net.blocks:  # sharpened attention: scores of tens, where bf16 rounding costs percents
            blk.attn.qkv.weight[:128] *= 15.0
    torch.save(net.state_dict(), tmp_path / "sharp.pth")
    enc = load(tmp_path / "sharp.pth")
    x = images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with capture_attention(enc) as cap:
            enc.forward_tokens(x)
        inputs = [module_io(blk.attn, lambda: enc.forward_tokens(x))[0] for blk in enc.blocks]
    worst = 0.0
    for i, (blk, seen) in enumerate(zip(enc.blocks, inputs)):
        B, T, D = seen.shape
        qkv = nn.functional.linear(seen.float(), blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, _ = qkv.reshape(B, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        scores = (q * (D // 2) ** -0.5) @ k.transpose(-2, -1)
        assert scores.abs().max() > 20  # really sharpened
        attn = cap.records[i]["attn"]
        worst = max(worst, (attn.float() - scores.softmax(-1)).abs().max().item())
        assert attn.dtype == torch.float32
    assert worst < 1e-5, worst


def test_a_file_that_is_only_code_is_refused_as_such_not_as_a_wrong_layout(tmp_path):
    """A pickle whose top level is an object asking to run code: the loader says what it asked to run (the
    remedy is about trust), not that the file holds 'an object' of no known layout."""
    import subprocess

    from helpers import RunsCode
    from util.checkpoint import UnsafeCheckpoint
    marker = tmp_path / "code_ran"
    torch.save(RunsCode(subprocess.call, ["touch", str(marker)]), tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpoint, match="subprocess.call"):
        build_encoder("vit_tiny_patch16", str(tmp_path / "evil.pth"), input_size=32, verbose=False)
    assert not marker.exists()
