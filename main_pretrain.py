"""Self-supervised pretraining of a small ViT on the probing data pipeline: MAE (masked image modelling) or
MoCo v3 (joint-embedding, contrastive), so the project's probes can compare a learned MIM and a learned JEA encoder.

    python main_pretrain.py --method mae --data_path digits_clutter --output_dir output_dir/pretrain-mae \
        --release_path checkpoints/mae_mini_clutter.pth
    python main_linprobe.py --model vit_mini_patch8 --input_size 64 --finetune checkpoints/mae_mini_clutter.pth ...

OUTPUT_DIR/checkpoint-last.pth (model, optimizer, epoch, configuration) is written after every epoch; running the
same command again continues from it. At the end the release-layout file is written (MAE: {'model': encoder};
MoCo v3: {'state_dict': module.base_encoder.*, module.momentum_encoder.*, module.predictor.*}); `--export CKPT`
writes it from any checkpoint of this script.

The command line is read here only, as in main_linprobe.py: `resolve_pretrain` turns it into one frozen
PretrainConfig (`resolve_export` for --export), and everything below reads that. Library exceptions a user can
cause become one `error:` line at the calls below.
"""
import argparse
import os
import time

import torch
from torchvision import transforms

import engine_pretrain as engine
import pretrain_models
from cli import (
    SAVE_REMEDIES,
    add_logging_arguments,
    add_model_arguments,
    add_runtime_arguments,
    bad_images_reported,
    take_output_dir,
)
from cli import run as run_cli
from config import PRETRAIN_RECIPES, resolve_export, resolve_pretrain
from models_vit import architecture
from util import dashboard
from util.checkpoint import load_checkpoint, save_atomic
from util.data import build_dataset, build_loader
from util.dist import is_cuda
from util.errors import UserError, user_errors
from util.images import BICUBIC, BadImageError, normalize
from util.release_layouts import NOT_ENCODER
from util.run_log import RunLog
from util.run_state import LAST, LOG, IdentityMismatch, first_difference, pretrain_identity, truncate_log

# What a user should do when reading the data fails for a reason they can fix (first matching type wins).
DATA_REMEDIES = {FileNotFoundError: "pass --data_path digits_clutter, digits, or an ImageFolder root with "
                                    "train/<class>/",
                 BadImageError: "remove or replace the file",
                 ValueError: "fix the folder named, or pass another --data_path",
                 OSError: "check the folder named, or pass another --data_path"}
RELEASE_REMEDIES = {OSError: "free some disk space, or pass another --release_path"}


def get_args_parser():
    p = argparse.ArgumentParser("Self-supervised pretraining (MAE or MoCo v3) of a small ViT", add_help=True)
    p.add_argument("--method", choices=sorted(PRETRAIN_RECIPES), default=None, help="mae or mocov3 (required)")
    add_model_arguments(p, default_model="vit_mini_patch8", default_input_size=64, timm_names=False)
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
    add_runtime_arguments(o, amp_default=None, num_workers_default=0)
    o.add_argument("--output_dir", default="./output_dir/pretrain")
    o.add_argument("--resume", default="", help=f"default: OUTPUT_DIR/{LAST} if present")
    o.add_argument("--release_path", default="",
                   help="where the release-layout file goes at the end (default: OUTPUT_DIR/release.pth)")
    o.add_argument("--release_fp16", action="store_true",
                   help="store the release file's tensors as float16 (half the size; loaders upcast them)")
    o.add_argument("--export", default="", metavar="CKPT",
                   help="only write the release file of CKPT (a checkpoint of this script) to --release_path")
    o.add_argument("--save_every", type=int, default=0, help="also keep checkpoint-<epoch>.pth every N epochs")
    add_logging_arguments(o, images=True)
    return p


def main(args):
    """--export writes one release file under the lock of the folder it goes to; a training run holds its
    --output_dir's lock."""
    if args.export:
        config = resolve_export(args)
        lock = take_output_dir(os.path.dirname(config.release_path))
        try:
            export(config)
        finally:
            lock.release()
        return
    config = resolve_pretrain(args)
    lock = take_output_dir(config.output_dir)
    try:
        pretrain(config)
    finally:
        lock.release()


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


def pretrain_transform(method, input_size, crop_min):
    if method == "mae":
        return mae_transform(input_size, crop_min)
    return TwoCrops(moco_crop_transform(input_size, crop_min, 1.0, 0.0),
                    moco_crop_transform(input_size, crop_min, 0.1, 0.2))


def _plain_train_set(config):
    """The training images without augmentation (the fixed images of the reconstruction pictures)."""
    with user_errors(DATA_REMEDIES):
        return build_dataset(config.data_path, "train", config.input_size, augment=False)


def _log_pictures(config, log, model, samples, history, epoch, iterations):
    """MAE's masked input / reconstruction / original of the fixed images (the same masks every time), and the
    loss per epoch so far."""
    def reconstruction():
        model.eval()
        with torch.no_grad():
            images = samples.to(config.device)
            generator = torch.Generator(device=images.device).manual_seed(config.seed)
            _, pred, mask = model(images, generator=generator)
        model.train()
        return dashboard.mae_reconstruction_grid(images, model.patchify(images), pred, mask, model.patch_size,
                                                 norm_pix_loss=config.norm_pix_loss, scale=4)
    if samples is not None:
        log.picture("pictures/reconstruction", reconstruction, epoch, iterations)
    log.picture("pictures/loss_curve", lambda: dashboard.curve_picture(history, "train loss"), epoch, iterations)


def build_train_set(config):
    """The train split of --data_path (any dataset build_dataset knows) with the method's augmentation."""
    with user_errors(DATA_REMEDIES):
        dataset = build_dataset(config.data_path, "train", config.input_size, augment=False)
    # digits, digits_clutter, ImageFolder read .transform per item
    dataset.transform = pretrain_transform(config.method, config.input_size, config.crop_min)
    if config.max_images is not None and config.max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(config.max_images))
    return dataset


# ------------------------------------------------------------------------------------------------ model

def build_model(config):
    if config.method == "mae":
        return pretrain_models.build_mae(config.model, config.input_size, decoder_dim=config.decoder_dim,
                                         decoder_depth=config.decoder_depth, decoder_heads=config.decoder_heads,
                                         mask_ratio=config.mask_ratio, norm_pix_loss=config.norm_pix_loss,
                                         **config.arch_overrides)
    return pretrain_models.build_mocov3(config.model, config.input_size, dim=config.moco_dim,
                                        mlp_dim=config.moco_mlp_dim, temperature=config.moco_t,
                                        **config.arch_overrides)


# ------------------------------------------------------------------------------------------------ files

def model_key(method):
    """Where each release keeps its weights: MAE 'model', MoCo v3 'state_dict'."""
    return "model" if method == "mae" else "state_dict"


def model_state(method, model):
    """The model's state dict under its release's names (MoCo v3: main_moco.py saves DDP's `module.` keys)."""
    state = model.state_dict()
    return state if method == "mae" else {f"module.{k}": v for k, v in state.items()}


def load_model_state(method, model, ckpt):
    if method == "mae":
        model.load_state_dict(ckpt["model"])
    else:
        model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()})


def training_checkpoint(config, identity, model, optimizer, epoch, history):
    return {model_key(config.method): model_state(config.method, model), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "arch": config.model, "method": config.method, "config": identity,
            "args": config.to_dict(), "history": history}


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


def write_release(ckpt, path, fp16):
    with user_errors(RELEASE_REMEDIES):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_atomic(release(ckpt, fp16), path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, {ckpt['method']} release layout, "
          f"epoch {ckpt['epoch']})", flush=True)


def read_training_checkpoint(path, identity):
    """The training checkpoint at `path` if it continues this experiment: ValueError for a file main_pretrain.py
    did not write, IdentityMismatch naming the first setting that differs."""
    ckpt = load_checkpoint(path)
    saved = ckpt.get("config")
    if not isinstance(saved, dict) or "optimizer" not in ckpt:
        raise ValueError(f"{path} is not a training checkpoint of main_pretrain.py")
    key = first_difference(saved, identity, identity)
    if key:
        raise IdentityMismatch(path, key, saved[key], identity[key])
    return ckpt


def resume_run(config, identity, model, optimizer, path):
    """The checkpoint at `path`, loaded into model and optimizer, log.txt cut back to its epoch; one of another
    configuration is refused naming the flag."""
    remedy = "pass --resume the checkpoint-last.pth of a main_pretrain.py run, or use another --output_dir"
    with user_errors({OSError: remedy, ValueError: remedy}):
        try:
            ckpt = read_training_checkpoint(path, identity)
        except IdentityMismatch as err:
            raise UserError(f"{path} was trained with --{err.setting} {err.saved}, this run has --{err.setting} "
                            f"{err.current} (use the same flags to continue it, or another --output_dir)") from None
    load_model_state(config.method, model, ckpt)
    optimizer.load_state_dict(ckpt["optimizer"])
    truncate_log(os.path.join(config.output_dir, LOG), ckpt["epoch"])  # epochs logged after it are trained again
    print(f"resumed from {path} after epoch {ckpt['epoch']}", flush=True)
    return ckpt


def export(config):
    with user_errors({OSError: "pass --export a checkpoint written by main_pretrain.py",
                      ValueError: "pass --export a checkpoint written by main_pretrain.py"}):
        ckpt = load_checkpoint(config.export)
    if "config" not in ckpt or ckpt.get("method") not in PRETRAIN_RECIPES:
        raise UserError(f"{config.export} is not a checkpoint of main_pretrain.py (pass its checkpoint-last.pth)")
    write_release(ckpt, config.release_path, config.release_fp16)


# ------------------------------------------------------------------------------------------------ training

def pretrain(config):
    torch.manual_seed(config.seed)
    model = build_model(config).to(config.device)
    optimizer = engine.build_optimizer(model, lr=config.peak_lr, weight_decay=config.weight_decay,
                                       betas=config.betas)
    dataset = build_train_set(config)
    loader = build_loader(dataset, config.batch_size, train=True, num_workers=config.num_workers,
                          pin_mem=is_cuda(config.device), seed=config.seed)
    identity = pretrain_identity(config)
    last = os.path.join(config.output_dir, LAST)
    resume = config.resume or (last if os.path.exists(last) else "")
    resumed = resume_run(config, identity, model, optimizer, resume) if resume else None
    start_epoch, history = (resumed["epoch"] + 1, resumed.get("history", [])) if resumed else (0, [])
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    arch = architecture(config.model, **config.arch_overrides)
    sizes = {k: arch[k] for k in ("patch_size", "embed_dim", "depth", "num_heads")}
    print(f"{config.method} pretraining of {config.model} ({sizes}), {config.input_size}px, "
          f"{len(dataset)} images of {config.data_path}, batch {config.batch_size}, lr {config.peak_lr:.3g}, "
          f"{config.epochs} epochs, {params / 1e6:.2f}M trained parameters", flush=True)

    log = RunLog(config.output_dir, settings=config.to_dict(), wandb=config.wandb, run_name=config.run_name,
                 job_type="pretrain", dashboard=config.dashboard, resumed=resumed is not None, start_epoch=start_epoch,
                 info=dict(identity=identity, train_images=len(dataset), trained_parameters=params))
    samples = (dashboard.fixed_images(_plain_train_set(config))
               if config.method == "mae" and config.dashboard.images_every else None)
    started = time.time()
    ckpt = None
    try:
        with bad_images_reported(DATA_REMEDIES[BadImageError]):
            for epoch in range(start_epoch, config.epochs):
                loader.set_epoch(epoch)
                stats = train_epoch(config, model, loader, optimizer, epoch, log)
                history.append(round(stats["train_loss"], 6))
                # logged before the checkpoint: a kill in between leaves a line that the resumed run trims
                log.line({"epoch": epoch, **{k: round(v, 6) for k, v in stats.items()}})
                log.epoch({"train/loss": stats["train_loss"], "perf/img_per_s": stats["img/s"]}, epoch, len(loader))
                ckpt = training_checkpoint(config, identity, model, optimizer, epoch, history)
                with user_errors(SAVE_REMEDIES):
                    save_atomic(ckpt, os.path.join(config.output_dir, LAST))
                    if config.save_every and (epoch + 1) % config.save_every == 0:
                        save_atomic(ckpt, os.path.join(config.output_dir, f"checkpoint-{epoch}.pth"))
                if dashboard.pictures_due(epoch, config.dashboard.images_every, config.epochs):
                    _log_pictures(config, log, model, samples, history, epoch, len(loader))
                log.commit()  # wandb's rows after the checkpoint: a resumed run never sends an epoch twice
                print(f"epoch {epoch}: loss {stats['train_loss']:.4f}, lr {stats['lr']:.3g}, "
                      f"{stats['seconds']:.1f}s ({stats['img/s']:.0f} img/s)", flush=True)
    finally:
        log.close()
    if ckpt is None:  # nothing left to train: the resumed checkpoint is the final one
        ckpt = resumed
        print(f"{resume} has already trained all {config.epochs} epochs", flush=True)
    print(f"done: {config.epochs} epochs, final loss {ckpt['history'][-1]:.4f}, "
          f"{time.time() - started:.0f}s in this run", flush=True)
    write_release(ckpt, config.release_path, config.release_fp16)


def train_epoch(config, model, loader, optimizer, epoch, log):
    masks = engine.mask_generator(config.seed, epoch, config.device) if config.method == "mae" else None
    try:
        return engine.train_one_epoch(model, loader, optimizer, epoch, schedule=config.schedule,
                                      device=config.device, log=log, moco_m=config.moco_m, mask_generator=masks)
    except engine.NonFiniteLoss as err:
        raise UserError(f"{err}; stopped, the last good checkpoint is kept (start again with a lower --blr in a "
                        "new --output_dir)") from None


if __name__ == "__main__":
    run_cli(main, get_args_parser())
