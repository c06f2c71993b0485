"""What the learned heads cost: train-step time of every learned head (abmilp and the peer's poolers, no `_all`
variants) on precomputed tokens, of all of them in one ProbeSet, and of abmilp alone; the ratio all / abmilp is
taken per round and its median reported, so a change in a shared machine's load hits both sides alike.

    python benchmarks/bench_heads.py                                    # CPU: vit_tiny_patch16's tokens, batch 32
    python benchmarks/bench_heads.py --model vit_base_patch16 --batch_size 256 --device cuda --amp bfloat16

A step is engine_linprobe.train_one_epoch over identical TokenBatches (LARS, one lr per head), as main_linprobe
trains; the frozen forward is left out (benchmarks/bench_linprobe.py --heads learned times it with the encoder).
"""
import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine_linprobe as engine  # noqa: E402
from config import ProbeSpec  # noqa: E402
from heads import HEADS, HeadOptions, TokenBatch  # noqa: E402
from models_vit import MODELS, architecture  # noqa: E402
from util.dist import is_cuda  # noqa: E402
from util.lr_sched import WarmupCosine  # noqa: E402

LEARNED = ["abmilp"] + [h for h, spec in HEADS.items() if spec.learned and h != "abmilp" and not h.endswith("_all")]


def parse_args():
    p = argparse.ArgumentParser("Train-step time of the learned heads on precomputed tokens")
    p.add_argument("--model", default="vit_tiny_patch16", choices=sorted(MODELS), help="the tokens' width and grid")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--nb_classes", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["none", "bfloat16", "float16"], default="none")
    p.add_argument("--iters", type=int, default=2, help="steps per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    p.add_argument("--output", default=None, help="default: benchmarks/results-heads-<device>.json")
    return p.parse_args()


def setup(bench, heads, tokens):
    specs = tuple(ProbeSpec(h, h, 0.1, "lr0.1") for h in heads)
    encoder = argparse.Namespace(embed_dim=tokens.tokens.shape[-1], grid_size=tokens.grid, num_prefix_tokens=1,
                                 has_class_token=True)
    probes = engine.build_probe_set(specs, encoder, bench.nb_classes, HeadOptions(), seed=0).to(bench.device)
    return probes, engine.build_optimizer(probes, specs, "lars", weight_decay=0.0)


def main(bench):
    arch = architecture(bench.model)
    side = bench.input_size // arch["patch_size"]
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(bench.batch_size, 1 + side * side, arch["embed_dim"], generator=gen)
    tokens = TokenBatch(values.to(bench.device), num_prefix=1, grid=(side, side), has_cls=True)
    targets = torch.randint(0, bench.nb_classes, (bench.batch_size,), generator=gen).to(bench.device)
    scaler = torch.amp.GradScaler(bench.device.split(":")[0], enabled=bench.amp == "float16")
    sync = torch.cuda.synchronize if is_cuda(bench.device) else (lambda: None)
    placeholder = torch.empty(bench.batch_size, 0)  # the "images" of a batch whose tokens are precomputed
    cases = {"abmilp": setup(bench, ["abmilp"], tokens), "all": setup(bench, LEARNED, tokens)}
    cases.update({head: setup(bench, [head], tokens) for head in LEARNED[1:]})

    def step(name, n):
        probes, optimizer = cases[name]
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # the loop's progress bar
            engine.train_one_epoch(lambda _: tokens, probes, [(placeholder, targets)] * n, optimizer, scaler, 0,
                                   schedule=WarmupCosine(epochs=10, warmup_epochs=1), device=bench.device,
                                   amp=bench.amp)

    for name in cases:
        step(name, 1)  # warm-up
    seconds = {name: [] for name in cases}
    for _ in range(bench.rounds):
        for name in cases:
            sync()
            start = time.perf_counter()
            step(name, bench.iters)
            sync()
            seconds[name].append((time.perf_counter() - start) / bench.iters)
    ms = {name: 1000 * statistics.median(values) for name, values in seconds.items()}
    ratio = statistics.median(a / b for a, b in zip(seconds["all"], seconds["abmilp"]))
    report = {"date": datetime.date.today().isoformat(), "device": bench.device, "torch": torch.__version__,
              "timm": timm.__version__, "args": vars(bench), "load_average": os.getloadavg(), "ms_per_step": ms,
              "all_over_abmilp_step_time": ratio, "heads": LEARNED}
    print(f"{bench.model} tokens ({1 + side * side} x {arch['embed_dim']}), batch {bench.batch_size}, amp {bench.amp}, "
          f"{bench.device}; medians of {bench.rounds} rounds x {bench.iters} steps; load average "
          f"{' '.join(f'{v:.1f}' for v in report['load_average'])}")
    for name, value in sorted(ms.items(), key=lambda item: item[1]):
        print(f"{name:10s} {value:9.1f} ms/step  ({value / ms['abmilp']:6.1f} x abmilp)")
    print(f"all {len(LEARNED)} learned heads in one step / abmilp alone: {ratio:.2f}")
    output = bench.output or Path(__file__).parent / f"results-heads-{bench.device.split(':')[0]}.json"
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"written {output}")


if __name__ == "__main__":
    main(parse_args())
