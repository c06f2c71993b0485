"""Linear probing of a frozen ViT: [cls], mean-pool, AbMILP and other heads, many at once, MAE's protocol.

    torchrun --nproc_per_node 4 main_linprobe.py --model vit_base_patch16 --finetune vit_base_patch16_224.mae \
        --data_path $IMAGENET --output_dir $OUT --cls_features cls,pos,abmilp --blr 0.03,0.1,0.3
"""
import argparse
import json
import os
import sys
import time

import torch

import engine_linprobe as engine
from heads import HEADS, HeadOptions, build_probe, resolve_head
from models_vit import MODELS, NonFiniteWeights, architecture, build_encoder
from util import dist
from util.checkpoint import check_output_dir, load_checkpoint, save_atomic
from util.data import build_dataset, build_loader, validate_num_classes
from util.errors import UserError, exit_on_user_error, user_errors
from util.lars import LARS
from util.lr_sched import scaled_lr
from util.run_log import RunLog


# build_encoder's exceptions at the command line; the first matching type wins
ENCODER_REMEDIES = {FileNotFoundError: "check the --finetune path",
                    NonFiniteWeights: "use a checkpoint saved before the run diverged",
                    ValueError: "pick the --model that matches the checkpoint, or set --checkpoint_key"}


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
    g.add_argument("--amp", choices=["bfloat16", "float16", "none"],
                   default="bfloat16" if torch.cuda.is_available() else "none",
                   help="autocast dtype (default: bfloat16 on CUDA, none on CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", default="", help="checkpoint to resume from (default: OUTPUT_DIR/checkpoint-last.pth)")
    g.add_argument("--start_epoch", type=int, default=0)
    g.add_argument("--eval", action="store_true", help="only evaluate the heads of --resume")
    g.add_argument("--dist_eval", action="store_true", help="shard the validation set over processes")
    g.add_argument("--cache_eval_features", type=float, default=0, metavar="GIB",
                   help="keep validation tokens in memory up to GIB GiB and reuse them every epoch (0: off)")
    g.add_argument("--compile", action="store_true", help="torch.compile the frozen encoder's forward")
    g.add_argument("--knn", action="store_true", help="also run weighted k-NN on [cls] and mean features")
    g.add_argument("--knn_k", default="10,20,100,200", help="k values of the k-NN sweep")
    g.add_argument("--knn_temperature", default="0.07", help="temperatures of the k-NN sweep")

    m = p.add_argument_group("encoder")
    m.add_argument("--model", default="vit_base_patch16",
                   help="a preset (" + ", ".join(MODELS) + ") or a timm ViT/BEiT architecture name, "
                        "e.g. vit_small_patch14_reg4_dinov2 or beitv2_base_patch16_224")
    m.add_argument("--finetune", default="", help="checkpoint file of any supported release (layout recognised "
                   "from the file; see README), or a timm pretrained name")
    m.add_argument("--checkpoint_key", default="", help="sub-model or entry to read (default: the one the "
                   "release evaluates, e.g. teacher, target_encoder, base_encoder)")
    m.add_argument("--simmim", action="store_true", help="optional: insist that --finetune is a SimMIM/BEiT file")
    m.add_argument("--no_cls_token", action="store_true", help="random encoder without [cls]; a checkpoint "
                   "without one is recognised without it")
    m.add_argument("--input_size", type=int, default=224)
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
    d.add_argument("--data_path", default="digits", help="ImageFolder root with train/ and val/, or digits, "
                   "stl10, cifar10, cifar100")
    d.add_argument("--download", action="store_true", help="allow torchvision to download STL10/CIFAR")
    d.add_argument("--no_augment", action="store_true",
                   help="train on the deterministic val transform (no random crop/flip)")
    d.add_argument("--skip_bad_images", action="store_true", help="skip unreadable images with a warning")
    d.add_argument("--num_workers", type=int, default=8)
    d.add_argument("--pin_mem", action="store_true", default=True)
    d.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    d.add_argument("--dataloader_affinity_hack", action="store_true",
                   help="let data workers use every core (undoes CPU pinning inherited from the launcher)")
    d.add_argument("--output_dir", default="./output_dir")
    d.add_argument("--suffix", default="", help="appended to --output_dir (one folder per variant)")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--wandb", action="store_true", help="log to wandb (also on when WANDB_PROJECT is set)")
    d.add_argument("--run_name", default=None, help="wandb run name (default: the output folder's name)")
    return p


def parse_list(text, cast, flag):
    try:
        values = [cast(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of numbers (e.g. 0.1,0.3)")
    if not values:
        raise UserError(f"{flag} is empty (pass numbers separated by commas, e.g. 0.1,0.3)")
    return values


def check_args(args):
    """Flag combinations that cannot work fail here, before any data or weights are read."""
    for flag in ("batch_size", "accum_iter"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)} must be at least 1 (pass a positive --{flag})")
    if args.epochs < (0 if args.knn else 1):
        raise UserError(f"--epochs {args.epochs} must be at least 1 (pass a positive --epochs; 0 only with --knn)")
    if args.cache_eval_features < 0:
        raise UserError("--cache_eval_features is negative (pass a size in GiB, or 0 to turn it off)")
    args.knn_ks = parse_list(args.knn_k, int, "--knn_k")
    args.knn_temperatures = parse_list(args.knn_temperature, float, "--knn_temperature")
    if args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers} is negative (pass 0 or more)")
    args.heads = [resolve_head(name).name for name in args.cls_features.split(",") if name.strip()]
    if not args.heads:
        raise UserError("--cls_features is empty (name at least one head)")
    if args.no_cls_token:
        needs_cls = [h for h in args.heads if HEADS[h].needs_cls]
        if needs_cls:
            raise UserError(f"--cls_features {','.join(needs_cls)} reads [cls] but --no_cls_token is set "
                            "(use pos, abmilp or another patch-token head)")
    with user_errors({ValueError: "pick a preset or a timm ViT/BEiT architecture as --model"}):
        arch = architecture(args.model)
    if args.input_size < 1 or args.input_size % arch["patch_size"]:
        raise UserError(f"--input_size {args.input_size} is not divisible by the patch size {arch['patch_size']} "
                        f"(use a multiple of {arch['patch_size']})")
    if args.return_block is not None and not -arch["depth"] <= args.return_block < arch["depth"]:
        raise UserError(f"--return_block {args.return_block} does not exist in the {arch['depth']}-block "
                        f"{args.model} (use 0..{arch['depth'] - 1}, or -1 for the last)")
    if any(HEADS[h].needs_oracle for h in args.heads) and not args.oracle:
        raise UserError("--cls_features oracle needs --oracle (a checkpoint path or timm name, e.g. a DINO ViT-B/16)")
    if args.lr is not None:
        args.lrs = parse_list(args.lr, float, "--lr")
        args.lr_labels = [f"lr{v:g}" for v in args.lrs]
    else:
        blrs = parse_list(args.blr, float, "--blr")
        eff_batch = args.batch_size * args.accum_iter * dist.world_size()
        args.lrs = [scaled_lr(b, args.batch_size, args.accum_iter, dist.world_size()) for b in blrs]
        args.lr_labels = [f"blr{v:g}" for v in blrs]
        if dist.is_main():
            print(f"effective batch size {eff_batch}: lr = blr * {eff_batch} / 256 = "
                  + ", ".join(f"{v:.4g}" for v in args.lrs))
    if any(v <= 0 for v in args.lrs):
        raise UserError("learning rates must be positive (pass positive --blr/--lr values)")
    args.lr = args.lrs[0]  # each probe's param group carries its own peak_lr; this one is only the default
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but no CUDA device is available (use --device cpu)")
    if args.amp == "float16" and not args.device.startswith("cuda"):
        raise UserError("--amp float16 needs a CUDA device (use --amp bfloat16 or none on CPU)")


def probe_names(args):
    names = {}
    single = len(args.heads) == 1 and len(args.lrs) == 1
    for head in args.heads:
        for lr, label in zip(args.lrs, args.lr_labels):
            names[head if single else f"{head}_{label}"] = (head, lr)
    return names


def build_probe_set(args, encoder, nb_classes):
    """One probe per (head, lr); each initialised from the same seed, as if it were trained alone."""
    options = HeadOptions.from_args(args)
    probes = {}
    for name, (head, _) in probe_names(args).items():
        torch.manual_seed(args.seed)
        probes[name] = build_probe(head, encoder.embed_dim, nb_classes, tuple(encoder.grid_size),
                                   encoder.num_prefix_tokens, options, has_cls=encoder.has_class_token)
    return engine.ProbeSet(probes)


def build_optimizer(args, probe_set):
    groups = []
    for name, (_, lr) in probe_names(args).items():
        groups.append({"params": [p for p in probe_set.probes[name].parameters() if p.requires_grad],
                       "peak_lr": lr, "probe": name, "weight_decay": args.weight_decay})
    if args.optimizer == "lars":
        return LARS(groups, lr=args.lrs[0], weight_decay=args.weight_decay)
    return torch.optim.SGD(groups, lr=args.lrs[0], momentum=0.9, weight_decay=args.weight_decay)


def run_config(args, nb_classes):
    """What a checkpoint's heads depend on; resuming with anything else is refused."""
    return {"probes": {name: head for name, (head, _) in probe_names(args).items()}, "nb_classes": nb_classes,
            "model": args.model, "head_options": vars(HeadOptions.from_args(args)),
            "return_block": args.return_block, "final_norm": args.final_norm}


def check_same_config(ckpt, config, path):
    saved = ckpt.get("config")
    if saved is None or "probes" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of main_linprobe.py (it holds no probe heads)")
    diff = [k for k in config if saved.get(k) != config[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{path} was saved with {k}={saved.get(k)}, this run has {k}={config[k]} "
                        "(use the same flags, or another --output_dir)")


def main(args):
    distributed, rank, world, local_rank, device = dist.init_distributed(args.device)
    device = args.device = str(device)
    if args.suffix:
        args.output_dir = args.output_dir.rstrip("/") + args.suffix
    check_args(args)
    check_output_dir(args.output_dir)
    torch.manual_seed(args.seed)  # the same random-initialised encoder on every rank; loaders seed per rank

    # The checkpoint is read before the data is indexed: a wrong checkpoint fails in seconds, not minutes.
    with user_errors(ENCODER_REMEDIES):
        encoder = build_encoder(args.model, args.finetune, simmim=args.simmim, checkpoint_key=args.checkpoint_key,
                                input_size=args.input_size, no_cls_token=args.no_cls_token,
                                final_norm=args.final_norm, verbose=dist.is_main()).to(device)
    needs_cls = [h for h in args.heads if HEADS[h].needs_cls]
    if needs_cls and not encoder.has_class_token:
        raise UserError(f"--cls_features {','.join(needs_cls)} reads [cls] but the encoder of "
                        f"{args.finetune or args.model} has none (use pos, abmilp or another patch-token head)")
    if args.download and not dist.is_main():
        dist.barrier()  # the main process downloads first, the others then read its copy
    dataset_train = build_dataset(args.data_path, "train", args.input_size, download=args.download,
                                  skip_bad_images=args.skip_bad_images, augment=not args.no_augment)
    dataset_val = build_dataset(args.data_path, "val", args.input_size, download=args.download,
                                skip_bad_images=args.skip_bad_images)
    if args.download and dist.is_main():
        dist.barrier()
    validate_num_classes(args.nb_classes, len(dataset_train.classes))
    nb_classes = args.nb_classes or len(dataset_train.classes)
    oracle = None
    if any(HEADS[h].needs_oracle for h in args.heads):
        with user_errors(ENCODER_REMEDIES):
            oracle = build_encoder(args.oracle_model or args.model, args.oracle, input_size=args.input_size,
                                   verbose=dist.is_main()).to(device)
    with user_errors({ValueError: "pass an --oracle whose encoder has a [cls] token"}):
        tokens_fn = engine.FrozenTokens(encoder, block=args.return_block, oracle=oracle, device=device,
                                        amp=args.amp, need_attention=any(HEADS[h].needs_attention for h in args.heads),
                                        compile=args.compile)

    probe_set = build_probe_set(args, encoder, nb_classes).to(device)
    config = run_config(args, nb_classes)
    optimizer = build_optimizer(args, probe_set)
    scaler = torch.amp.GradScaler(device.split(":")[0]) if args.amp == "float16" else None

    if args.dataloader_affinity_hack and hasattr(os, "sched_setaffinity"):
        # Launchers may pin each rank to one core; forked data workers inherit this wider mask instead.
        os.sched_setaffinity(0, range(os.cpu_count()))
    loader_args = dict(num_workers=args.num_workers, pin_mem=args.pin_mem and device.startswith("cuda"),
                       distributed=distributed, seed=args.seed)
    loader_train = build_loader(dataset_train, args.batch_size, train=True, **loader_args)
    loader_val = build_loader(dataset_val, args.batch_size, train=False,
                              **{**loader_args, "distributed": distributed and args.dist_eval})

    resume = args.resume or _auto_resume_path(args)
    if args.eval and not resume:
        raise UserError(f"--eval needs trained heads: no --resume given and no checkpoint-last.pth in "
                        f"{args.output_dir} (pass --resume OUTPUT_DIR/checkpoint-best.pth)")
    best, best_states = resume_run(args, resume, probe_set, optimizer, scaler, config)

    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            probe_set, device_ids=[local_rank] if device.startswith("cuda") else None)
    else:
        model = probe_set

    knn_rows = run_knn(args, encoder, nb_classes) if args.knn and not args.eval else []
    if args.eval:
        stats = engine.evaluate(tokens_fn, model, loader_val, args)
        if dist.is_main():
            for name in probe_set.names:
                print(f"{name}: acc1 {stats[name]['test_acc1']:.2f}  acc5 {stats[name]['test_acc5']:.2f}  "
                      f"loss {stats[name]['test_loss']:.4f}")
        return

    log = RunLog(args.output_dir, args, enabled=dist.is_main())
    if dist.is_main():
        print(f"training {len(probe_set.names)} probe(s) on {len(dataset_train)} images, "
              f"validating on {len(dataset_val)}, {nb_classes} classes, {args.epochs} epochs")
    start = time.time()
    cache = engine.EvalTokenCache(args.cache_eval_features) if args.cache_eval_features > 0 else None
    for epoch in range(args.start_epoch, args.epochs):
        # Shuffle and augmentation derive from (seed, epoch, rank): a resumed run replays the epoch exactly.
        loader_train.set_epoch(epoch)
        t0 = time.time()
        try:
            train_stats, imgs_per_s = engine.train_one_epoch(tokens_fn, model, loader_train, optimizer, scaler,
                                                             epoch, args)
        except engine.NonFiniteLoss as err:
            raise UserError(f"{err}; stopped, the last good checkpoint is kept "
                            "(start again with a lower --blr/--lr in a new --output_dir)")
        test_stats = engine.evaluate(tokens_fn, model, loader_val, args, cache=cache)
        improved = track_best(probe_set, test_stats, epoch, best, best_states)
        if dist.is_main():
            save_checkpoints(args, epoch, probe_set, optimizer, scaler, config, best, best_states, improved)
            _log_epoch(log, epoch, train_stats, test_stats, imgs_per_s, probe_set.names)
            top = max(probe_set.names, key=lambda n: test_stats[n]["test_acc1"])
            print(f"epoch {epoch}: {time.time() - t0:.1f}s, {imgs_per_s:.0f} img/s, best head now {top} "
                  f"acc1 {test_stats[top]['test_acc1']:.2f} (train loss {train_stats[top]['train_loss']:.4f})",
                  flush=True)
    skipped = [float(getattr(d, "bad_images", 0)) for d in (dataset_train, dataset_val)]
    bad = int(dist.all_reduce_sum(torch.tensor(skipped, device=device)).sum())
    if dist.is_main() and bad:
        print(f"warning: skipped {bad} unreadable image(s) (fix or remove them to train on every image)",
              file=sys.stderr)
    if dist.is_main():
        log.close()
        write_results(args, best, probe_names(args), knn_rows)
        top = max(best, key=lambda n: best[n]["acc1"])
        if best[top]["epoch"] < 0:
            return
        print(f"done in {time.time() - start:.0f}s: best acc1 {best[top]['acc1']:.2f} ({top}, epoch "
              f"{best[top]['epoch']}); heads saved in {os.path.join(args.output_dir, 'checkpoint-best.pth')}")


def resume_run(args, resume, probe_set, optimizer, scaler, config):
    """Loads heads (and, unless --eval, optimizer, scaler, epoch and best results) from `resume`.

    Returns (best, best_states): per probe its best acc1 and epoch, and the heads' weights at those epochs.
    """
    best = {name: {"acc1": -1.0, "epoch": -1} for name in probe_set.names}
    if not resume:
        return best, {}
    with user_errors({OSError: "pass --resume the path of a checkpoint-last.pth or checkpoint-best.pth",
                      ValueError: "pass --resume a checkpoint written by main_linprobe.py"}):
        ckpt = load_checkpoint(resume)
    check_same_config(ckpt, config, resume)
    probe_set.load_state_dict(ckpt["probes"])
    best_states = {}
    if not args.eval:
        if "optimizer" not in ckpt:
            raise UserError(f"{resume} holds the best heads but no optimizer state (resume from "
                            "checkpoint-last.pth, or pass --eval to evaluate these heads)")
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        args.start_epoch = ckpt["epoch"] + 1
        best = ckpt.get("best", best)
        best_path = os.path.join(args.output_dir, "checkpoint-best.pth")
        if os.path.exists(best_path):
            best_states = load_checkpoint(best_path).get("probes", {})
    if dist.is_main():
        print(f"resumed {len(probe_set.names)} head(s) from {resume} (epoch {ckpt['epoch']})")
    return best, best_states


def track_best(probe_set, test_stats, epoch, best, best_states):
    """Updates each probe's best acc1 and keeps a CPU copy of its weights; True if any probe improved."""
    improved = False
    for name in probe_set.names:
        acc1 = test_stats[name]["test_acc1"]
        if acc1 > best[name]["acc1"]:
            best[name] = {"acc1": acc1, "epoch": epoch}
            # keys as in ProbeSet.state_dict(), so either checkpoint loads into a ProbeSet
            best_states.update({probe_set.state_key(name) + k: v.detach().cpu().clone()
                                for k, v in probe_set.probes[name].state_dict().items()})
            improved = True
    return improved


def save_checkpoints(args, epoch, probe_set, optimizer, scaler, config, best, best_states, improved):
    """checkpoint-best.pth (each probe at its best epoch) when one improved, then checkpoint-last.pth."""
    if improved:
        save_atomic({"probes": best_states, "best": best, "config": config, "epoch": epoch, "args": vars(args)},
                    os.path.join(args.output_dir, "checkpoint-best.pth"))
    save_atomic({"probes": probe_set.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None, "epoch": epoch, "args": vars(args),
                 "config": config, "best": best}, os.path.join(args.output_dir, "checkpoint-last.pth"))


def _auto_resume_path(args):
    path = os.path.join(args.output_dir, "checkpoint-last.pth")
    return path if os.path.exists(path) else ""


def _log_epoch(log, epoch, train_stats, test_stats, imgs_per_s, names):
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
    log.scalars(scalars, epoch)


def run_knn(args, encoder, nb_classes):
    """Weighted k-NN (DINO's protocol) on [cls] and mean-pooled tokens: one pass over train and val, main process."""
    from util.knn import extract_features, knn_accuracy
    rows = []
    if dist.is_main():
        tokens_fn = engine.FrozenTokens(encoder, block=args.return_block, device=args.device, amp=args.amp)
        sets = {split: build_dataset(args.data_path, split, args.input_size, augment=False,
                                     skip_bad_images=args.skip_bad_images) for split in ("train", "val")}
        feats = {split: extract_features(tokens_fn, build_loader(ds, args.batch_size, train=False,
                                                                 num_workers=args.num_workers))
                 for split, ds in sets.items()}
        (train_feats, train_labels), (val_feats, val_labels) = feats["train"], feats["val"]
        for kind in train_feats:
            scores = knn_accuracy(train_feats[kind], train_labels, val_feats[kind], val_labels, nb_classes,
                                  ks=args.knn_ks, temperatures=args.knn_temperatures, device=args.device)
            for (k, t), top1 in scores.items():
                rows.append({"probe": f"knn_{kind}_k{k}_T{t:g}", "head": f"knn-{kind}", "lr": None,
                             "best_acc1": round(top1, 3), "best_epoch": None})
        best_row = max(rows, key=lambda r: r["best_acc1"])
        print(f"k-NN: best acc1 {best_row['best_acc1']:.2f} ({best_row['probe']})", flush=True)
    dist.barrier()
    return rows


def write_results(args, best, names, extra_rows=()):
    """results.json and results.md: one row per (head, lr) with its best accuracy, then k-NN rows if any."""
    rows = [{"probe": name, "head": head, "lr": lr, "best_acc1": round(best[name]["acc1"], 3),
             "best_epoch": best[name]["epoch"]} for name, (head, lr) in names.items() if best[name]["epoch"] >= 0]
    rows += list(extra_rows)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = ["| probe | head | lr | best acc1 | epoch |", "|---|---|---|---|---|"]
    lines += [f"| {r['probe']} | {r['head']} | {'-' if r['lr'] is None else format(r['lr'], '.4g')} | "
              f"{r['best_acc1']:.2f} | {'-' if r['best_epoch'] is None else r['best_epoch']} |" for r in rows]
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    with exit_on_user_error():
        main(get_args_parser().parse_args())
