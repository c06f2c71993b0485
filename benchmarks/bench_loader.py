"""The input pipeline and the token cache (issue 23), measured in CPU time:

    make bench-loader                       # = python benchmarks/bench_loader.py
    python benchmarks/bench_loader.py --images 256 --rounds 5 [--device cuda]

Times are CPU seconds: on a shared machine wall time is mostly waiting for other processes' time slices.
(1) loader, in one process on one thread: images/s of one CPU core through ImageFiles + default_collate, the
    paper's pipeline (--decoder pil: PIL decode, PIL RandomResizedCrop/Resize+CenterCrop, ToTensor, Normalize)
    against --decoder fast (and fast without the reduced-size DCT decode, to show its share), train and val, on a
    generated set of ImageNet-like JPEGs (`imagenet_like`). The pipelines alternate within each round and start
    every round from the same torch seed, so they cut the same crops; each ratio is the median over rounds of
    that round's ratio. fast hands uint8 to the device, which normalises; what that would cost on the CPU is shown
    beside it. --decoder gpu: the workers' share per core (read the file, draw the crop), and with CUDA nvjpeg's
    decode + crops per GPU.
    loader, through a DataLoader (the issue's definition; what `loader:` prints): everything the data workers
    and the main process spend per image until the batch is in the training loop, i.e. the above plus the
    batch's trip from the workers to the main process (shared memory: float32 for pil, uint8 for fast) and the
    one copy the main process makes of it (pin_memory's copy into page-locked memory; without CUDA a copy into a
    reused buffer stands in for it). --workers persistent workers, started by a first epoch that is not counted
    (the training loop's workers start once per epoch: negligible over ImageNet's 1.28 M images); their CPU time
    is read from /proc, the main process's with time.process_time; pil and fast take turns epoch by epoch, with
    the same worker seeds (the same crops).
(2) cache: 10 epochs of `--no_augment --cache_train_features --cache_eval_features` (one encoder pass, then the
    heads only) over one uncached epoch, CPU ViT-Ti at 224 px, cls,pos,abmilp heads, on the same JPEGs.
(3) fp16: what rounding cached tokens to float16 would do to MAE-scale tokens (a channel's mean 300x its spread).

Prints `loader: R x the paper's pipeline per core` (through the DataLoader, the smaller of train and val) and
`cache: C x`; writes benchmarks/results-loader.json.
"""
import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import engine_linprobe as engine  # noqa: E402
from benchmarks.bench_linprobe import device_name  # noqa: E402
from config import ProbeSpec  # noqa: E402
from heads import HeadOptions  # noqa: E402
from models_vit import build_encoder  # noqa: E402
from util.data import SAMPLE_PHOTOS, build_dataset, build_loader  # noqa: E402
from util.decode import FastTransform, collate_encoded, device_images  # noqa: E402
from util.dist import is_cuda  # noqa: E402
from util.lr_sched import WarmupCosine  # noqa: E402

# ImageNet-1k's image sizes, as assumed here (BENCHMARKS.md): most photos are Flickr's 500-pixel size, 4:3
# landscape (500x375) or portrait (375x500), some 3:2 or square; a fifth are smaller, long side 150..500; one in
# twenty is larger, long side 500..2000 (ImageNet's mean is about 400x350, a few percent exceed 1000 pixels).
ASPECTS = ((4 / 3, 0.55), (3 / 4, 0.20), (3 / 2, 0.15), (1.0, 0.10))  # width/height, share
LONG_SIDE = ((500, 500, 0.75), (150, 500, 0.20), (500, 2000, 0.05))  # log-uniform in [lo, hi], share
QUALITY = 90
NOISE = 3.0  # sensor-like Gaussian noise (8-bit levels) on the resampled photos


def imagenet_like_size(rng):
    aspect = ASPECTS[rng.choice(len(ASPECTS), p=[p for _, p in ASPECTS])][0]
    lo, hi, _ = LONG_SIDE[rng.choice(len(LONG_SIDE), p=[p for *_, p in LONG_SIDE])]
    long_side = int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
    if aspect >= 1:
        return long_side, max(1, int(round(long_side / aspect)))
    return max(1, int(round(long_side * aspect))), long_side


def _photos():
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in SAMPLE_PHOTOS]


def imagenet_like_image(rng, photos, width, height):
    """A 2x2 mosaic of scikit-image photographs, each resized to cover its quarter and cropped at random, plus
    mild noise: natural content with about the detail per pixel of a downscaled photo."""
    canvas = Image.new("RGB", (width, height))
    pw, ph = -(-width // 2), -(-height // 2)
    for row in range(2):
        for col in range(2):
            photo = photos[rng.integers(len(photos))]
            scale = max(pw / photo.width, ph / photo.height) * rng.uniform(1.0, 1.5)
            size = (max(pw, int(np.ceil(photo.width * scale))), max(ph, int(np.ceil(photo.height * scale))))
            part = photo.resize(size, Image.Resampling.BICUBIC)
            left, top = rng.integers(0, size[0] - pw + 1), rng.integers(0, size[1] - ph + 1)
            canvas.paste(part.crop((left, top, left + pw, top + ph)), (col * pw, row * ph))
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, NOISE, (height, width, 3))
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def imagenet_like(root, images, *, classes=4, seed=0):
    """An ImageFolder root (train/ and val/, `classes` classes) of ImageNet-like JPEGs: `images` in train/, half
    as many in val/. Returns {split: mean bytes per pixel}."""
    rng, photos = np.random.default_rng(seed), _photos()
    density = {}
    for split, n in (("train", images), ("val", max(classes, images // 2))):
        total_bytes = total_pixels = 0
        for i in range(n):
            folder = Path(root) / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            width, height = imagenet_like_size(rng)
            path = folder / f"{i:05d}.JPEG"
            imagenet_like_image(rng, photos, width, height).save(path, quality=QUALITY)
            total_bytes += path.stat().st_size
            total_pixels += width * height
        density[split] = total_bytes / total_pixels
    return density


# ------------------------------------------------------------------------------------------------- loader

def cpu_time():
    """This process's CPU seconds: one thread's work, whatever share of a core a loaded machine gave it (wall
    time there is mostly waiting for the other processes' time slices)."""
    return time.process_time()


def bench_loader(root, bench):
    size, batch = bench.input_size, bench.batch_size
    pipelines = {}
    for split in ("train", "val"):
        pipelines[f"{split} pil (paper)"] = (build_dataset(root, split, size), None)
        pipelines[f"{split} fast"] = (build_dataset(root, split, size, decoder="fast"), None)
        no_draft = build_dataset(root, split, size, decoder="fast")
        no_draft.transform = FastTransform(split, size, draft=False)
        pipelines[f"{split} fast, no DCT scaling"] = (no_draft, None)
        pipelines[f"{split} gpu: workers' share"] = (build_dataset(root, split, size, decoder="gpu"), collate_encoded)
    seconds = {name: [0.0] * bench.rounds for name in pipelines}
    normalise, gpu_decode = [0.0] * bench.rounds, {}
    for round_ in range(bench.rounds):
        # The pipelines take turns batch by batch, each from the same seed: the same crops, and a change in the
        # machine's load lands on all of them alike.
        for first in range(0, len(pipelines["train fast"][0]), batch):
            for name, (dataset, collate) in pipelines.items():
                indices = range(first, min(first + batch, len(dataset)))
                if not indices:
                    continue
                torch.manual_seed(round_ * 100003 + first)
                start = cpu_time()
                images, _ = (collate or default_collate)([dataset[i] for i in indices])
                seconds[name][round_] += cpu_time() - start
                if name.endswith("fast"):  # what normalising would cost on the CPU (the device does it)
                    start = cpu_time()
                    device_images(images, "cpu")
                    normalise[round_] += cpu_time() - start
                if collate is not None and is_cuda(bench.device):  # the device's share of --decoder gpu
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    device_images(images, bench.device)
                    torch.cuda.synchronize()
                    gpu_decode.setdefault(name.split()[0], [0.0] * bench.rounds)[round_] += \
                        time.perf_counter() - start
    counts = {name: len(dataset) for name, (dataset, _) in pipelines.items()}
    rows = {name: counts[name] / statistics.median(s) for name, s in seconds.items()}
    ratios = {split: statistics.median(p / f for p, f in zip(seconds[f"{split} pil (paper)"], seconds[f"{split} fast"]))
              for split in ("train", "val")}
    # train and val pooled, with the fast pipeline also normalising on the CPU
    ratios["with CPU normalisation"] = statistics.median(
        (p_t + p_v) / (f_t + f_v + n) for p_t, p_v, f_t, f_v, n in zip(
            seconds["train pil (paper)"], seconds["val pil (paper)"], seconds["train fast"], seconds["val fast"],
            normalise))
    gpu_rows = {split: counts[f"{split} fast"] / statistics.median(s) for split, s in gpu_decode.items()}
    return {"img_per_s_per_core": rows, "ratios": ratios, "gpu_decode_img_per_s": gpu_rows}


class WorkerPids:
    """A DataLoader's worker_init_fn that notes each worker's process id, so its CPU time can be read."""

    def __init__(self, workers):
        self.pids = multiprocessing.RawArray("i", workers)

    def __call__(self, worker_id):
        self.pids[worker_id] = os.getpid()


def process_cpu(pid):
    """CPU seconds of all threads of process `pid`, user and kernel (the scheduler's nanosecond count)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return total * 1e-9


def bench_dataloader(root, bench):
    """Per image: CPU seconds of the data workers + the main process through a DataLoader (module docstring)."""
    size, batch, pin = bench.input_size, bench.batch_size, is_cuda(bench.device)
    host = {}  # without CUDA: the reused buffers the main process copies each batch into, as pin_memory would

    def workers_cpu(pids):
        return sum(process_cpu(pid) for pid in pids.pids if pid)  # 0: not started yet

    def epoch(loader, pids):
        workers, main = workers_cpu(pids), cpu_time()
        for images, _ in loader:
            if not pin:
                key = (images.shape, images.dtype)
                if key not in host:
                    host[key] = torch.empty_like(images)
                host[key].copy_(images)
        return workers_cpu(pids) - workers, cpu_time() - main

    results = {}
    for split in ("train", "val"):
        loaders = {}
        for name, decoder in (("pil (paper)", "pil"), ("fast", "fast")):
            pids = WorkerPids(bench.workers)
            # the same generator seed: the same worker seeds, so both pipelines cut the same crops every epoch
            loader = DataLoader(build_dataset(root, split, size, decoder=decoder), batch, num_workers=bench.workers,
                                persistent_workers=True, pin_memory=pin, worker_init_fn=pids,
                                generator=torch.Generator().manual_seed(0))
            loaders[f"{split} {name}"] = loader, pids
        for loader, pids in loaders.values():
            epoch(loader, pids)  # starts the workers; not counted
        seconds = {name: [] for name in loaders}
        for _ in range(bench.rounds):
            for name, (loader, pids) in loaders.items():
                seconds[name].append(epoch(loader, pids))
        images = len(loaders[f"{split} fast"][0].dataset)
        for name, s in seconds.items():
            results[name] = {"workers_ms_per_image": 1e3 * statistics.median(w for w, _ in s) / images,
                             "main_ms_per_image": 1e3 * statistics.median(m for _, m in s) / images,
                             "img_per_s_per_core": images / statistics.median(w + m for w, m in s)}
        results[f"{split} ratio"] = statistics.median(
            sum(p) / sum(f) for p, f in zip(seconds[f"{split} pil (paper)"], seconds[f"{split} fast"]))
        del loaders  # ends the workers
    return results


# -------------------------------------------------------------------------------------------------- cache

def bench_cache(root, bench):
    """One uncached epoch (train + eval, encoder every batch) vs `bench.epochs` cached epochs (fill included)."""
    size, batch, device = bench.input_size, bench.batch_size, bench.device
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny_patch16", input_size=size, verbose=False).to(device)
    train = build_dataset(root, "train", size, augment=False)
    val = build_dataset(root, "val", size)
    specs = tuple(ProbeSpec(h, h, 0.1, "lr0.1") for h in ("cls", "pos", "abmilp"))
    schedule = WarmupCosine(bench.epochs, 1)

    def setup():
        probes = engine.build_probe_set(specs, encoder, len(train.classes), HeadOptions(), seed=0).to(device)
        optimizer = engine.build_optimizer(probes, specs, "lars", weight_decay=0.0)
        return probes, optimizer

    tokens_fn = engine.FrozenTokens(encoder, device=device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=False)
    loader_train = build_loader(train, batch, train=True)
    loader_val = build_loader(val, batch, train=False)

    def epoch(probes, optimizer, e, loader, tokens, cache=None):
        loader.set_epoch(e)
        with open(os.devnull, "w") as null, _stderr(null):
            engine.train_one_epoch(tokens, probes, loader, optimizer, scaler, e, schedule=schedule, device=device)
            engine.evaluate(tokens_fn, probes, loader_val, device=device, cache=cache)

    def uncached():
        epoch(*setup(), 0, loader_train, tokens_fn)

    def cached():
        probes, optimizer = setup()
        layout = engine.cache_layout(probes, encoder)
        train_cache = engine.TokenCache(layout, len(train), device=device)
        eval_cache = engine.TokenCache(layout, len(val), device=device)
        train_cache.fill(tokens_fn, build_loader(train, batch, train=False), batch)
        for e in range(bench.epochs):
            epoch(probes, optimizer, e, train_cache.loader(loader_train), engine.cached_tokens, eval_cache)

    seconds = {"uncached": [], "cached": []}
    for _ in range(bench.cache_rounds):
        for name, fn in (("uncached", uncached), ("cached", cached)):
            start = cpu_time()
            fn()
            seconds[name].append(cpu_time() - start)
    ratio = statistics.median(c / u for c, u in zip(seconds["cached"], seconds["uncached"]))
    return {"seconds": seconds, "ratio": ratio, "train_images": len(train), "val_images": len(val)}


class _stderr:
    """Send the loops' progress bars to `stream`."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        self.saved, sys.stderr = sys.stderr, self.stream

    def __exit__(self, *exc):
        sys.stderr = self.saved


# ---------------------------------------------------------------------------------------------------- fp16

def fp16_rounding():
    """Worst per-channel correlation, across images, of pooled features ([cls], mean of patches) computed from
    float16-rounded tokens with those from the float32 tokens: MAE-like synthetic tokens (each channel's mean
    300x its spread) and the shipped MAE encoder's tokens of digits_clutter."""
    gen = torch.Generator().manual_seed(0)
    mean = 300 * (1 + torch.rand(64, generator=gen))  # 300..600 times a unit spread
    cases = {"synthetic, mean 300-600x spread": mean + torch.randn(512, 197, 64, generator=gen)}
    checkpoint = ROOT / "checkpoints" / "mae_mini_clutter.pth"
    if checkpoint.exists():
        mae = build_encoder("vit_mini_patch8", str(checkpoint), input_size=64, verbose=False).eval()
        dataset = build_dataset("digits_clutter", "val", 64, augment=False)
        images = torch.stack([dataset[i][0] for i in range(256)])
        with torch.inference_mode():
            cases["shipped MAE (vit_mini_patch8), 256 digits_clutter val images"] = mae.forward_tokens(images)
    out = {}
    for name, tokens in cases.items():
        worst = {}
        for kind, pool in (("cls", lambda t: t[:, 0]), ("mean", lambda t: t[:, 1:].mean(1))):
            a, b = pool(tokens.double()), pool(tokens.half().double())
            a, b = a - a.mean(0), b - b.mean(0)
            worst[kind] = ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-300)).min().item()
        spread = tokens[:, 0].std(0)
        out[name] = {**worst, "max_mean_over_spread_cls": (tokens[:, 0].mean(0).abs() / spread.clamp_min(1e-12))
                     .max().item()}
    return out


# ----------------------------------------------------------------------------------------------------- main

def parse_args():
    p = argparse.ArgumentParser("Input pipeline and token cache benchmark (issue 23)")
    p.add_argument("--images", type=int, default=128, help="generated training JPEGs (val: half as many)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the loader measurement")
    p.add_argument("--cache_rounds", type=int, default=2, help="alternating rounds of the cache measurement")
    p.add_argument("--cache_images", type=int, default=64, help="training images of the cache measurement")
    p.add_argument("--epochs", type=int, default=10, help="cached epochs weighed against one uncached epoch")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="data workers of the DataLoader measurement")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--device", default="cpu", help="cuda adds --decoder gpu to the loader measurement")
    p.add_argument("--skip_cache", action="store_true", help="only the loader measurement")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results-loader.json"))
    return p.parse_args()


def main(bench):
    torch.set_num_threads(1)  # per core: one process, one thread
    load = os.getloadavg()[0]
    report = {"date": datetime.date.today().isoformat(), "device": device_name(bench.device),
              "torch": torch.__version__, "args": vars(bench), "load_average_at_start": load}
    with tempfile.TemporaryDirectory() as tmp:
        report["bytes_per_pixel"] = imagenet_like(Path(tmp) / "loader", bench.images)
        report["loader"] = bench_loader(Path(tmp) / "loader", bench)
        report["dataloader"] = bench_dataloader(Path(tmp) / "loader", bench)
        if not bench.skip_cache:
            imagenet_like(Path(tmp) / "cache", bench.cache_images, seed=1)
            report["cache"] = bench_cache(Path(tmp) / "cache", bench)
    report["fp16"] = fp16_rounding()
    report["load_average_at_end"] = os.getloadavg()[0]
    print_report(bench, report)
    with open(bench.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"written {bench.output}")


def print_report(bench, report):
    loader = report["loader"]
    density = report["bytes_per_pixel"]
    print(f"{report['device']}, {report['date']}, load average {report['load_average_at_start']:.1f} at start, "
          f"{report['load_average_at_end']:.1f} at end; {bench.images} train + {bench.images // 2} val generated "
          f"JPEGs (q{QUALITY}, {density['train']:.2f} bytes/pixel), {bench.input_size} px, batch {bench.batch_size}, "
          f"one thread, medians of {bench.rounds} rounds")
    print("  in one process (ImageFiles + default_collate, no workers):")
    for name, img_s in loader["img_per_s_per_core"].items():
        print(f"  {name:34s} {img_s:8.1f} img/s per core")
    for split, img_s in loader["gpu_decode_img_per_s"].items():
        print(f"  {split} gpu: nvjpeg decode + crops {img_s:8.1f} img/s per GPU")
    ratios = loader["ratios"]
    print(f"  fast over pil in one process: train {ratios['train']:.2f}x, val {ratios['val']:.2f}x; "
          f"{ratios['with CPU normalisation']:.2f}x if fast also normalised on the CPU")
    dataloader = report["dataloader"]
    copy = "pin_memory" if is_cuda(bench.device) else "a copy into a reused buffer standing in for pin_memory"
    print(f"  through a DataLoader ({bench.workers} workers; {copy}): CPU ms per image, workers + main process")
    for name, row in dataloader.items():
        if not name.endswith("ratio"):
            print(f"  {name:34s} {row['img_per_s_per_core']:8.1f} img/s per core  ({row['workers_ms_per_image']:.3f} "
                  f"+ {row['main_ms_per_image']:.3f} ms)")
    print(f"  fast over pil through the DataLoader: train {dataloader['train ratio']:.2f}x, val "
          f"{dataloader['val ratio']:.2f}x")
    for name, worst in report["fp16"].items():
        print(f"  fp16-rounded tokens, {name}: worst channel correlation [cls] {worst['cls']:.5f}, mean "
              f"{worst['mean']:.5f} ([cls] mean/spread up to {worst['max_mean_over_spread_cls']:.0f})")
    print(f"loader: {min(dataloader['train ratio'], dataloader['val ratio']):.2f} x the paper's pipeline per core")
    if "cache" in report:
        cache = report["cache"]
        print(f"  cache: {bench.epochs} cached epochs (fill included) "
              f"{statistics.median(cache['seconds']['cached']):.1f} CPU s, one uncached epoch "
              f"{statistics.median(cache['seconds']['uncached']):.1f} CPU s ({cache['train_images']} train + "
              f"{cache['val_images']} val images, vit_tiny_patch16, cls,pos,abmilp)")
        print(f"cache: {cache['ratio']:.2f} x")


if __name__ == "__main__":
    main(parse_args())
