"""The 37 backbones of the peer's benchmark (github billpsomas/efficient-probing README), each by the `--model`
we read it with: built on the meta device at the row's image size (shapes only: no weights, no download), its
tokens and its last block's captured attention. Prints the markdown rows of the README's backbone table.

    python benchmarks/peer_backbones.py

What each release *file* gives (tokens and attention against the release's own forward, on random weights in
its official layout) is tested in tests/test_release_layouts.py and tests/test_models_vit.py.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models_vit  # noqa: E402

# (peer row, --model, image size, what --finetune reads: a release file's layout or a timm pretrained tag)
ROWS = [
    ("DINOv3 ViT-7B/16", "vit_7b_patch16_dinov3", 224, "DINOv3 file `dinov3_vit7b16_pretrain_lvd1689m-*.pth`"),
    ("MetaCLIP2 ViT-bigG/14-378", "vit_gigantic_patch14_clip_378", 378, "timm `.metaclip2_worldwide`"),
    ("EVA02-CLIP E-14-plus", "eva02_enormous_patch14_clip_224", 224, "timm `.laion2b_plus`"),
    ("EVA02-CLIP E-14", "eva02_enormous_patch14_clip_224", 224, "timm `.laion2b`"),
    ("SigLIP2 SO400M/14", "vit_so400m_patch14_siglip_224", 224, "timm `.v2_webli`"),
    ("PE-Core L-14/336", "vit_pe_core_large_patch14_336", 336, "PE file `PE-Core-L14-336.pt`, or timm `.fb`"),
    ("MetaCLIP2 ViT-bigG/14", "vit_gigantic_patch14_clip_224", 224, "timm `.metaclip2_worldwide`"),
    ("SigLIP2 ViT-L/16", "vit_large_patch16_siglip_256", 256, "timm `.v2_webli`"),
    ("DINOv3 ViT-L/16", "vit_large_patch16_dinov3", 224, "DINOv3 file `dinov3_vitl16_pretrain_lvd1689m-*.pth`"),
    ("AIMv2 ViT-L/14", "aimv2_large_patch14_224", 224, "timm `.apple_pt`"),
    ("SigLIP ViT-L/16", "vit_large_patch16_siglip_256", 256, "timm `.webli`"),
    ("DINOv2 ViT-L/14", "vit_large_patch14_dinov2", 224, "DINOv2 file `dinov2_vitl14_pretrain.pth`"),
    ("Franca ViT-L/14", "vit_large_patch14", 224, "DINOv2-training file `franca_vitl14_Laion600M.pth` (teacher)"),
    ("DINOv3 ViT-B/16", "vit_base_patch16_dinov3", 224, "DINOv3 file `dinov3_vitb16_pretrain_lvd1689m-*.pth`"),
    ("DINOv2 ViT-B/14", "vit_base_patch14_dinov2", 224, "DINOv2 file `dinov2_vitb14_pretrain.pth`"),
    ("RADIO ViT-L/16", None, 224, "RADIO v2.5 (NVlabs/RADIO hub code) is not in timm"),
    ("EVA02 ViT-L/14", "eva02_large_patch14_224", 224, "EVA02 file `eva02_L_pt_in21k_p14.pt`, or timm `.mim_in22k`"),
    ("CLIP ViT-L/14", "vit_large_patch14_clip_224", 224, "timm `.openai`"),
    ("CAPI ViT-L/14", "vit_large_patch14", 224, "CAPI file `capi_vitl14_in1k.pth`", "capi"),
    ("BEiTv2 ViT-B/16", "vit_base_patch16", 224, "BEiT-v2 file `beitv2_base_patch16_224_pt1k.pth`"),
    ("RADIO ViT-B/16", None, 224, "RADIO v2.5 (NVlabs/RADIO hub code) is not in timm"),
    ("iBOT ViT-L/16", "vit_large_patch16", 224, "iBOT file `checkpoint_teacher.pth`"),
    ("Hiera ViT-H/16", "hiera_huge_224", 224, "timm `.mae`"),
    ("MAE ViT-L/16", "vit_large_patch16", 224, "MAE file `mae_pretrain_vit_large.pth`"),
    ("I-JEPA ViT-H/14", "vit_huge_patch14", 224, "I-JEPA file `IN1K-vit.h.14-300e.pth.tar`"),
    ("iBOT ViT-B/16", "vit_base_patch16", 224, "iBOT file `checkpoint_teacher.pth`"),
    ("Hiera ViT-L/16", "hiera_large_224", 224, "timm `.mae`"),
    ("CLIP ViT-B/16", "vit_base_patch16_clip_224", 224, "timm `.openai`"),
    ("DINO ViT-B/16", "vit_base_patch16", 224, "DINO file `dino_vitbase16_pretrain.pth`"),
    ("MoCov3 ViT-B/16", "vit_base_patch16_mocov3", 224, "MoCo v3 file `vit-b-300ep.pth.tar`"),
    ("Hiera ViT-B/16", "hiera_base_224", 224, "timm `.mae`"),
    ("MAE ViT-B/16", "vit_base_patch16", 224, "MAE file `mae_pretrain_vit_base.pth`"),
    ("MaskFeat ViT-B/16", "vit_base_patch16", 224, "MaskFeat's file: layout not seen (an MAE-style `model` loads)"),
    ("MaskFeat ViT-L/16", "vit_large_patch16", 224, "MaskFeat's file: layout not seen (an MAE-style `model` loads)"),
    ("SimMIM ViT-B/16", "vit_base_patch16", 224, "SimMIM file `simmim_pretrain__vit_base__img224__800ep.pth`"),
    ("MAE ViT-S/16", "vit_small_patch16", 224, "MAE file"),
    ("DiT-XL/2", "DiT-XL/2", 256, "refused"),
]


def measure(model, size, family=None):
    """'tokens (1, T, D), attention (1, H, T, T)' on the meta device, or the one-line refusal."""
    try:
        with torch.device("meta"):
            if family == "capi":  # the encoder a CAPI file builds into the preset
                spec = models_vit.architecture(model)
                encoder = models_vit._capi_encoder({**models_vit.MAE_DEFAULTS, **spec}, {"reg_tokens": 16},
                                                   dict(img_size=size, num_classes=0, global_pool=""), model, False)
            else:
                encoder = models_vit.build_encoder(model, input_size=size, verbose=False)
            images = torch.empty(1, 3, size, size)
            with models_vit.capture_attention(encoder, blocks=[-1]) as cap:
                tokens = encoder.forward_tokens(images)
        return f"tokens {tuple(tokens.shape)}, attention {tuple(cap.records[-1]['attn'].shape)}"
    except ValueError as err:
        return f"refused: {err}"


def main():
    print("| # | peer row | `--model` | `--finetune` reads | built at the row's size (meta device) |")
    print("|---:|---|---|---|---|")
    for i, (row, model, size, reads, *family) in enumerate(ROWS, 1):
        measured = "not built: no reader" if model is None else measure(model, size, *family)
        print(f"| {i} | {row} | {f'`{model}`' if model else '—'} | {reads} | {measured} |")


if __name__ == "__main__":
    main()
