"""Linear probing of a frozen ViT: [cls], mean-pool, AbMILP and other heads, many at once, MAE's protocol.

    torchrun --nproc_per_node 4 main_linprobe.py --model vit_base_patch16 --finetune vit_base_patch16_224.mae \
        --data_path $IMAGENET --output_dir $OUT --cls_features cls,pos,abmilp --blr 0.03,0.1,0.3

The command line is read here only: `resolve_linprobe` turns it into one frozen LinprobeConfig, and `run` uses
nothing else. Library exceptions a user can cause become one `error:` line at the calls below.
"""
import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import engine_linprobe as engine
from cli import (
    ENCODER_REMEDIES,
    SAVE_REMEDIES,
    TRUST_REMEDY,
    add_encoder_arguments,
    add_logging_arguments,
    add_runtime_arguments,
    bad_images_reported,
    take_output_dir,
)
from cli import run as run_cli
from config import CLS_REMEDY, resolve_linprobe
from heads import HEADS, HeadOptions, NoClsToken, require_cls_token
from models_vit import build_encoder
from util import dashboard, dist
from util.checkpoint import UnsafeCheckpoint
from util.data import (
    TORCHVISION_SETS,
    DatasetMissing,
    DatasetNotDownloadable,
    ShardSampler,
    build_dataset,
    build_loader,
    data_source,
)
from util.decode import DECODERS, collate_fn, device_images
from util.errors import UserError, user_errors
from util.images import BadImageError
from util.knn import knn_rows
from util.release_layouts import NonFiniteWeights
from util.run_log import RunLog
from util.run_state import (
    BEST,
    LAST,
    RESULTS,
    IdentityMismatch,
    RunState,
    experiment_identity,
    fingerprint,
    read_heads_for_eval,
    set_aside_old_log,
    write_results,
    write_run_info,
)
from util.subsets import UnknownSampleNames


def get_args_parser():
    p = argparse.ArgumentParser("Linear probing of frozen ViT encoders", add_help=True)
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=int, default=512, help="batch size per process")
    g.add_argument("--epochs", type=int, default=90)
    g.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--optimizer", choices=["lars", "sgd"], default="lars")
    g.add_argument("--blr", type=str, default="0.1",
                   help="base lr, comma-separated for a sweep: lr = blr * effective batch / 256")
    g.add_argument("--lr", type=str, default=None, help="absolute lr (comma-separated list); overrides --blr")
    g.add_argument("--min_lr", type=float, default=0.0, help="final lr of the cosine schedule (every probe)")
    g.add_argument("--warmup_epochs", type=int, default=10)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--resume", default="", help="checkpoint to resume from (default: OUTPUT_DIR/checkpoint-last.pth)")
    g.add_argument("--start_epoch", type=int, default=0)
    g.add_argument("--eval", action="store_true", help="only evaluate the heads of --resume")
    g.add_argument("--dist_eval", action="store_true",
                   help="shard the validation set over processes (the default under DDP; kept for old commands)")
    g.add_argument("--cache_eval_features", type=float, default=0, metavar="GIB",
                   help="keep what the heads read of the validation tokens in host memory (refused if it needs more "
                        "than GIB GiB per process) and reuse it every epoch (0: off)")
    g.add_argument("--cache_train_features", type=float, default=0, metavar="GIB",
                   help="with --no_augment: one encoder pass keeps what the heads read of the training tokens in host "
                        "memory (refused above GIB GiB per process), every epoch then costs only the heads (0: off)")
    g.add_argument("--compile", action="store_true", help="torch.compile the frozen encoder's forward")
    g.add_argument("--knn", action="store_true", help="also run weighted k-NN on [cls] and mean features")
    g.add_argument("--knn_k", default="10,20,100,200", help="k values of the k-NN sweep")
    g.add_argument("--knn_temperature", default="0.07", help="temperatures of the k-NN sweep")
    add_runtime_arguments(g, amp_default="bfloat16" if torch.cuda.is_available() else "none")

    m = p.add_argument_group("encoder")
    add_encoder_arguments(m)
    m.add_argument("--return_block", type=int, default=None, help="probe the tokens after this block (0-based)")
    m.add_argument("--final_norm", action="store_true",
                   help="apply the encoder's final LayerNorm to the tokens (MAE's own probe); default: the paper's")
    m.add_argument("--oracle", default="",
                   help="encoder whose [cls] attention weights the patches for --cls_features oracle")
    m.add_argument("--oracle_model", default=None, help="architecture of --oracle (default: --model)")

    h = p.add_argument_group("heads")
    h.add_argument("--cls_features", default="cls", help="comma-separated heads: " + ", ".join(HEADS))
    h.add_argument("--nb_classes", type=int, default=None, help="default: the number of classes in the data")
    HeadOptions.add_arguments(h)

    d = p.add_argument_group("data and output")
    d.add_argument("--data_path", default="digits", help="ImageFolder root with train/ and val/, or digits, or "
                   "one of " + ", ".join(TORCHVISION_SETS) + " (optionally name:/root)")
    d.add_argument("--download", action="store_true", help="allow torchvision to download a named dataset")
    d.add_argument("--train_per_class", type=int, default=None, metavar="K",
                   help="train on K images per class, drawn with --subset_seed")
    d.add_argument("--train_fraction", type=float, default=None, metavar="P",
                   help="train on a stratified fraction P (0 < P <= 1) of each class, drawn with --subset_seed")
    d.add_argument("--train_list", default=None, metavar="FILE",
                   help="train on the images listed in FILE (one path per line, relative to the train folder, or "
                        "bare file names as in the ImageNet 1%%/10%% split files)")
    d.add_argument("--subset_seed", type=int, default=None,
                   help="seed of --train_per_class / --train_fraction (default 0); the run's --seed does not change "
                        "the subset")
    d.add_argument("--no_augment", action="store_true",
                   help="train on the deterministic val transform (no random crop/flip)")
    d.add_argument("--skip_bad_images", action="store_true", help="skip unreadable images with a warning")
    d.add_argument("--decoder", choices=DECODERS, default="pil",
                   help="pil: the paper's PIL pipeline, bit for bit; fast: the same crops decoded by libjpeg-turbo "
                        "(at reduced size when the crop allows), resized as uint8, normalised on the device; gpu: "
                        "JPEGs decoded on the GPU (nvjpeg), the same crops (README, Input pipeline)")
    d.add_argument("--pin_mem", action="store_true", default=True)
    d.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    d.add_argument("--dataloader_affinity_hack", action="store_true",
                   help="let data workers use every core (undoes CPU pinning inherited from the launcher)")
    d.add_argument("--output_dir", default="./output_dir")
    d.add_argument("--suffix", default="", help="appended to --output_dir (one folder per variant)")
    add_logging_arguments(d, images=True)
    return p


# What a user should do when a library call fails for a reason they can fix (first matching type wins).
ORACLE_REMEDIES = {UnsafeCheckpoint: TRUST_REMEDY,
                   FileNotFoundError: "check the --oracle path", IsADirectoryError: "pass --oracle a checkpoint file",
                   NonFiniteWeights: "use an --oracle checkpoint saved before its run diverged",
                   ValueError: "pick the --oracle_model that matches the --oracle checkpoint",
                   OSError: "check the --oracle path"}
DATA_REMEDIES = {UnknownSampleNames: "fix the --train_list file, or pass the --data_path it was written for",
                 DatasetNotDownloadable: "copy the dataset into that folder by hand, in the layout README's "
                                         "'Low-shot and fine-grained probing' shows, or pass --data_path "
                                         "name:/root of a copy",
                 DatasetMissing: "pass --download to fetch it, or point --data_path name:/root at a copy",
                 FileNotFoundError: "pass --data_path an ImageFolder root with train/<class>/ and val/<class>/, "
                                    "or digits, " + ", ".join(TORCHVISION_SETS),
                 BadImageError: "remove or replace the file, or pass --skip_bad_images",
                 ValueError: "fix the folder named, or pass another --data_path",
                 OSError: "check the network, or copy the dataset there by hand"}


def main(args):
    rank, world, _ = dist.launch_env()
    config = resolve_linprobe(args, world_size=world)
    if rank == 0 and args.lr is None:
        print(f"effective batch size {config.effective_batch}: lr = blr * {config.effective_batch} / 256 = "
              + ", ".join(f"{p.lr:.4g}" for p in config.probes[:len(config.probes) // len(config.heads)]))
    if rank == 0 and config.compile and (config.needs_attention or config.needs_blocks):
        readers = [h for h in config.heads if HEADS[h].needs_attention or HEADS[h].needs_blocks]
        print(f"note: --compile is not applied: {','.join(readers)} read attention probabilities or several blocks' "
              "tokens, which a compiled forward cannot capture; the encoder runs uncompiled", file=sys.stderr,
              flush=True)
    run(config)


def run(config):
    """The whole run for a resolved LinprobeConfig: setup, resume, (k-NN), epochs, results."""
    device = dist.process_device(config.device)
    dist.init_distributed(device)
    try:
        _run(config, device)
    finally:
        dist.cleanup_distributed()


def _build_data(config, split, augment=True):
    """One split; the train split is the chosen subset when there is one (also for k-NN)."""
    with user_errors(DATA_REMEDIES):
        return build_dataset(config.data_path, split, config.encoder.input_size, download=config.download,
                             skip_bad_images=config.skip_bad_images, augment=augment,
                             subset=config.train_subset if split == "train" else None, decoder=config.decoder)


def _run(config, device):
    lock = dist.on_main(take_output_dir, config.output_dir, share_result=False)
    try:
        _run_locked(config, device)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(config, device):
    distributed = dist.world_size() > 1
    torch.manual_seed(config.seed)  # the same random-initialised encoder on every rank; loaders seed per rank

    # The checkpoint is read before the data is indexed: a wrong checkpoint fails in seconds, not minutes.
    with user_errors(ENCODER_REMEDIES):
        encoder = build_encoder(config.encoder.model, config.encoder.finetune, verbose=dist.is_main(),
                                **config.encoder.build_kwargs()).to(device)
    with user_errors({NoClsToken: CLS_REMEDY}):
        require_cls_token(config.heads, encoder.has_class_token,
                          f"the encoder of {config.encoder.finetune or config.encoder.model}")
    oracle = None
    if config.oracle is not None:
        with user_errors(ORACLE_REMEDIES):
            oracle = build_encoder(config.oracle.model, config.oracle.finetune, verbose=dist.is_main(),
                                   **config.oracle.build_kwargs()).to(device)
    build_both = lambda: (_build_data(config, "train", augment=config.augment), _build_data(config, "val"))
    # --download: the main process downloads first (its error stops every process), the others then read its copy
    datasets = dist.on_main(build_both, share_result=False) if config.download else None
    dataset_train, dataset_val = datasets or build_both()
    classes = list(dataset_train.classes)
    selection = getattr(dataset_train, "selection", None)
    if selection is not None and dist.is_main():
        _report_subset(selection, classes)
    if config.nb_classes is not None and config.nb_classes < len(classes):
        raise UserError(f"--nb_classes {config.nb_classes} is smaller than the {len(classes)} classes found in the "
                        f"data (set --nb_classes to at least {len(classes)}, or leave it out to infer it)")
    nb_classes = config.nb_classes or len(classes)

    with user_errors({ValueError: "pass a --return_block inside the encoder and an --oracle with a [cls] token"}):
        tokens_fn = engine.FrozenTokens(encoder, block=config.encoder.return_block, oracle=oracle, device=device,
                                        amp=config.amp, need_attention=config.needs_attention,
                                        need_blocks=config.needs_blocks,
                                        compile=config.compile)
    with user_errors({ValueError: "check --cls_features and the head flags against the encoder"}):
        probe_set = engine.build_probe_set(config.probes, encoder, nb_classes, config.head_options,
                                           config.seed).to(device)
    optimizer = engine.build_optimizer(probe_set, config.probes, config.optimizer, config.weight_decay)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=config.amp == "float16")

    # --eval compares the encoder files by size first and hashes them only when the sizes agree (read_heads_for_eval)
    source = (lambda finetune: finetune) if config.eval_only else (lambda finetune: dist.on_main(fingerprint, finetune))
    identity = experiment_identity(
        config, encoder_source=source(config.encoder.finetune),
        oracle_source=source(config.oracle.finetune) if config.oracle else None,
        classes=classes, nb_classes=nb_classes, train_subset=selection.describe() if selection else "full")
    state = RunState(config.output_dir, identity, [p.name for p in config.probes])
    state.start_epoch = config.start_epoch
    if config.eval_only:
        return _evaluate_saved_heads(config, state, tokens_fn, probe_set, dataset_val, device, distributed)
    _resume(config, state, probe_set, optimizer, scaler)
    layout = (engine.cache_layout(probe_set, encoder, block=config.encoder.return_block, oracle=oracle)
              if config.cache_eval_gib > 0 or config.cache_train_gib > 0 else None)  # what either cache keeps
    cache = _eval_cache(config, layout, dataset_val, device) if config.cache_eval_gib > 0 else None
    train_cache = (_train_cache(config, layout, dataset_train, device)
                   if config.cache_train_gib > 0 else None)

    if config.affinity_hack and hasattr(os, "sched_setaffinity"):
        # Launchers may pin each rank to one core; forked data workers inherit this wider mask instead.
        os.sched_setaffinity(0, range(os.cpu_count()))
    loader_args = dict(num_workers=config.num_workers, pin_mem=config.pin_mem, seed=config.seed,
                       collate_fn=collate_fn(config.decoder))
    loader_train = build_loader(dataset_train, config.batch_size, train=True, distributed=distributed, **loader_args)
    loader_val = build_loader(dataset_val, config.batch_size, train=False, distributed=distributed, **loader_args)
    if state.start_epoch < config.epochs and len(loader_train) < config.accum_iter:
        raise UserError(f"an epoch has {len(loader_train)} iteration(s) ({len(dataset_train)} images, batch "
                        f"{config.batch_size} per process x {dist.world_size()} process(es)), fewer than --accum_iter "
                        f"{config.accum_iter}: the optimizer would never step (pass --accum_iter "
                        f"{max(len(loader_train), 1)} or less, or a smaller --batch_size)")
    # only now: a refused resume, cache or schedule leaves the folder as it was
    dist.on_main(_write_run_info, config, identity, classes, selection, state.resumed_from is None)
    train_tokens = tokens_fn
    if train_cache is not None:  # one encoder pass now; every epoch then reads the cache in its own order
        train_size = len(next(iter(loader_train.batch_sampler)))  # what training encodes an image among
        with bad_images_reported(DATA_REMEDIES[BadImageError], rank_local=True):
            train_cache.fill(tokens_fn, build_loader(dataset_train, train_size, train=False,
                                                     distributed=distributed, **loader_args), train_size)
        loader_train, train_tokens = train_cache.loader(loader_train), engine.cached_tokens
    model = _wrap_for_ddp(probe_set, device) if distributed else probe_set

    knn = (_knn(config, encoder, nb_classes, device, dataset_train, dataset_val, caches=(train_cache, cache))
           if config.knn is not None else [])
    log = RunLog(config.output_dir, settings=config.to_dict(), wandb=config.wandb, run_name=config.run_name,
                 enabled=dist.is_main(), job_type="linprobe" if config.epochs else "knn", dashboard=config.dashboard,
                 resumed=state.resumed_from is not None, start_epoch=state.start_epoch,
                 info=dict(identity=identity, train_images=len(dataset_train), val_images=len(dataset_val),
                           world_size=dist.world_size(), effective_batch=config.effective_batch))
    log.layout({head: [p.name for p in config.probes if p.head == head] for head in config.heads})
    draw = (_attention_pictures(config, tokens_fn, probe_set, dataset_val, device, log)
            if dist.is_main() and config.dashboard.images_every else None)
    if dist.is_main():
        counts = (f"{len(probe_set.names)} probe(s) on {len(dataset_train)} images, validating on "
                  f"{len(dataset_val)}, {nb_classes} classes")
        print(f"{_summary(counts, state.start_epoch, config.epochs)}; data: {data_source(config.data_path)}")
    start = time.time()
    last_saved = state.start_epoch - 1
    try:
        for epoch in range(state.start_epoch, config.epochs):
            # Shuffle and augmentation derive from (seed, epoch, rank): a resumed run replays the epoch exactly.
            loader_train.set_epoch(epoch)
            t0 = time.time()
            with bad_images_reported(DATA_REMEDIES[BadImageError], rank_local=True):
                train_stats, imgs_per_s = _train_epoch(config, train_tokens, model, loader_train, optimizer, scaler,
                                                       epoch, device, log)
                test_stats = engine.evaluate(tokens_fn, model, loader_val, device=device, amp=config.amp,
                                             cache=cache)
            improved = state.track(probe_set, test_stats, epoch)
            # a failed save stops every process, not only the main one
            dist.on_main(_end_epoch, config, log, state, (probe_set, optimizer, scaler, draw), epoch, improved,
                         (train_stats, test_stats, imgs_per_s, time.time() - t0, len(loader_train)),
                         share_result=False)
            last_saved = epoch
        _warn_skipped_images(dataset_train, dataset_val, device)
        dist.on_main(_write_results, config, state, knn, log)
    except KeyboardInterrupt:
        saved = (f"{Path(config.output_dir) / LAST} holds epoch {last_saved}" if last_saved >= 0
                 else "no epoch finished")
        raise KeyboardInterrupt(f"{saved}; rerun the same command to resume") from None
    finally:
        log.close()

    if dist.is_main():
        top = max(state.best, key=lambda n: state.best[n]["acc1"])
        if state.best[top]["epoch"] >= 0:
            print(f"done in {time.time() - start:.0f}s: best acc1 {state.best[top]['acc1']:.2f} ({top}, epoch "
                  f"{state.best[top]['epoch']}); heads saved in {Path(config.output_dir) / BEST}")


def _end_epoch(config, log, state, trained, epoch, improved, stats):
    """On the main process: the epoch's log line, then its checkpoint, then one line on stdout."""
    probe_set, optimizer, scaler, draw = trained
    train_stats, test_stats, imgs_per_s, seconds, iterations = stats
    _log_epoch(log, epoch, train_stats, test_stats, imgs_per_s, probe_set.names, iterations)  # before the checkpoint
    with user_errors(SAVE_REMEDIES):
        state.save(epoch, probe_set, optimizer, scaler, improved, config.to_dict())
    if draw is not None and dashboard.pictures_due(epoch, config.dashboard.images_every, config.epochs):
        draw(epoch, iterations)
    log.commit()  # wandb's rows only now: a resumed run never sends an epoch twice
    top = max(probe_set.names, key=lambda n: test_stats[n]["test_acc1"])
    print(f"epoch {epoch}: {seconds:.1f}s, {imgs_per_s:.0f} img/s, best head now {top} "
          f"acc1 {test_stats[top]['test_acc1']:.2f} (train loss {train_stats[top]['train_loss']:.4f})", flush=True)


def _attention_pictures(config, tokens_fn, probe_set, dataset_val, device, log):
    """draw(epoch, iterations): the weights each attentive probe gives the patches of the first validation
    images (Probe.attention_map), overlaid on them, one grid to the dashboards (nothing when no head has any)."""
    few = torch.utils.data.Subset(dataset_val, range(min(dashboard.FIXED_IMAGES, len(dataset_val))))
    loader = build_loader(few, len(few), train=False, num_workers=0, collate_fn=collate_fn(config.decoder))
    images = device_images(next(iter(loader))[0], device)

    def grid():
        probe_set.eval()
        with torch.no_grad():
            batch = tokens_fn(images)
            probe_set(batch)
        maps = {name: head.attention_map.reshape(*head.attention_map.shape[:-1], *batch.grid)
                for name, head in probe_set.probes.items() if head.attention_map is not None}
        return dashboard.attention_grid(images, maps, scale=4) if maps else None
    return lambda epoch, iterations: log.picture("attention/probes", grid, epoch, iterations)


def _write_run_info(config, identity, classes, selection, fresh):
    """run.json; a fresh start (no checkpoint resumed) first sets aside the log of an earlier run in the folder."""
    with user_errors(SAVE_REMEDIES):
        if fresh:
            kept = set_aside_old_log(config.output_dir)
            if kept:
                print(f"note: {Path(config.output_dir) / 'log.txt'} held another run (no checkpoint of it is "
                      f"left): kept as {kept.name}, this run starts a new log", file=sys.stderr, flush=True)
        write_run_info(config.output_dir, config=config.to_dict(), identity=identity, classes=classes,
                       selection=selection)


def _write_results(config, state, knn, log):
    """results.md / results.json, then the same rows to the dashboards: best acc1, its epoch and lr per probe as
    the run's summary, the whole table (k-NN rows included) as a table."""
    with user_errors(SAVE_REMEDIES):
        print(write_results(config.output_dir, config.probes, state.best, knn))
    summary = {}
    for p in config.probes:
        if state.best[p.name]["epoch"] >= 0:
            summary.update({f"best_acc1/{p.name}": state.best[p.name]["acc1"],
                            f"best_epoch/{p.name}": state.best[p.name]["epoch"], f"lr/{p.name}": p.lr})
    summary.update({f"knn_acc1/{row['probe']}": row["best_acc1"] for row in knn})
    log.summary(summary)
    log.table("results", json.loads((Path(config.output_dir) / RESULTS).read_text()))


def _eval_cache(config, layout, dataset_val, device):
    """The eval cache, sized before anything fills it: one line stating its size per process, or a UserError."""
    images = -(-len(dataset_val) // dist.world_size())  # the largest shard: every process decides alike
    _check_cache_size("eval", "validation", images, layout, config.cache_eval_gib, "--cache_eval_features")
    shard = len(ShardSampler(dataset_val, dist.world_size(), dist.rank()))  # what build_loader gives this process
    return engine.TokenCache(layout, shard, device=device)


def _train_cache(config, layout, dataset_train, device):
    """The --no_augment training set's cache: every process holds every image (each epoch shards it anew)."""
    _check_cache_size("train", "training", len(dataset_train), layout, config.cache_train_gib, "--cache_train_features")
    return engine.TokenCache(layout, len(dataset_train), device=device)


def _check_cache_size(name, split, images, layout, budget, flag):
    need = images * layout.bytes_per_image() / 2 ** 30
    what = f"{images} {split} images per process x ({layout.describe()}), float32 in host memory"
    if need > budget:
        raise UserError(f"the {name} cache needs {need:.3g} GiB per process ({what}), more than {flag} "
                        f"{budget:g} (pass {flag} {_round_up(need):g} or more, or leave the flag out)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if dist.world_size() > 1 else 1
    free = dist.on_main(_available_gib)
    if free is not None and need * local > free:
        raise UserError(f"the {name} cache needs {need:.3g} GiB per process x {local} process(es) on this machine, "
                        f"but {free:.3g} GiB of memory is available ({what}) (leave {flag} out, or run on more "
                        "machines)")
    if dist.is_main():
        print(f"{name} cache: {what} = {need:.3g} GiB per process", flush=True)


def _round_up(gib):
    return math.ceil(gib * 100) / 100


def _available_gib():
    """MemAvailable of /proc/meminfo in GiB (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib / 2 ** 20


def _summary(counts, start, epochs):
    """The run's summary line: what it trains, or that nothing is left to train."""
    if epochs == 0:
        return f"k-NN only (--epochs 0), no probe trained ({counts})"
    if start >= epochs:
        return f"nothing left to train: the checkpoint already holds all {epochs} epochs ({counts})"
    return f"training {counts}, epochs {start}..{epochs - 1}"


def _report_subset(selection, classes, shown=20):
    """The subset's size and images per class on stdout; classes short of K images in one warning line."""
    counts = [(classes[label], n) for label, n in selection.per_class.items()]
    if len(counts) <= shown:
        per_class = ", ".join(f"{name}={n}" for name, n in counts)
    else:  # ImageNet: how many classes got each count (run.json lists every class)
        tally = sorted(Counter(n for _, n in counts).items())
        per_class = ", ".join(f"{n} images x {k} classes" for n, k in tally)
    print(f"training subset {selection.describe()}; images per class: {per_class}", flush=True)
    if selection.short_classes:
        names = [f"{classes[label]} ({selection.per_class.get(label, 0)})" for label in selection.short_classes]
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        print(f"warning: {len(names)} class(es) have fewer than {selection.subset.value} training images, all of "
              f"theirs are used: {', '.join(names[:10])}{more}", file=sys.stderr, flush=True)
    if selection.empty_classes:
        names = [classes[label] for label in selection.empty_classes]
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        print(f"warning: the training subset covers {len(classes) - len(names)} of the {len(classes)} classes; no "
              f"training image of {', '.join(names[:10])}{more} (the heads cannot learn to predict them)",
              file=sys.stderr, flush=True)


def _train_epoch(config, tokens_fn, model, loader, optimizer, scaler, epoch, device, log):
    def on_step(iteration, losses, lrs):  # one panel per head, one line per lr (RunLog.layout)
        values = {f"train/loss/{name}": loss for name, loss in losses.items()}
        values.update({f"train/lr/{name}": lr for name, lr in lrs.items()})
        log.step(values, epoch, iteration, len(loader))

    try:
        return engine.train_one_epoch(tokens_fn, model, loader, optimizer, scaler, epoch, schedule=config.schedule,
                                      device=device, amp=config.amp, accum_iter=config.accum_iter, on_step=on_step)
    except engine.NonFiniteLoss as err:
        raise UserError(f"{err}; stopped, the last good checkpoint is kept (start again with a lower --blr/--lr "
                        "in a new --output_dir)") from None


def _resume(config, state, probe_set, optimizer, scaler):
    explicit = bool(config.resume)
    path = state.resume_path(config.resume)
    if not path:
        return
    remedy = (f"pass another --output_dir, or --resume {path} to continue it with this run's settings"
              if not explicit else "use the flags that checkpoint was trained with, or another --output_dir")
    with user_errors({IdentityMismatch: remedy,
                      OSError: "pass --resume the path of a checkpoint-last.pth",
                      ValueError: (f"delete {path} to start over, or pass --resume another checkpoint" if not explicit
                                   else "pass --resume a checkpoint-last.pth written by main_linprobe.py")}):
        checkpoint, changed = state.read(path, explicit=explicit)
        state.resume(checkpoint, path, probe_set, optimizer, scaler, main=dist.is_main())
    if dist.is_main():
        print(f"resumed {len(probe_set.names)} probe(s) from {path} (epoch {checkpoint['epoch']})", flush=True)
        if changed:
            print(f"note: resuming with changed settings: {', '.join(changed)}", file=sys.stderr, flush=True)


def _evaluate_saved_heads(config, state, tokens_fn, probe_set, dataset_val, device, distributed):
    path = state.resume_path(config.resume)
    if not path:
        raise UserError(f"--eval needs trained heads: no --resume given and no {LAST} in {config.output_dir} "
                        f"(pass --resume OUTPUT_DIR/{BEST})")
    with user_errors({OSError: "pass --resume the path of a checkpoint", ValueError: "pass --resume a checkpoint "
                      "written by main_linprobe.py"}):
        try:
            heads = read_heads_for_eval(path, state.identity)
        except IdentityMismatch as err:
            flag = EVAL_FLAGS.get(err.setting, "flags")
            raise UserError(f"{err} (evaluate with the {flag} those heads were trained with, or --resume heads "
                            "trained on this one)") from None
        probe_set.load_state_dict(heads["probes"])
    loader = build_loader(dataset_val, config.batch_size, train=False, num_workers=config.num_workers,
                          pin_mem=config.pin_mem, distributed=distributed, collate_fn=collate_fn(config.decoder))
    with bad_images_reported(DATA_REMEDIES[BadImageError], rank_local=True):
        stats = engine.evaluate(tokens_fn, probe_set, loader, device=device, amp=config.amp)
    if dist.is_main():
        for name in probe_set.names:
            print(f"{name}: acc1 {stats[name]['test_acc1']:.2f}  acc5 {stats[name]['test_acc5']:.2f}  "
                  f"loss {stats[name]['test_loss']:.4f}")


# The flag behind each setting --eval compares (util.run_state.read_heads_for_eval).
EVAL_FLAGS = {"encoder": "--finetune", "checkpoint_key": "--checkpoint_key", "input_size": "--input_size",
              "return_block": "--return_block", "final_norm": "--final_norm setting", "oracle": "--oracle",
              "seed": "--seed", "model": "--model", "probes": "--cls_features",
              "head_options": "head flags", "classes": "--data_path (its class names)", "nb_classes": "--nb_classes"}


def _wrap_for_ddp(probe_set, device):
    if dist.is_cuda(device):  # NCCL: torch's own SyncBatchNorm for the global-batch statistics
        probe_set = torch.nn.SyncBatchNorm.convert_sync_batchnorm(probe_set)
    return torch.nn.parallel.DistributedDataParallel(probe_set,
                                                     device_ids=[device] if dist.is_cuda(device) else None)


def _knn(config, encoder, nb_classes, device, dataset_train, dataset_val, caches=(None, None)):
    """Weighted k-NN (DINO's protocol) on [cls] and mean-pooled tokens of the deterministic val transform (the
    training images are read again without augmentation when training augments them). Each process encodes its
    own shard of both sets (util.knn.knn_rows gathers the training features). A token cache that keeps every
    token (the --no_augment training cache, filled by now; the eval cache, which this pass then fills) gives
    its tokens instead of a second encoder pass."""
    tokens_fn = engine.FrozenTokens(encoder, block=config.encoder.return_block, device=device, amp=config.amp)
    if config.augment:
        dataset_train = _build_data(config, "train", augment=False)
    loaders = [build_loader(dataset, config.batch_size, train=False, num_workers=config.num_workers,
                            distributed=dist.world_size() > 1, collate_fn=collate_fn(config.decoder))
               for dataset in (dataset_train, dataset_val)]
    train_cache, eval_cache = (c if c is not None and c.layout.every_token else None for c in caches)
    if train_cache is not None:
        loaders[0] = train_cache.shard_batches(config.batch_size)
    if eval_cache is not None:
        loaders[1] = eval_cache.batches(tokens_fn, loaders[1])
    with bad_images_reported(DATA_REMEDIES[BadImageError], rank_local=True):
        rows = knn_rows(engine.tokens_or_cached(tokens_fn), *loaders, nb_classes, config.knn.ks,
                        config.knn.temperatures, device)
    if dist.is_main():
        best = max(rows, key=lambda r: r["best_acc1"])
        print(f"k-NN: best acc1 {best['best_acc1']:.2f} ({best['probe']})", flush=True)
    return rows


def _warn_skipped_images(dataset_train, dataset_val, device):
    skipped = [float(getattr(d, "bad_images", 0)) for d in (dataset_train, dataset_val)]
    bad = int(dist.all_reduce_sum(torch.tensor(skipped, device=device)).sum())
    if dist.is_main() and bad:
        print(f"warning: skipped {bad} unreadable image(s) (fix or remove them to train on every image)",
              file=sys.stderr)


def _log_epoch(log, epoch, train_stats, test_stats, imgs_per_s, names, iterations):
    record = {"epoch": epoch, "img/s": imgs_per_s}
    if len(names) == 1:  # a single probe keeps MAE's flat log.txt keys
        record.update(train_stats[names[0]])
        record.update(test_stats[names[0]])
    else:
        record["probes"] = {n: {**train_stats[n], **test_stats[n]} for n in names}
    log.line(record)
    scalars = {"perf/img_per_s": imgs_per_s}
    for n in names:
        for key, value in {**train_stats[n], **test_stats[n]}.items():
            scalars[f"{key}/{n}"] = value
    log.epoch(scalars, epoch, iterations)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
