"""benchmarks/bench_linprobe.py's arithmetic: FLOPs against torch's own counter, MFU by hand, which peak is used,
and that the CUDA memory and timing calls act on the benchmarked device."""
import importlib.util

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from helpers import ROOT
from models_vit import build_encoder

spec = importlib.util.spec_from_file_location("bench_linprobe", ROOT / "benchmarks" / "bench_linprobe.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize("model", ["vit_tiny_patch16", "vit_base_patch16"])
def test_forward_flops_equal_torch_flop_counter(model):
    # torch counts every matmul and convolution of timm's forward (2 FLOPs per multiply-add); the fused CPU
    # attention kernel is not in its table, so the blocks compute attention with explicit matmuls here.
    encoder = build_encoder(model, verbose=False).eval()
    for block in encoder.blocks:
        block.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        VisionTransformer.forward_features(encoder, torch.randn(1, 3, 224, 224))
    assert bench.vit_forward_flops(encoder) == counter.get_total_flops()
    if model == "vit_base_patch16":
        assert round(counter.get_total_flops() / 1e9, 1) == 35.1  # the figure BENCHMARKS.md quotes


def test_mfu_scores_encoder_rows_only_against_the_peak_of_the_precision_used():
    # 4 images a step: (a) 0.1 s, (p) 0.01 s. MFU of (a) at 35.1 GFLOP/image on a 989.4 TFLOP/s peak:
    # 35.1e9 * 40 img/s / 989.4e12 = 1.419e-3. (p) runs no encoder: no MFU, though it is 10x faster.
    seconds = {"a": [0.1, 0.2, 0.1], "p": [0.01, 0.01, 0.02]}
    rows = bench.summarize({"a": "(a)", "p": "(p)"}, seconds, {"a": 1.0, "p": 1.0}, 4, 35.1e9, 989.4)
    assert rows["a"]["img_per_s"] == pytest.approx(40.0) and rows["p"]["img_per_s"] == pytest.approx(400.0)
    assert rows["a"]["mfu"] == pytest.approx(35.1e9 * 40 / 989.4e12)
    assert rows["p"]["mfu"] is None
    assert bench.summarize({"a": "(a)"}, seconds, {"a": 1.0}, 4, 35.1e9, None)["a"]["mfu"] is None
    # --amp none runs float32 matmuls (tf32 only where torch allows it): their peak, not bf16's
    h100 = "NVIDIA H100 80GB HBM3"
    assert bench.peak_tflops(h100, bench.matmul_precision("bfloat16", False)) == 989.4
    assert bench.peak_tflops(h100, bench.matmul_precision("none", False)) == 66.9
    assert bench.peak_tflops(h100, bench.matmul_precision("none", True)) == 494.7
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert bench.peak_tflops("NVIDIA GeForce RTX 4090", "bfloat16") is None  # not listed: --peak_tflops


def test_peak_memory_and_sync_act_on_the_benchmarked_device(monkeypatch):
    calls = []
    for name in ("reset_peak_memory_stats", "max_memory_allocated", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, name=name: calls.append((name, args)) or 0)
    memory = bench.PeakMemory("cuda:1")
    memory.sync()
    memory.reset()
    memory.read()
    assert calls == [(name, (torch.device("cuda:1"),)) for name in
                     ("synchronize", "reset_peak_memory_stats", "max_memory_allocated")]
