"""Self-supervised pretraining of a small ViT on the probing data pipeline: MAE (masked image modelling) or
MoCo v3 (joint-embedding, contrastive), so the project's probes can compare a learned MIM and a learned JEA encoder.

    python main_pretrain.py --method mae --data_path digits_clutter --output_dir output_dir/pretrain-mae \
        --release_path checkpoints/mae_mini_clutter.pth
    python main_linprobe.py --model vit_mini_patch8 --input_size 64 --finetune checkpoints/mae_mini_clutter.pth ...

OUTPUT_DIR/checkpoint-last.pth (model, optimizer, epoch, configuration) is written after every epoch; running the
same command again continues from it. At the end the release-layout file is written (MAE: {'model': encoder};
MoCo v3: {'state_dict': module.base_encoder.*, module.momentum_encoder.*, module.predictor.*}); `--export CKPT`
writes it from any checkpoint of this script.
"""
import argparse
import math
import os
import time

import torch
from timm.optim import param_groups_weight_decay
from torchvision import transforms
from tqdm import tqdm

import pretrain_models
from models_vit import MODELS, NOT_ENCODER
from util.checkpoint import load_checkpoint, save_atomic
from util.cli import SAVE_REMEDIES, bad_images_reported, take_output_dir
from util.cli import run as run_cli
from util.config import MAX_SEED, at_least, finite, require, resolve_device
from util.data import (
    NAMED_SETS,
    BadImageError,
    build_dataset,
    build_loader,
    normalize,
)
from util.errors import UserError, user_errors
from util.lr_sched import WarmupCosine, scaled_lr
from util.run_log import RunLog

BICUBIC = transforms.InterpolationMode.BICUBIC
# Each method's published recipe (MAE: main_pretrain.py; MoCo v3: main_moco.py for ViTs); flags override them.
RECIPES = {
    "mae": dict(blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), crop_min=0.2),
    "mocov3": dict(blr=1.5e-4, weight_decay=0.1, betas=(0.9, 0.999), crop_min=0.08),
}
# What a user should do when reading the data fails for a reason they can fix (first matching type wins).
DATA_REMEDIES = {FileNotFoundError: "pass --data_path digits_clutter, digits, or an ImageFolder root with "
                                    "train/<class>/",
                 BadImageError: "remove or replace the file",
                 ValueError: "fix the folder named, or pass another --data_path",
                 OSError: "check the folder named, or pass another --data_path"}
# Arguments that do not change what is trained: a resumed run may differ in these only.
NOT_CONFIG = {"output_dir", "resume", "release_path", "release_fp16", "export", "num_workers", "device",
              "wandb", "run_name", "save_every", "start_epoch", "lr_value"}
CHECKPOINT = "checkpoint-last.pth"


def get_args_parser():
    p = argparse.ArgumentParser("Self-supervised pretraining (MAE or MoCo v3) of a small ViT", add_help=True)
    p.add_argument("--method", choices=sorted(RECIPES), default=None, help="mae or mocov3 (required)")
    p.add_argument("--model", default="vit_mini_patch8", help="one of " + ", ".join(MODELS))
    p.add_argument("--input_size", type=int, default=64)
    p.add_argument("--embed_dim", type=int, default=None, help="override the model's width (tiny test models)")
    p.add_argument("--depth", type=int, default=None, help="override the model's depth")
    p.add_argument("--num_heads", type=int, default=None, help="override the model's number of heads")

    t = p.add_argument_group("optimisation (AdamW, per-iteration warmup then half-cosine)")
    t.add_argument("--batch_size", type=int, default=128)
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--warmup_epochs", type=int, default=10)
    t.add_argument("--blr", type=float, default=None,
                   help="base lr: lr = blr * batch / 256 (default: the method's, 1.5e-4)")
    t.add_argument("--lr", type=float, default=None, help="absolute lr, overrides --blr")
    t.add_argument("--min_lr", type=float, default=0.0)
    t.add_argument("--weight_decay", type=float, default=None, help="default: MAE 0.05, MoCo v3 0.1")
    t.add_argument("--crop_min", type=float, default=None,
                   help="smallest RandomResizedCrop area (default: MAE 0.2, MoCo v3 0.08)")
    t.add_argument("--max_images", type=int, default=None, help="train on the first N images only (quick runs)")
    t.add_argument("--seed", type=int, default=0)

    m = p.add_argument_group("MAE")
    m.add_argument("--mask_ratio", type=float, default=0.75)
    m.add_argument("--norm_pix_loss", action="store_true", default=True,
                   help="regress each patch's pixels normalised by its mean and variance (default)")
    m.add_argument("--no_norm_pix_loss", action="store_false", dest="norm_pix_loss")
    m.add_argument("--decoder_dim", type=int, default=64)
    m.add_argument("--decoder_depth", type=int, default=2)
    m.add_argument("--decoder_heads", type=int, default=4)

    c = p.add_argument_group("MoCo v3")
    c.add_argument("--moco_dim", type=int, default=128, help="output size of projector and predictor")
    c.add_argument("--moco_mlp_dim", type=int, default=256, help="hidden size of projector and predictor")
    c.add_argument("--moco_t", type=float, default=0.2, help="InfoNCE temperature")
    c.add_argument("--moco_m", type=float, default=0.99, help="initial momentum, cosine-increased to 1")

    o = p.add_argument_group("data and output")
    o.add_argument("--data_path", default="digits_clutter",
                   help="digits_clutter, digits, or an ImageFolder root with train/ (labels are not used)")
    o.add_argument("--num_workers", type=int, default=0)
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    o.add_argument("--output_dir", default="./output_dir/pretrain")
    o.add_argument("--resume", default="", help=f"default: OUTPUT_DIR/{CHECKPOINT} if present")
    o.add_argument("--release_path", default="",
                   help="where the release-layout file goes at the end (default: OUTPUT_DIR/release.pth)")
    o.add_argument("--release_fp16", action="store_true",
                   help="store the release file's tensors as float16 (half the size; loaders upcast them)")
    o.add_argument("--export", default="", metavar="CKPT",
                   help="only write the release file of CKPT (a checkpoint of this script) to --release_path")
    o.add_argument("--save_every", type=int, default=0, help="also keep checkpoint-<epoch>.pth every N epochs")
    o.add_argument("--wandb", action="store_true", help="log to wandb (also on when WANDB_PROJECT is set)")
    o.add_argument("--run_name", default=None)
    return p


# ------------------------------------------------------------------------------------------------ checks

def check_args(args):
    if args.method is None and not args.export:
        raise UserError("--method is required (pass --method mae or --method mocov3)")
    if args.model not in MODELS:
        raise UserError(f"unknown model '{args.model}' (choose one of {', '.join(MODELS)})")
    at_least(args.batch_size, "--batch_size", 1)
    at_least(args.epochs, "--epochs", 1)
    at_least(args.num_workers, "--num_workers", 0)
    require(0 <= args.seed <= MAX_SEED, f"--seed {args.seed} is out of range (use 0..{MAX_SEED})")
    args.device = resolve_device(args.device)
    if str(args.data_path).partition(":")[0] in NAMED_SETS:
        raise UserError(f"--data_path {args.data_path}: main_pretrain.py reads digits_clutter, digits or an "
                        "ImageFolder root (pass one of those)")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise UserError(f"--warmup_epochs {args.warmup_epochs} must be between 0 and --epochs {args.epochs}")
    if not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask_ratio {args.mask_ratio} must be between 0 and 1 (MAE uses 0.75)")
    if args.max_images is not None and args.max_images < 2:
        raise UserError(f"--max_images {args.max_images} must be at least 2 (or leave it out)")
    arch = architecture(args)
    if arch["embed_dim"] % arch["num_heads"] or arch["embed_dim"] % 4:
        raise UserError(f"width {arch['embed_dim']} must be divisible by 4 (sin-cos positions) and by the "
                        f"{arch['num_heads']} heads (change --embed_dim or --num_heads)")
    if args.input_size % arch["patch_size"]:
        raise UserError(f"--input_size {args.input_size} is not divisible by the patch size {arch['patch_size']} "
                        f"(use a multiple of {arch['patch_size']})")
    if args.method:
        recipe = RECIPES[args.method]
        for key in ("blr", "weight_decay", "crop_min"):
            if getattr(args, key) is None:
                setattr(args, key, recipe[key])
        if not 0 < args.crop_min <= 1:
            raise UserError(f"--crop_min {args.crop_min} must be in (0, 1]")
        args.lr_value = finite(args.lr if args.lr is not None else scaled_lr(args.blr, args.batch_size),
                               "--lr" if args.lr is not None else "the lr from --blr", above=0)


def architecture(args):
    """The encoder's sizes: the preset with --embed_dim/--depth/--num_heads applied."""
    overrides = {k: getattr(args, k) for k in ("embed_dim", "depth", "num_heads") if getattr(args, k) is not None}
    return {**MODELS[args.model], **overrides}


def arch_overrides(args):
    return {k: v for k, v in architecture(args).items() if v != MODELS[args.model].get(k)}


def run_config(args):
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_CONFIG}


# ------------------------------------------------------------------------------------------------ data

def mae_transform(input_size, crop_min):
    """MAE's pretraining augmentation: RandomResizedCrop (bicubic) and horizontal flip."""
    return transforms.Compose([transforms.RandomResizedCrop(input_size, scale=(crop_min, 1.0), interpolation=BICUBIC),
                               transforms.RandomHorizontalFlip(), *normalize()])


def moco_crop_transform(input_size, crop_min, blur_p, solarize_p):
    """One of MoCo v3's two asymmetric views, without flips: crop, brightness/contrast jitter, blur, solarize
    (saturation, hue and grayscale are left out: they do nothing to grayscale digits and little at 64 px)."""
    kernel = max(3, (input_size // 10) | 1)  # about 10% of the side, odd, as the reference's 23 px at 224
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(crop_min, 1.0), interpolation=BICUBIC),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4)], p=0.8),
        transforms.RandomApply([transforms.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        transforms.RandomSolarize(128, p=solarize_p),
        *normalize()])


class TwoCrops:
    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, image):
        return [self.first(image), self.second(image)]


def pretrain_transform(args):
    if args.method == "mae":
        return mae_transform(args.input_size, args.crop_min)
    return TwoCrops(moco_crop_transform(args.input_size, args.crop_min, 1.0, 0.0),
                    moco_crop_transform(args.input_size, args.crop_min, 0.1, 0.2))


def build_train_set(args):
    """The train split of --data_path (any dataset build_dataset knows) with the method's augmentation."""
    with user_errors(DATA_REMEDIES):
        dataset = build_dataset(args.data_path, "train", args.input_size, augment=False)
    dataset.transform = pretrain_transform(args)  # digits, digits_clutter, ImageFolder read .transform per item
    if args.max_images is not None and args.max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(args.max_images))
    return dataset


# ------------------------------------------------------------------------------------------------ model

def build_model(args):
    arch = arch_overrides(args)
    if args.method == "mae":
        return pretrain_models.build_mae(args.model, args.input_size, decoder_dim=args.decoder_dim,
                                         decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
                                         mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss, **arch)
    return pretrain_models.build_mocov3(args.model, args.input_size, dim=args.moco_dim, mlp_dim=args.moco_mlp_dim,
                                        temperature=args.moco_t, **arch)


def build_optimizer(args, model):
    betas = RECIPES[args.method]["betas"]
    if args.method == "mae":  # MAE: no weight decay on biases and norms
        groups = param_groups_weight_decay(model, args.weight_decay)
    else:  # MoCo v3 decays every trained parameter
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": args.weight_decay}]
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad], peak_lr=args.lr_value) for g in groups]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr_value, betas=betas)


def model_state(args, model):
    """The model's state dict under its release's names (MoCo v3: main_moco.py saves DDP's `module.` keys)."""
    state = model.state_dict()
    return state if args.method == "mae" else {f"module.{k}": v for k, v in state.items()}


def load_model_state(args, model, ckpt):
    if args.method == "mae":
        model.load_state_dict(ckpt["model"])
    else:
        model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()})


def training_checkpoint(args, model, optimizer, epoch, history):
    key = "model" if args.method == "mae" else "state_dict"
    return {key: model_state(args, model), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "arch": args.model, "method": args.method, "config": run_config(args), "args": vars(args),
            "history": history}


def release(ckpt, fp16=False):
    """Release layout of a training checkpoint: MAE {'model': encoder only}; MoCo v3 {'state_dict', 'epoch', 'arch'}
    (optimizer state left out: the shipped files must stay small; checkpoint-last.pth keeps it)."""
    half = (lambda v: v.half() if fp16 and v.is_floating_point() else v)
    if ckpt.get("method") == "mae":
        state = {k: half(v) for k, v in ckpt["model"].items() if not k.startswith(NOT_ENCODER)}  # decoder, mask token
        out = {"model": state}
    else:
        out = {"state_dict": {k: half(v) for k, v in ckpt["state_dict"].items()}, "arch": ckpt["arch"]}
    out.update(epoch=ckpt["epoch"], method=ckpt["method"], config=ckpt["config"])
    return out


# ------------------------------------------------------------------------------------------------ training

def train_one_epoch(args, model, loader, optimizer, epoch, log):
    model.train()
    sched = WarmupCosine(epochs=args.epochs, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr)
    steps = len(loader)
    total, count, start = 0.0, 0, time.time()
    bar = tqdm(loader, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False, mininterval=1.0)
    for step, (images, _) in enumerate(bar):
        progress = epoch + step / steps
        sched.apply(optimizer, progress)
        lr = optimizer.param_groups[0]["lr"]
        if args.method == "mae":
            images = images.to(args.device, non_blocking=True)
            loss = model(images)[0]
            batch = len(images)
        else:
            x1, x2 = (x.to(args.device, non_blocking=True) for x in images)
            loss = model(x1, x2, pretrain_models.momentum_at(progress, args.epochs, args.moco_m))
            batch = len(x1)
        value = loss.item()
        if not math.isfinite(value):
            raise UserError(f"the loss became {value} at epoch {epoch} step {step}; stopped, the last good "
                            f"checkpoint is kept (start again with a lower --blr in a new --output_dir)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value * batch
        count += batch
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)
        log.scalars({"train/loss_step": value, "train/lr": lr}, epoch * steps + step)
    seconds = time.time() - start
    return {"train_loss": total / max(count, 1), "lr": lr, "img/s": count / max(seconds, 1e-9), "seconds": seconds}


def resume_run(args, model, optimizer, path):
    """The checkpoint at `path`, loaded into model and optimizer; one of another configuration is refused."""
    with user_errors({OSError: "pass --resume the checkpoint-last.pth of a main_pretrain.py run",
                      ValueError: "pass --resume a checkpoint written by main_pretrain.py"}):
        ckpt = load_checkpoint(path)
    saved = ckpt.get("config")
    if saved is None or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a training checkpoint of main_pretrain.py "
                        "(pass its checkpoint-last.pth, or use another --output_dir)")
    config = run_config(args)
    diff = [k for k in sorted(set(config) | set(saved)) if config.get(k) != saved.get(k)]
    if diff:
        k = diff[0]
        raise UserError(f"{path} was trained with --{k} {saved.get(k)}, this run has --{k} {config.get(k)} "
                        "(use the same flags to continue it, or another --output_dir)")
    load_model_state(args, model, ckpt)
    optimizer.load_state_dict(ckpt["optimizer"])
    print(f"resumed from {path} after epoch {ckpt['epoch']}", flush=True)
    return ckpt


def write_release(ckpt, path, fp16):
    path = os.path.abspath(path)
    with user_errors(SAVE_REMEDIES):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_atomic(release(ckpt, fp16), path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, {ckpt['method']} release layout, "
          f"epoch {ckpt['epoch']})", flush=True)


def export(args):
    with user_errors({OSError: "pass --export a checkpoint written by main_pretrain.py",
                      ValueError: "pass --export a checkpoint written by main_pretrain.py"}):
        ckpt = load_checkpoint(args.export)
    if "config" not in ckpt or ckpt.get("method") not in RECIPES:
        raise UserError(f"{args.export} is not a checkpoint of main_pretrain.py (pass its checkpoint-last.pth)")
    if not args.release_path:
        raise UserError("--export needs --release_path (where to write the release-layout file)")
    write_release(ckpt, args.release_path, args.release_fp16)


def main(args):
    if args.export:
        return export(args)
    check_args(args)
    lock = take_output_dir(args.output_dir)
    try:
        pretrain(args)
    finally:
        lock.release()


def pretrain(args):
    torch.manual_seed(args.seed)
    model = build_model(args).to(args.device)
    optimizer = build_optimizer(args, model)
    dataset = build_train_set(args)
    loader = build_loader(dataset, args.batch_size, train=True, num_workers=args.num_workers,
                          pin_mem=args.device.startswith("cuda"), seed=args.seed)
    resume = args.resume or (os.path.join(args.output_dir, CHECKPOINT)
                             if os.path.exists(os.path.join(args.output_dir, CHECKPOINT)) else "")
    resumed = resume_run(args, model, optimizer, resume) if resume else None
    start_epoch, history = (resumed["epoch"] + 1, resumed.get("history", [])) if resumed else (0, [])
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.method} pretraining of {args.model} ({architecture(args)}), {args.input_size}px, "
          f"{len(dataset)} images of {args.data_path}, batch {args.batch_size}, lr {args.lr_value:.3g}, "
          f"{args.epochs} epochs, {params / 1e6:.2f}M trained parameters", flush=True)

    log = RunLog(args.output_dir, settings=vars(args), wandb=args.wandb, run_name=args.run_name)
    started = time.time()
    ckpt = None
    try:
        with bad_images_reported(DATA_REMEDIES[BadImageError]):
            for epoch in range(start_epoch, args.epochs):
                loader.set_epoch(epoch)
                stats = train_one_epoch(args, model, loader, optimizer, epoch, log)
                history.append(round(stats["train_loss"], 6))
                ckpt = training_checkpoint(args, model, optimizer, epoch, history)
                with user_errors(SAVE_REMEDIES):
                    save_atomic(ckpt, os.path.join(args.output_dir, CHECKPOINT))
                    if args.save_every and (epoch + 1) % args.save_every == 0:
                        save_atomic(ckpt, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
                log.line({"epoch": epoch, **{k: round(v, 6) for k, v in stats.items()}})
                log.scalars({"train/loss": stats["train_loss"], "perf/img_per_s": stats["img/s"]}, epoch)
                print(f"epoch {epoch}: loss {stats['train_loss']:.4f}, lr {stats['lr']:.3g}, "
                      f"{stats['seconds']:.1f}s ({stats['img/s']:.0f} img/s)", flush=True)
    finally:
        log.close()
    if ckpt is None:  # nothing left to train: the resumed checkpoint is the final one
        ckpt = resumed
        print(f"{resume} has already trained all {args.epochs} epochs", flush=True)
    print(f"done: {args.epochs} epochs, final loss {ckpt['history'][-1]:.4f}, "
          f"{time.time() - started:.0f}s in this run", flush=True)
    write_release(ckpt, args.release_path or os.path.join(args.output_dir, "release.pth"), args.release_fp16)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
