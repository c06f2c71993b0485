"""What probing costs on top of the frozen forward: img/s and peak memory of
    (a) the bare frozen forward: timm's own VisionTransformer.forward_features under torch.inference_mode,
    (t) engine_linprobe.FrozenTokens alone (the frozen path of the training loop, for diagnosis),
    (b) one probe's full train step, (c) 15 probes (cls, pos, abmilp x 5 lrs) in one step,
    (p) the step of (c) on precomputed tokens: the heads' own cost (diagnosis: c - t should be close to it).
Targets (issue 5): (b) >= 0.9x the img/s of (a); (c) <= 1.3x the step time of (b).

    python benchmarks/bench_linprobe.py                                  # CPU: vit_tiny_patch16, batch 32
    python benchmarks/bench_linprobe.py --model vit_base_patch16 --batch_size 256 --amp bfloat16

(b) and (c) run engine_linprobe.train_one_epoch over a list of identical batches, so they time the training
loop's own code (lr schedule, loss check, meters, LARS). The measurements alternate a, t, b, c, a, t, ... over
--rounds; the table shows medians, and each ratio is the median over rounds of that round's ratio, so drift in
a shared machine's speed hits both sides of a ratio alike.
Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the process's peak RSS (VmHWM in /proc/self/status,
reset before each measurement through /proc/self/clear_refs), which includes the weights and Python itself.
MFU: the encoder's forward FLOPs per second over the device's dense peak for the precision the matmuls run in
(--amp bfloat16/float16: the 16-bit peak; --amp none: the fp32 peak, or tf32 where torch allows TF32 matmuls).
Row (p) runs no encoder, so it has no MFU.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine_linprobe as engine  # noqa: E402
from config import ProbeSpec  # noqa: E402
from heads import HEADS, HeadOptions  # noqa: E402
from models_vit import MODELS, build_encoder  # noqa: E402
from util.amp import autocast  # noqa: E402
from util.dist import is_cuda  # noqa: E402
from util.lr_sched import WarmupCosine, scaled_lr  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser("Benchmark of multi-probe linear probing against the bare frozen forward")
    p.add_argument("--model", default="vit_tiny_patch16", choices=sorted(MODELS))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--nb_classes", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["none", "bfloat16", "float16"], default="none")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder's forward in every measurement")
    p.add_argument("--iters", type=int, default=3, help="steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each measurement before the rounds")
    p.add_argument("--rounds", type=int, default=9, help="alternating rounds; medians are reported")
    p.add_argument("--heads", default="cls,pos,abmilp", help="heads of (c); (b) trains the first one (`learned`: "
                   "abmilp, then every other learned head of heads.HEADS without the _all variants)")
    p.add_argument("--blr", default="0.01,0.03,0.1,0.3,1.0", help="base lrs of (c); (b) uses the first one")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="dense peak TFLOP/s of the device in the precision of --amp, for MFU (default: from "
                        "PEAK_TFLOPS for the GPUs listed there; otherwise no MFU)")
    p.add_argument("--output", default=None, help="default: benchmarks/results-<device>.json")
    return p.parse_args()


def vit_forward_flops(encoder):
    """FLOPs (2 per multiply-add) of one image's forward: patch embedding plus, per block, the qkv/proj/MLP
    matmuls (24 T D^2 with MLP ratio 4) and the two attention matmuls (4 T^2 D)."""
    d, n = encoder.embed_dim, encoder.grid_size[0] * encoder.grid_size[1]
    t = n + encoder.num_prefix_tokens
    hidden = encoder.blocks[0].mlp.fc1.out_features
    per_block = 2 * t * d * (3 * d + d + 2 * hidden) + 4 * t * t * d
    return 2 * n * d * 3 * encoder.patch_size ** 2 + encoder.depth * per_block


# Dense peak TFLOP/s per GPU (vendor datasheets, without sparsity), by the matmuls' precision.
PEAK_TFLOPS = {
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.0},
    "H100": {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9},  # SXM
    "H200": {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5},
}


def matmul_precision(amp, tf32):
    """The precision the encoder's matmuls run in: the autocast dtype, else tf32 or float32."""
    return amp if amp != "none" else ("tf32" if tf32 else "float32")


def peak_tflops(name, precision):
    """The dense peak for a device name (the first PEAK_TFLOPS key it contains), or None if it is not listed."""
    key = next((key for key in PEAK_TFLOPS if key in name), None)
    return None if key is None else PEAK_TFLOPS[key][precision]


def mfu(flops_per_image, img_per_s, peak):
    """Model FLOP utilisation: achieved FLOP/s over the peak (TFLOP/s); None without a peak."""
    return None if not peak else flops_per_image * img_per_s / (peak * 1e12)


def summarize(labels, seconds, peaks, batch_size, flops, peak):
    """Per row: median img/s and ms/step over the rounds, peak memory, and MFU (None for (p), which runs no
    encoder: the encoder's FLOPs would score it, wrongly, far above the others; None without a peak)."""
    results = {}
    for key, label in labels.items():
        step = statistics.median(seconds[key])
        results[key] = {"label": label, "img_per_s": batch_size / step, "ms_per_step": 1000 * step,
                        "peak_mib": peaks[key], "ms_per_step_rounds": [1000 * s for s in seconds[key]],
                        "mfu": None if key == "p" else mfu(flops, batch_size / step, peak)}
    return results


def device_name(device):
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{models[0] if models else platform.processor()} ({os.cpu_count()} cores)"


class PeakMemory:
    """Peak memory (MiB) of what runs between reset() and read(), on `device` (not the current CUDA device)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")

    def read(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        return kib / 1024


def probe_setup(bench, encoder, heads, blrs):
    """Probes, optimizer, schedule and FrozenTokens built by the engine's own functions, as main_linprobe does."""
    heads, blrs = heads.split(","), [float(b) for b in blrs.split(",")]
    specs = tuple(ProbeSpec(f"{h}_blr{b:g}", h, scaled_lr(b, bench.batch_size), f"blr{b:g}") for h in heads
                  for b in blrs)
    probes = engine.build_probe_set(specs, encoder, bench.nb_classes, HeadOptions(), seed=0).to(bench.device)
    optimizer = engine.build_optimizer(probes, specs, "lars", weight_decay=0.0)
    tokens_fn = engine.FrozenTokens(encoder, device=bench.device, amp=bench.amp,
                                    need_attention=any(HEADS[h].needs_attention for h in heads),
                                    need_blocks=max(HEADS[h].needs_blocks for h in heads), compile=bench.compile)
    return WarmupCosine(epochs=10, warmup_epochs=1), probes, optimizer, tokens_fn


def main(bench):
    torch.manual_seed(0)
    device = bench.device
    encoder = build_encoder(bench.model, input_size=bench.input_size, verbose=False).to(device)
    images = torch.randn(bench.batch_size, 3, bench.input_size, bench.input_size, device=device)
    targets = torch.randint(0, bench.nb_classes, (bench.batch_size,), device=device)
    bare = partial(VisionTransformer.forward_features, encoder)  # timm's own, not ViTEncoder's override
    if bench.compile:
        bare = torch.compile(bare)

    if bench.heads == "learned":
        bench.heads = ",".join(["abmilp"] + [h for h, spec in HEADS.items()
                                             if spec.learned and h != "abmilp" and not h.endswith("_all")])
    first_head, first_blr = bench.heads.split(",")[0], bench.blr.split(",")[0]
    one = probe_setup(bench, encoder, first_head, first_blr)
    many = probe_setup(bench, encoder, bench.heads, bench.blr)

    def run_bare(n):
        with torch.inference_mode(), autocast(device, bench.amp):
            for _ in range(n):
                bare(images)

    def run_tokens(n):
        for _ in range(n):
            one[3](images)

    def run_train(setup, n, tokens_fn=None):
        schedule, probes, optimizer, frozen = setup
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # the loop's progress bar
            engine.train_one_epoch(tokens_fn or frozen, probes, [(images, targets)] * n, optimizer, no_scaling, 0,
                                   schedule=schedule, device=device, amp=bench.amp)

    no_scaling = torch.amp.GradScaler(device.split(":")[0], enabled=bench.amp == "float16")
    precomputed = many[3](images)  # for (p): what the heads alone cost, without the encoder

    n_probes = len(many[1].names)
    cases = {"a": ("(a) bare frozen forward", run_bare),
             "t": ("(t) FrozenTokens only", run_tokens),
             "b": (f"(b) 1 probe train step ({one[1].names[0]})", partial(run_train, one)),
             "c": (f"(c) {n_probes} probes train step", partial(run_train, many)),
             "p": (f"(p) {n_probes} probes, tokens precomputed",
                   partial(run_train, many, tokens_fn=lambda _: precomputed))}
    memory = PeakMemory(device)
    sync = memory.sync
    for _, fn in cases.values():
        fn(bench.warmup)
    seconds = {key: [] for key in cases}
    peaks = {key: 0.0 for key in cases}
    for _ in range(bench.rounds):
        for key, (_, fn) in cases.items():
            sync()
            memory.reset()
            start = time.perf_counter()
            fn(bench.iters)
            sync()
            seconds[key].append((time.perf_counter() - start) / bench.iters)
            peaks[key] = max(peaks[key], memory.read())

    flops = vit_forward_flops(encoder)
    precision = matmul_precision(bench.amp, torch.backends.cuda.matmul.allow_tf32)
    peak = bench.peak_tflops or (peak_tflops(device_name(device), precision) if is_cuda(device) else None)
    if peak is None and is_cuda(device):
        print(f"note: no {precision} peak known for {device_name(device)}: pass --peak_tflops for MFU")
    labels = {key: label for key, (label, _) in cases.items()}
    results = summarize(labels, seconds, peaks, bench.batch_size, flops, peak)
    # Each ratio pairs measurements of the same round (same machine load), then takes the median over rounds.
    ratios = {"b_over_a_img_per_s": statistics.median(a / b for a, b in zip(seconds["a"], seconds["b"])),
              "c_over_b_step_time": statistics.median(c / b for c, b in zip(seconds["c"], seconds["b"]))}
    report = {"date": datetime.date.today().isoformat(), "device": device_name(device),
              "torch": torch.__version__, "timm": timm.__version__, "args": vars(bench),
              "mfu_peak_tflops": peak, "mfu_precision": precision,
              "forward_gflops_per_image": flops / 1e9, "results": results, "ratios": ratios,
              "targets_met": {"b_over_a_img_per_s >= 0.9": ratios["b_over_a_img_per_s"] >= 0.9,
                              "c_over_b_step_time <= 1.3": ratios["c_over_b_step_time"] <= 1.3}}
    print_table(bench, report)
    output = bench.output or Path(__file__).parent / f"results-{device.split(':')[0]}.json"
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"written {output}")


def print_table(bench, report):
    print(f"{bench.model}, batch {bench.batch_size}, {bench.input_size}px, amp {bench.amp}, "
          f"compile {bench.compile}, {report['device']}, {report['date']}; medians of {bench.rounds} rounds "
          f"x {bench.iters} steps; {report['forward_gflops_per_image']:.2f} GFLOP/image forward")
    cuda = is_cuda(bench.device)
    memory = "peak alloc MiB" if cuda else "peak RSS MiB"
    show_mfu = report["mfu_peak_tflops"] is not None
    if show_mfu:
        print(f"MFU: encoder forward FLOPs over the {report['mfu_precision']} peak of "
              f"{report['mfu_peak_tflops']:g} TFLOP/s")
    print(f"{'measurement':40s} {'img/s':>9s} {'ms/step':>9s} {memory:>15s}" + (f" {'MFU':>6s}" if show_mfu else ""))
    for row in report["results"].values():
        shown = "" if not show_mfu else "      -" if row["mfu"] is None else f" {100 * row['mfu']:5.1f}%"
        print(f"{row['label']:40s} {row['img_per_s']:9.1f} {row['ms_per_step']:9.2f} {row['peak_mib']:15.0f}" + shown)
    ratios, met = report["ratios"], list(report["targets_met"].values())
    print(f"b/a img/s     {ratios['b_over_a_img_per_s']:.3f}  (target >= 0.9: {'met' if met[0] else 'MISSED'})")
    print(f"c/b step time {ratios['c_over_b_step_time']:.3f}  (target <= 1.3: {'met' if met[1] else 'MISSED'})")


if __name__ == "__main__":
    main(parse_args())
