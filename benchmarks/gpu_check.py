"""What only a GPU can show (issues 23 and 26), one section per call, each appending to one Markdown file.

    bash benchmarks/gpu_check.sh [RESULTS.md]               # every section in order; under 8 minutes on one GPU
    python benchmarks/gpu_check.py SECTION --output RESULTS.md

Each section writes a heading, what it measured and a verdict line `**pass**` / `**FAIL**` (or `skipped: why`).
Without CUDA the sections that need it say "skipped"; the others run on small models so that the script itself
is exercised on a CPU machine. Nothing is downloaded: random-init encoders, the shipped MAE checkpoint, the
generated digits_clutter and scikit-learn's bundled digits.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import engine_linprobe as engine  # noqa: E402
from config import ProbeSpec  # noqa: E402
from heads import HeadOptions, TokenBatch  # noqa: E402
from models_vit import build_encoder, capture_attention  # noqa: E402
from util.amp import autocast  # noqa: E402
from util.lr_sched import WarmupCosine  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MAE_MINI = ROOT / "checkpoints" / "mae_mini_clutter.pth"
# Tolerances, stated once (a ViT's bf16 forward rounds every matmul input to 8 significant bits).
TOKENS_REL_L2 = 0.05         # bf16 vs fp32 tokens: ||t16 - t32|| / ||t32|| per image, worst image
FEATURE_CORRELATION = 0.99   # bf16 vs fp32 pooled features, per channel across images (what BatchNorm sees)
CAPTURE_FP32_REL = 1e-4      # fp32 block output recomputed from captured probabilities vs the fused block
DDP_REL_L2 = 1e-4            # SyncBatchNorm DDP heads vs one process with the whole batch (relative L2)


class Report:
    def __init__(self, path):
        self.path = Path(path)

    def __call__(self, *lines):
        text = "\n".join(lines) + "\n"
        print(text, end="", flush=True)
        with open(self.path, "a") as f:
            f.write(text)

    def verdict(self, ok, what):
        self(f"{'**pass**' if ok else '**FAIL**'}: {what}", "")
        return ok


def skipped(report, why):
    report(f"skipped: {why}", "")


def python():
    return sys.executable


def torchrun(nproc, *args, timeout=240):
    return subprocess.run([python(), "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(free_port()), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_lines(done):
    return [line for line in (done.stderr + done.stdout).splitlines() if line.startswith("error: ")]


def digits_args(output_dir, *extra):
    return ["--data_path", "digits", "--model", "vit_tiny_patch16", "--input_size", "32", "--num_workers", "0",
            "--batch_size", "64", "--epochs", "1", "--warmup_epochs", "1", "--blr", "50", "--output_dir",
            str(output_dir), *extra]


def mae_mini_images(n):
    """The shipped MAE encoder (real, trained weights) and n digits_clutter validation images."""
    from util.data import build_dataset
    encoder = build_encoder("vit_mini_patch8", str(MAE_MINI), input_size=64, verbose=False).eval()
    dataset = build_dataset("digits_clutter", "val", 64, augment=False)
    images = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
    return encoder, images


# ---------------------------------------------------------------------------------------------------- sections

def header(report):
    if CUDA:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device = f"{names[0]} ({len(names)} GPU(s)), CUDA {torch.version.cuda}"
    else:
        device = f"no CUDA device: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    import timm
    report(f"## GPU check, {datetime.date.today().isoformat()}: {device}", "",
           f"torch {torch.__version__}, timm {timm.__version__}, `bash benchmarks/gpu_check.sh`", "")


def bf16_tokens(report):
    """bf16 autocast tokens and pooled features against the fp32 forward of the same encoder."""
    report("### bf16 autocast tokens vs fp32",
           f"tolerance: worst image's relative L2 of the tokens < {TOKENS_REL_L2}; pooled [cls]/mean features "
           f"correlate > {FEATURE_CORRELATION} with fp32 in every channel (across images, what BatchNorm sees)", "")
    cases = [("MAE vit_mini_patch8 (shipped), 256 digits_clutter val images", *mae_mini_images(256))]
    model, n = ("vit_base_patch16", 64) if CUDA else ("vit_tiny_patch16", 16)
    torch.manual_seed(0)
    cases.append((f"{model} random init, {n} N(0,1) images", build_encoder(model, verbose=False).eval(),
                  torch.randn(n, 3, 224, 224)))
    ok = True
    for name, encoder, images in cases:
        encoder, images = encoder.to(DEVICE), images.to(DEVICE)
        with torch.inference_mode():
            t32 = encoder.forward_tokens(images).double()
            with autocast(DEVICE, "bfloat16"):
                t16 = encoder.forward_tokens(images)
            dtype, t16 = t16.dtype, t16.double()
        rel = ((t16 - t32).flatten(1).norm(dim=1) / t32.flatten(1).norm(dim=1)).max().item()
        prefix = encoder.num_prefix_tokens
        worst = {}
        for kind, a, b in (("cls", t32[:, 0], t16[:, 0]), ("mean", t32[:, prefix:].mean(1), t16[:, prefix:].mean(1))):
            a, b = a - a.mean(0), b - b.mean(0)
            corr = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-300)
            worst[kind] = corr.min().item()
        passed = rel < TOKENS_REL_L2 and min(worst.values()) > FEATURE_CORRELATION
        ok &= passed
        report(f"- {name}: tokens {dtype} from autocast; worst relative L2 {rel:.3g}; worst channel "
               f"correlation [cls] {worst['cls']:.5f}, mean {worst['mean']:.5f} ({'ok' if passed else 'OUT'})")
    report("")
    return report.verdict(ok, "bf16 tokens within tolerance of fp32")


def _keep_input(store, module, args):
    store["x"] = args[0]


def _recompute_block(block, x, probs):
    """timm's ViT Block output for input x, its attention taken from `probs` instead of its own q, k."""
    attn = block.attn
    B, T, C = x.shape
    h = block.norm1(x)
    v = attn.qkv(h).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    o = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, -1)
    o = attn.norm(o)
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(h).sigmoid()
    y = x + block.ls1(attn.proj(o))
    return y + block.ls2(block.mlp(block.norm2(y)))


def attention_capture(report):
    """The probabilities capture_attention records are the ones the fused (SDPA) block used."""
    report("### fused attention vs captured attention",
           "the last block's output recomputed from the captured probabilities (same precision) against the "
           "fused block's own output; bf16 is judged against what bf16 costs anyway (fused bf16 vs fp32 block); "
           f"fp32 tolerance: max abs diff < {CAPTURE_FP32_REL} x max |output|", "")
    model = "vit_base_patch16" if CUDA else "vit_tiny_patch16"
    torch.manual_seed(0)
    cases = [("MAE vit_mini_patch8 (shipped)", *mae_mini_images(64)),
             (f"{model} random init", build_encoder(model, verbose=False).eval(), torch.randn(16, 3, 224, 224))]
    ok = True
    for name, encoder, images in cases:
        encoder, images = encoder.to(DEVICE), images.to(DEVICE)
        last = encoder.depth - 1
        block = encoder.blocks[last]
        inputs = {}
        hook = block.register_forward_pre_hook(partial(_keep_input, inputs))
        diffs = {}
        try:
            for amp in ("none", "bfloat16"):
                with torch.inference_mode(), autocast(DEVICE, amp):
                    with capture_attention(encoder, blocks=[last]) as cap:
                        encoder.forward_tokens(images)
                    record = cap.records[last]
                    fused, x = record["out"].float(), inputs["x"]
                    recomputed = _recompute_block(block, x, record["attn"]).float()
                with torch.inference_mode():
                    reference = block(x.float()).float()  # the whole block in fp32
                scale = reference.abs().max().item()
                diffs[amp] = ((fused - recomputed).abs().max().item() / scale,
                              (fused - reference).abs().max().item() / scale, str(record["attn"].dtype))
        finally:
            hook.remove()
        fp32_ok = diffs["none"][0] < CAPTURE_FP32_REL
        bf16_ok = diffs["bfloat16"][0] <= 2 * diffs["bfloat16"][1] + CAPTURE_FP32_REL
        ok &= fp32_ok and bf16_ok
        report(f"- {name}: fp32 recomputed vs fused {diffs['none'][0]:.2e} of max |out| "
               f"({'ok' if fp32_ok else 'OUT'}); bf16 recomputed vs fused {diffs['bfloat16'][0]:.2e}, "
               f"fused bf16 vs fp32 block {diffs['bfloat16'][1]:.2e} ({'ok' if bf16_ok else 'OUT'}); "
               f"captured dtype {diffs['bfloat16'][2]}")
    report("")
    return report.verdict(ok, "captured probabilities reproduce the fused block")


SYNC_TOKENS, SYNC_STEPS = 32, 3


def _sync_setup():
    """MAE-scale tokens (a [cls] of mean 1000, spread 0.1) and three probes, the same on every process."""
    torch.manual_seed(0)
    tokens = torch.randn(SYNC_TOKENS, 5, 64)
    tokens[:, 0] = 1000 + 0.1 * tokens[:, 0]
    targets = torch.randint(0, 10, (SYNC_TOKENS,))
    encoder = SimpleNamespace(embed_dim=64, grid_size=(2, 2), num_prefix_tokens=1, has_class_token=True)
    specs = tuple(ProbeSpec(f"{h}_lr0.1", h, 0.1, "lr0.1") for h in ("cls", "pos", "abmilp"))
    probes = engine.build_probe_set(specs, encoder, 10, HeadOptions(head_init="mae"), seed=0)
    return tokens, targets, specs, probes


def _sync_train(probes, model, specs, tokens, targets, device):
    optimizer = engine.build_optimizer(probes, specs, "lars", 0.0)
    tokens, targets = tokens.to(device), targets.to(device)
    tokens_fn = lambda idx: TokenBatch(tokens=tokens[idx.to(device)], num_prefix=1, grid=(2, 2), has_cls=True)
    loader = [(idx, targets[idx]) for idx in [torch.arange(len(targets))] * SYNC_STEPS]
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with open(os.devnull, "w") as null:
        stderr, sys.stderr = sys.stderr, null
        try:
            engine.train_one_epoch(tokens_fn, model, loader, optimizer, scaler, 0, schedule=WarmupCosine(10, 0),
                                   device=device)
        finally:
            sys.stderr = stderr
    return {k: v.detach().cpu() for k, v in probes.state_dict().items()}


def syncbn_worker(report, reference):
    """Under torchrun: main_linprobe's DDP wrapping (SyncBatchNorm on CUDA) on each rank's slice of the batch."""
    import main_linprobe
    from util import dist
    device = dist.process_device("cuda")
    dist.init_distributed(device)
    rank, world = dist.rank(), dist.world_size()
    tokens, targets, specs, probes = _sync_setup()
    probes = probes.to(device)
    model = main_linprobe._wrap_for_ddp(probes, device)
    converted = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    shard = slice(rank * SYNC_TOKENS // world, (rank + 1) * SYNC_TOKENS // world)
    state = _sync_train(model.module, model, specs, tokens[shard], targets[shard], device)
    if rank == 0:
        want = torch.load(reference, weights_only=True)
        rel = max((state[k] - want[k]).double().norm().item() / max(want[k].double().norm().item(), 1e-30)
                  for k in want if k.endswith("classifier.weight"))
        print(json.dumps({"world": world, "converted": converted, "relative_l2": rel}), flush=True)
    dist.cleanup_distributed()


def syncbn(report):
    report("### SyncBatchNorm under torchrun",
           f"main_linprobe's DDP wrapping on NCCL, {SYNC_STEPS} LARS steps of cls/pos/abmilp probes on a [cls] of "
           "mean 1000 and spread 0.1, each process on its slice of 32 tokens, against one process on all 32 without "
           f"DDP; tolerance: classifier relative L2 < {DDP_REL_L2}", "")
    if not CUDA:
        return skipped(report, "no CUDA device (the gloo path is tests/test_resume_ddp.py's DDP parity test)")
    with tempfile.TemporaryDirectory() as tmp:
        tokens, targets, specs, probes = _sync_setup()
        reference = Path(tmp) / "reference.pth"
        torch.save(_sync_train(probes.cuda(), probes, specs, tokens, targets, "cuda"), reference)
        ok = True
        for world in [1, 2][:min(2, torch.cuda.device_count())]:
            done = torchrun(world, Path(__file__), "syncbn_worker", "--reference", reference, "--output", os.devnull)
            found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not found:
                ok = False
                report(f"- {world} process(es): exit {done.returncode}", "```", done.stderr[-1500:], "```")
                continue
            result = found[0]
            passed = result["converted"] == 3 and result["relative_l2"] < DDP_REL_L2
            ok &= passed
            report(f"- {world} process(es): {result['converted']} SyncBatchNorm layers, classifier relative L2 "
                   f"{result['relative_l2']:.2e} ({'ok' if passed else 'OUT'})")
    if torch.cuda.device_count() < 2:
        report("- 2 processes: skipped, one GPU")
    report("")
    return report.verdict(ok, "SyncBatchNorm DDP equals one process")


def bench(report):
    report("### ViT-B/16 probe step vs the bare bf16 forward (benchmarks/bench_linprobe.py)", "")
    if CUDA:
        args = ["--model", "vit_base_patch16", "--batch_size", "256", "--amp", "bfloat16", "--device", "cuda",
                "--rounds", "3", "--iters", "3", "--warmup", "2"]
    else:
        args = ["--model", "vit_tiny_patch16", "--batch_size", "4", "--rounds", "1", "--iters", "1", "--warmup", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([python(), "benchmarks/bench_linprobe.py", *args, "--output", f"{tmp}/bench.json"],
                              cwd=ROOT, capture_output=True, text=True, timeout=400)
    table = [line for line in done.stdout.splitlines() if not line.startswith("written ")]
    report("    bench_linprobe.py " + " ".join(args), "", "```", *table, "```", "")
    if not CUDA:
        report("(CPU: ViT-Ti, batch 4, one round; the ratios mean nothing at this size)", "")
    return report.verdict(done.returncode == 0, f"the benchmark ran (exit {done.returncode})"
                          + ("" if done.returncode == 0 else ": " + done.stderr[-500:]))


def _rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def eval_cache(report):
    """engine.TokenCache: host memory per process as CacheLayout predicts, nothing left on the GPU."""
    report("### eval cache memory per process (engine_linprobe.TokenCache)", "")
    model, n, batch = ("vit_base_patch16", 2048, 256) if CUDA else ("vit_tiny_patch16", 32, 16)
    torch.manual_seed(0)
    encoder = build_encoder(model, verbose=False).eval().to(DEVICE)
    images = torch.randn(n, 3, 224, 224)
    targets = torch.randint(0, 1000, (n,))
    loader = [(images[i:i + batch], targets[i:i + batch]) for i in range(0, n, batch)]
    ok = True
    for heads in ("cls,pos,abmilp", "pos,ca4,attn-mn", "cls"):
        specs = tuple(ProbeSpec(h, h, 0.1, "lr0.1") for h in heads.split(","))
        probes = engine.build_probe_set(specs, encoder, 1000, HeadOptions(), 0).to(DEVICE)
        layout = engine.cache_layout(probes, encoder)
        tokens_fn = engine.FrozenTokens(encoder, device=DEVICE, amp="bfloat16" if CUDA else "none",
                                        need_attention="ca4" in heads)
        cache = engine.TokenCache(layout, n, device=DEVICE)
        predicted = n * layout.bytes_per_image() / 2 ** 20
        gpu_before = torch.cuda.memory_allocated() if CUDA else 0
        rss_before = _rss_mib()
        seconds = []
        for _ in range(2):  # the first evaluation fills the cache, the second reads it
            if CUDA:
                torch.cuda.synchronize()
            start = time.perf_counter()
            engine.evaluate(tokens_fn, probes, loader, device=DEVICE, amp="bfloat16" if CUDA else "none",
                            cache=cache)
            if CUDA:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        host = _rss_mib() - rss_before
        on_gpu = (torch.cuda.memory_allocated() - gpu_before) / 2 ** 20 if CUDA else 0.0
        pinned = all(b.is_pinned() for k, b in cache.buffers.items() if k != "targets") if CUDA else None
        imagenet = 50000 * layout.bytes_per_image() / 2 ** 30
        passed = abs(host - predicted) <= 0.1 * predicted + 64 and on_gpu < 0.05 * predicted + 1
        ok &= passed and (pinned is not False)
        report(f"- {model}, --cls_features {heads}: {layout.describe()} per image; {n} images: predicted "
               f"{predicted:.0f} MiB, host RSS grew {host:.0f} MiB, GPU allocation grew {on_gpu:.0f} MiB, "
               f"page-locked {pinned}; eval {n / seconds[0]:.0f} img/s filling, {n / seconds[1]:.0f} img/s "
               f"from the cache ({'ok' if passed else 'OUT'}); ImageNet val (50,000): {imagenet:.2f} GiB on one "
               f"process, {imagenet / 4:.2f} GiB each on 4")
        del cache
    report("")
    return report.verdict(ok, "the cache lives in host memory at the size it states")


PIPELINE_MEAN_LEVELS = 1.0   # nvjpeg's crops vs libjpeg's (the CPU path's): mean |difference| in 8-bit levels


def input_pipeline(report):
    """--decoder fast per CPU core against the paper's PIL pipeline, --decoder gpu (nvjpeg) per GPU, and nvjpeg's
    crops against the CPU path's from the same draws."""
    report("### input pipeline: CPU and GPU JPEG decoding (benchmarks/bench_loader.py)", "")
    if CUDA:
        args = ["--images", "256", "--rounds", "3", "--skip_cache", "--device", "cuda"]
    else:
        args = ["--images", "16", "--rounds", "1", "--skip_cache"]
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([python(), "benchmarks/bench_loader.py", *args, "--output", f"{tmp}/loader.json"],
                              cwd=ROOT, capture_output=True, text=True, timeout=400)
    table = [line for line in done.stdout.splitlines() if not line.startswith("written ")]
    report("    bench_loader.py " + " ".join(args), "", "```", *table, "```", "")
    ok = done.returncode == 0
    if not ok:
        report(f"exit {done.returncode}: {done.stderr[-500:]}", "")
    if not CUDA:
        report("(CPU: 16 images, one round; --decoder gpu skipped, no CUDA device)", "")
        return report.verdict(ok, "the loader benchmark ran")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_loader import imagenet_like

    from util.data import build_dataset
    from util.decode import FastTransform, collate_encoded, device_images
    from util.images import IMAGENET_STD
    std = torch.tensor(IMAGENET_STD, device=DEVICE)[:, None, None] * 255
    with tempfile.TemporaryDirectory() as tmp:
        imagenet_like(Path(tmp), 64)
        for split in ("train", "val"):
            dataset = build_dataset(tmp, split, 224, decoder="gpu")
            torch.manual_seed(0)
            gpu = device_images(collate_encoded([dataset[i] for i in range(len(dataset))])[0], DEVICE)
            torch.manual_seed(0)
            cpu_transform = FastTransform(split, 224, draft=False)
            cpu = device_images(torch.stack([cpu_transform(path) for path, _ in dataset.samples]), DEVICE)
            levels = ((gpu - cpu).abs() * std)
            passed = levels.mean().item() < PIPELINE_MEAN_LEVELS
            ok &= passed
            report(f"- {split}: nvjpeg crops vs the CPU path's, {len(dataset)} images: mean |difference| "
                   f"{levels.mean().item():.3f} levels, max {levels.max().item():.0f} "
                   f"(tolerance: mean < {PIPELINE_MEAN_LEVELS}) ({'ok' if passed else 'OUT'})")
    report("")
    return report.verdict(ok, "GPU decoding runs, and its crops are the CPU path's within tolerance")


def device_index(report):
    report("### --device cuda:N under torchrun", "")
    if not CUDA:
        return skipped(report, "no CUDA device (the refusal itself is tested on CPU: tests/test_resume_ddp.py)")
    count = torch.cuda.device_count()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        done = torchrun(2, "main_linprobe.py", *digits_args(f"{tmp}/a", "--device", "cuda:0"))
        lines = error_lines(done)
        passed = done.returncode != 0 and len(lines) == 1 and "names one GPU for all 2 processes" in lines[0]
        ok &= passed
        report(f"- 2 processes, --device cuda:0: {lines or done.stderr[-300:]} ({'ok' if passed else 'OUT'})")
        done = torchrun(2, "main_linprobe.py", *digits_args(f"{tmp}/b", "--device", "cuda"))
        if count >= 2:
            passed = done.returncode == 0
            report(f"- 2 processes, --device cuda on {count} GPUs: exit {done.returncode} "
                   f"({'ok' if passed else 'OUT: ' + done.stderr[-500:]})")
        else:
            lines = error_lines(done)
            passed = done.returncode != 0 and len(lines) == 1 and "need one GPU each but it has 1" in lines[0]
            report(f"- 2 processes, --device cuda on 1 GPU: {lines or done.stderr[-300:]} "
                   f"({'ok' if passed else 'OUT'})")
        ok &= passed
    report("")
    return report.verdict(ok, "one GPU per process, or one line saying why not")


def cpu_checkpoints(report):
    report("### checkpoints saved from CUDA hold CPU tensors", "")
    if not CUDA:
        return skipped(report, "no CUDA device (util.checkpoint.on_cpu is tested with meta tensors on CPU)")
    from util.checkpoint import save_atomic
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([python(), "main_linprobe.py", *digits_args(f"{tmp}/run", "--device", "cuda",
                                                                           "--cls_features", "cls,abmilp")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        devices = set()
        for name in ("checkpoint-last.pth", "checkpoint-best.pth"):
            path = Path(tmp) / "run" / name
            if path.exists():
                checkpoint = torch.load(path, weights_only=True)  # no map_location: as saved
                devices |= {t.device.type for t in _tensors(checkpoint)}
        save_atomic({"w": torch.ones(3, device="cuda"), "nested": [{"m": torch.zeros(2, device="cuda")}]},
                    Path(tmp) / "direct.pth")
        devices |= {t.device.type for t in _tensors(torch.load(Path(tmp) / "direct.pth", weights_only=True))}
    ok = done.returncode == 0 and devices == {"cpu"}
    report(f"- main_linprobe.py --device cuda, 1 epoch: exit {done.returncode}; tensor devices in its checkpoints "
           f"and a save_atomic of CUDA tensors: {sorted(devices)}", "")
    return report.verdict(ok, "checkpoints load on a CPU machine")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


SECTIONS = {f.__name__: f for f in (header, bf16_tokens, attention_capture, syncbn, bench, eval_cache,
                                    device_index, cpu_checkpoints, input_pipeline)}


def main():
    p = argparse.ArgumentParser("One section of the GPU check")
    p.add_argument("section", choices=[*SECTIONS, "syncbn_worker"])
    p.add_argument("--output", required=True, help="Markdown file the section appends to")
    p.add_argument("--reference", help="(syncbn_worker) the one-process heads to compare with")
    args = p.parse_args()
    report = Report(args.output)
    if args.section == "syncbn_worker":
        return syncbn_worker(report, args.reference)
    start = time.perf_counter()
    ok = SECTIONS[args.section](report)
    print(f"[{args.section}: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
    sys.exit(0 if ok in (None, True) else 1)


if __name__ == "__main__":
    main()
