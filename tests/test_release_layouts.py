"""Release files of the rotary-embedding encoders (DINOv3, EVA02, PE, CAPI) and Franca, read without flags, each
against that release's own forward written out in tests/reference_vits.py (tokens and attention maps); the
layout detection of util/release_layouts; the loader's refusals, each with its own remedy.

Random weights saved in each official layout (key names, shapes and extra entries as the release's code saves
them); nothing downloads. BEYOND_CLS_DIFF_LOG=<file> collects the max abs differences per layout.
"""
import argparse

import numpy as np
import pytest
import reference_vits as ref
import torch
from test_models_vit import assert_matches, images

import models_vit
from cli import ENCODER_REMEDIES
from models_vit import build_encoder, capture_attention
from util import release_layouts
from util.errors import UserError, user_errors

SMALL = dict(embed_dim=64, depth=2, num_heads=2)


def check_attention(label, enc, x, expected):
    """Captured attention of every block = the release's own softmax."""
    with torch.no_grad(), capture_attention(enc) as cap:
        enc.forward_tokens(x)
    for i, attn in enumerate(expected):
        assert_matches(f"{label} attention block {i}", cap.records[i]["attn"], attn)


def check_tokens(label, enc, x, prenorm, normed):
    with torch.no_grad():
        assert_matches(label, enc.forward_tokens(x), prenorm)
        if normed is not None:
            enc.final_norm = True
            assert_matches(f"{label} final norm", enc.forward_tokens(x), normed)
            enc.final_norm = False


# ---------------------------------------------------------------- DINOv3

@pytest.mark.parametrize("model,swiglu", [("vit_small_patch16_dinov3_qkvb", False),
                                          ("vit_small_plus_patch16_dinov3_qkvb", True)])
def test_dinov3_release_matches_its_own_forward(tmp_path, model, swiglu, capsys):
    sd = ref.dinov3_state(swiglu=swiglu, ffn=6 if swiglu else 4)  # S+/16: ffn_ratio 6, SwiGLU
    torch.save(sd, tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    enc = build_encoder(model, str(tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"), input_size=48,
                        **SMALL)
    assert "loaded DINOv3 checkpoint" in capsys.readouterr().out
    assert (enc.num_prefix_tokens, enc.num_reg_tokens, enc.grid_size) == (5, 4, (3, 3))
    for size in (48, 64):  # rope follows any grid
        if size != 48:
            enc = build_encoder(model, str(tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
                                input_size=size, verbose=False, **SMALL)
        x = images(size)
        prenorm, normed, attns = ref.dinov3_forward(sd, x, 2)
        check_tokens(f"DINOv3 {model} {size}px", enc, x, prenorm, normed)
        check_attention(f"DINOv3 {size}px", enc, x, attns)


def test_dinov3_zero_biases_load_without_qkvb_and_nonzero_ones_are_refused(tmp_path, capsys):
    zero = ref.dinov3_state(qkv_bias=False)
    torch.save(zero, tmp_path / "zero.pth")
    enc = build_encoder("vit_small_patch16_dinov3", str(tmp_path / "zero.pth"), input_size=48, **SMALL)
    assert "has no attribute" not in capsys.readouterr().out  # timm's converter prints when it drops a bias
    x = images(48)
    prenorm, _, _ = ref.dinov3_forward(zero, x, 2)
    check_tokens("DINOv3 without qkv bias", enc, x, prenorm, None)
    torch.save(ref.dinov3_state(), tmp_path / "biased.pth")
    with pytest.raises(ValueError, match="non-zero qkv biases.*`_qkvb` variant"):
        build_encoder("vit_small_patch16_dinov3", str(tmp_path / "biased.pth"), input_size=48, **SMALL)
    torch.save(ref.dinov3_state(dim=768, heads=12, depth=1), tmp_path / "base.pth")
    with pytest.raises(ValueError, match="DINOv3 checkpoint .* needs its timm architecture .* pass "
                                         "vit_base_patch16_dinov3 or vit_base_patch16_dinov3_qkvb as --model"):
        build_encoder("vit_base_patch16", str(tmp_path / "base.pth"), input_size=48)


# ---------------------------------------------------------------- EVA02

@pytest.mark.parametrize("entry", ["module", "model"])
def test_eva02_release_matches_its_own_forward(tmp_path, entry, capsys):
    sd = ref.eva02_state()
    # DeepSpeed's model states (the released eva02_*_pt_*.pt) or the `model` entry of EVA's save_model
    extra = {"buffer_names": ["rope.freqs_cos"], "ds_version": "0.8.0"} if entry == "module" else \
        {"epoch": 3, "args": argparse.Namespace(model="eva02")}
    torch.save({entry: sd, **extra}, tmp_path / "eva02_B_pt_in21k_p14.pt")
    enc = build_encoder("eva02_base_patch14_224", str(tmp_path / "eva02_B_pt_in21k_p14.pt"), input_size=224,
                        **SMALL)
    summary = capsys.readouterr().out
    assert "loaded EVA02 checkpoint" in summary and f"sub-model '{entry}'" in summary
    x = images(224, batch=2)
    prenorm, normed, attns = ref.eva02_forward(sd, x, 2)
    check_tokens(f"EVA02 ({entry})", enc, x, prenorm, normed)
    check_attention("EVA02", enc, x, attns)


# ---------------------------------------------------------------- PE

@pytest.mark.parametrize("model,clip", [("vit_pe_core_tiny_patch16_384", True), ("vit_pe_core_tiny_patch16_384", False),
                                        ("vit_pe_spatial_tiny_patch16_512", False)])
def test_pe_release_matches_its_own_forward(tmp_path, model, clip, capsys):
    core = "core" in model
    sd = ref.pe_state(grid=24 if core else 32, ln_post=core)
    if clip:  # PE-Core-*.pt: the CLIP model, vision tower under visual.*, text tower beside it
        text = {"token_embedding.weight": torch.randn(50, 32), "positional_embedding": torch.randn(8, 32),
                "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32), "logit_scale": torch.ones([])}
        torch.save({**ref.prefixed("visual.", sd), **text}, tmp_path / "PE.pt")
    else:
        torch.save({"state_dict": sd}, tmp_path / "PE.pt")
    native = 384 if core else 512
    for size in (native, 256):
        enc = build_encoder(model, str(tmp_path / "PE.pt"), input_size=size, **SMALL)
        assert "loaded PE (Perception Encoder) checkpoint" in capsys.readouterr().out
        x = images(size, batch=2)
        prenorm, normed, attns = ref.pe_forward(sd, x, 2)
        check_tokens(f"PE {model} {size}px", enc, x, prenorm, normed)
        check_attention(f"PE {size}px", enc, x, attns)
    if not core:
        with pytest.raises(release_layouts.NoFinalNorm):
            build_encoder(model, str(tmp_path / "PE.pt"), input_size=native, final_norm=True, **SMALL)


# ---------------------------------------------------------------- CAPI

def test_capi_release_matches_its_own_forward(tmp_path, capsys):
    sd = ref.capi_state()
    torch.save(sd, tmp_path / "capi_vitl14_in1k.pth")
    enc = build_encoder("vit_large_patch14", str(tmp_path / "capi_vitl14_in1k.pth"), input_size=42, **SMALL)
    summary = capsys.readouterr().out
    assert "loaded CAPI checkpoint" in summary and "16 registers" in summary and "no [cls]" in summary
    x = images(42)
    prenorm, normed, attns = ref.capi_forward(sd, x, 2)
    check_tokens("CAPI", enc, x, prenorm, normed)
    check_attention("CAPI", enc, x, attns)
    with pytest.raises(ValueError, match="CAPI encoder, which timm has no architecture for"):
        build_encoder("vit_large_patch14_dinov2", str(tmp_path / "capi_vitl14_in1k.pth"), input_size=42, **SMALL)


# ---------------------------------------------------------------- Franca

def test_franca_release_matches_its_own_forward(tmp_path, capsys):
    sd = ref.franca_state()
    ref.save_franca(tmp_path / "franca_vitl14_Laion600M.pth", sd)
    enc = build_encoder("vit_large_patch14", str(tmp_path / "franca_vitl14_Laion600M.pth"), input_size=42, **SMALL)
    assert "DINO/iBOT/DINOv2 training checkpoint" in capsys.readouterr().out
    x = images(42)
    prenorm, normed = ref.franca_forward(sd, x, 2)
    check_tokens("Franca", enc, x, prenorm, normed)


# ---------------------------------------------------------------- issue 24: required keys, two layouts, remedies

def mae_file(path, **changes):
    sd = ref.vit_state(0)
    for key in changes.get("drop", ()):
        sd = {k: v for k, v in sd.items() if not (k == key or k.endswith(key))}
    torch.save({"model": sd, "epoch": 1}, path)
    return path


@pytest.mark.parametrize("drop,named", [(["pos_embed"], "pos_embed"),
                                        ([".attn.qkv.bias"], "blocks.0.attn.qkv.bias, blocks.1.attn.qkv.bias")])
def test_keys_the_preset_requires_must_be_present(tmp_path, drop, named):
    """Issue 24.1: a file without pos_embed, or without every qkv bias, built an encoder without them."""
    path = mae_file(tmp_path / "mae.pth", drop=drop)
    with pytest.raises(release_layouts.MissingKeys, match=f"lacks keys the vit_tiny_patch16 preset requires: {named}"):
        build_encoder("vit_tiny_patch16", str(path), input_size=32, patch_size=8, embed_dim=64, depth=2,
                      num_heads=2)
    sd = ref.beit_state(rel="shared")
    torch.save({"model": {k: v for k, v in sd.items() if not k.endswith("q_bias")}}, tmp_path / "beit.pth")
    with pytest.raises(release_layouts.MissingKeys, match="blocks.0.attn.q_bias, blocks.1.attn.q_bias"):
        build_encoder("vit_tiny_patch16", str(tmp_path / "beit.pth"), input_size=32, patch_size=8, embed_dim=64,
                      depth=2, num_heads=2)


def test_file_with_two_layouts_names_the_other(tmp_path, capsys):
    """Issue 24.14: MAE 'model' + MoCo v3 'state_dict', DINO 'teacher' + MAE 'model': the one taken and the
    other one are both named, and --checkpoint_key reads the other one in its own layout."""
    mae, moco = ref.vit_state(0), ref.vit_state(1)
    torch.save({"model": mae, "state_dict": ref.prefixed("module.base_encoder.", moco)}, tmp_path / "two.pth")
    x = images()
    enc = build_encoder("vit_tiny_patch16", str(tmp_path / "two.pth"), input_size=32, patch_size=8, embed_dim=64,
                        depth=2, num_heads=2)
    out = capsys.readouterr().out
    assert "MoCo v3 checkpoint" in out and "also holds a MAE encoder in 'model' (--checkpoint_key model" in out
    other = build_encoder("vit_tiny_patch16", str(tmp_path / "two.pth"), input_size=32, checkpoint_key="model",
                          patch_size=8, embed_dim=64, depth=2, num_heads=2)
    out = capsys.readouterr().out
    assert "loaded MAE checkpoint" in out and "sub-model 'model'" in out
    assert "also holds a MoCo v3 encoder in 'state_dict'" in out
    with torch.no_grad():
        assert_matches("two layouts: MoCo", enc.forward_tokens(x), ref.vit_forward(moco, x, 2))
        assert_matches("two layouts: MAE", other.forward_tokens(x), ref.vit_forward(mae, x, 2))
    torch.save({"teacher": ref.prefixed("backbone.", ref.vit_state(2)), "model": mae}, tmp_path / "dino_mae.pth")
    found = release_layouts.find_encoder(torch.load(tmp_path / "dino_mae.pth"), "dino_mae.pth")
    assert found.layout == "DINO/iBOT/DINOv2 training" and found.others == (("model", "MAE"),)


def test_mocov3_without_ddp_prefix(tmp_path, capsys):
    """Issue 24.14: a MoCo v3 file saved without DDP (no `module.`) could not be read at all."""
    base, momentum = ref.vit_state(20), ref.vit_state(21)
    torch.save({"epoch": 3, "state_dict": {**ref.prefixed("base_encoder.", base),
                                           **ref.prefixed("momentum_encoder.", momentum)}}, tmp_path / "moco.pth")
    x = images()
    for key, sd in ((None, base), ("base_encoder", base), ("momentum_encoder", momentum)):
        enc = build_encoder("vit_tiny_patch16", str(tmp_path / "moco.pth"), input_size=32, checkpoint_key=key,
                            patch_size=8, embed_dim=64, depth=2, num_heads=2)
        assert f"MoCo v3 checkpoint {tmp_path / 'moco.pth'}, sub-model '{key or 'base_encoder'}'" in \
            capsys.readouterr().out
        with torch.no_grad():
            assert_matches(f"MoCo v3 without module. ({key})", enc.forward_tokens(x), ref.vit_forward(sd, x, 2))


def remedy_of(build):
    """The `(what to do)` part of the one line the entry points print for build()'s error."""
    with pytest.raises(UserError) as err, user_errors(ENCODER_REMEDIES):
        build()
    return str(err.value).rsplit(" (", 1)[1]


def test_each_loader_error_has_its_own_remedy(tmp_path, monkeypatch):
    """Issue 24.15: one remedy ('pick the --model that matches...') was attached to every loader error."""
    tiny = dict(input_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    sd = ref.vit_state(0)
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith("norm.")}}, tmp_path / "nonorm.pth")
    torch.save([sd["pos_embed"]], tmp_path / "list.pth")
    torch.save(sd["pos_embed"], tmp_path / "tensor.pth")
    torch.save({"model": sd}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])
    monkeypatch.setattr(models_vit, "is_model_pretrained", lambda name: False)
    no_pos = mae_file(tmp_path / "no_pos.pth", drop=["pos_embed"])
    remedies = {
        "no final norm": remedy_of(lambda: build_encoder("vit_tiny_patch16", str(tmp_path / "nonorm.pth"),
                                                         final_norm=True, **tiny)),
        "timm tag without weights": remedy_of(lambda: build_encoder("vit_tiny_patch16", "vit_tiny_patch16_224.nope",
                                                                    **tiny)),
        "list": remedy_of(lambda: build_encoder("vit_tiny_patch16", str(tmp_path / "list.pth"), **tiny)),
        "tensor": remedy_of(lambda: build_encoder("vit_tiny_patch16", str(tmp_path / "tensor.pth"), **tiny)),
        "truncated": remedy_of(lambda: build_encoder("vit_tiny_patch16", str(tmp_path / "truncated.pth"), **tiny)),
        "missing keys": remedy_of(lambda: build_encoder("vit_tiny_patch16", str(no_pos), **tiny)),
        "another architecture": remedy_of(lambda: build_encoder("vit_small_patch16", str(tmp_path / "full.pth"),
                                                                input_size=32)),
    }
    assert remedies["no final norm"].startswith("drop --final_norm")
    assert "timm.list_pretrained()" in remedies["timm tag without weights"]
    assert remedies["list"] == remedies["tensor"] and "torch.save(model.state_dict(), path)" in remedies["list"]
    assert remedies["truncated"].startswith("copy or download the file again")
    assert "timm name of the checkpoint's architecture" in remedies["missing keys"]
    assert len(set(remedies.values())) == len(remedies) - 1, remedies  # list and tensor share theirs


def test_unreadable_files_are_named_for_what_they_are(tmp_path):
    torch.save({"model": ref.vit_state(0)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[:len(data) - 100])
    with pytest.raises(release_layouts.TruncatedCheckpoint, match="truncated.pth is a truncated torch checkpoint"):
        build_encoder("vit_tiny_patch16", str(tmp_path / "truncated.pth"))
    for obj, words in (([1, 2], "a list"), (torch.zeros(3), "a tensor"), (np.zeros(3), "a numpy array")):
        torch.save(obj, tmp_path / "x.pth")
        with pytest.raises(release_layouts.NotAStateDict, match=f"x.pth holds {words}, not a dict"):
            build_encoder("vit_tiny_patch16", str(tmp_path / "x.pth"))


def test_franca_at_224_resamples_its_table_as_franca_does(tmp_path):
    """Franca's ViT-L LAION is 518-trained (a 37x37 table) and probed at 224: DINOv2's own interpolation."""
    sd = ref.franca_state(grid=6)
    ref.save_franca(tmp_path / "franca.pth", sd)
    enc = build_encoder("vit_large_patch14", str(tmp_path / "franca.pth"), input_size=42, **SMALL)
    x = images(42)
    prenorm, normed = ref.franca_forward({**sd, "pos_embed": ref.dino_interpolate(sd["pos_embed"], 3, 3)}, x, 2)
    check_tokens("Franca 6x6 table at 3x3", enc, x, prenorm, normed)
