"""The resolved configuration of a run (linear probing, attention statistics, pretraining): parsed flags in, one
frozen, typed value out.

Every value is validated here, before any weights or data are read, and nothing changes afterwards: the engine,
the run state and the checkpoints read this object, never the argparse namespace. This is the CLI edge, so its
errors are `UserError`s naming flags.
"""
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

import torch

from heads import HEADS, HeadOptions, NoClsToken, require_cls_token, resolve_head
from models_vit import MODELS, architecture
from util.data import NAMED_SETS
from util.dist import is_cuda, launch_env
from util.errors import UserError, user_errors
from util.lr_sched import WarmupCosine, scaled_lr
from util.subsets import FRACTION, LIST, PER_CLASS, TrainSubset

CONFIG_VERSION = 3  # 3: train_subset
CLS_REMEDY = "use pos, abmilp or another patch-token head"
MAX_SEED = 2 ** 32 - 1  # numpy's SeedSequence and DataLoader worker seeds need a 32-bit non-negative seed


def require(ok, message):
    if not ok:
        raise UserError(message)


def number_list(text, cast, flag):
    try:
        values = [cast(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of numbers (e.g. {flag} 0.1,0.3)") from None
    require(values, f"{flag} is empty (pass numbers separated by commas, e.g. {flag} 0.1,0.3)")
    return values


def finite(value, flag, *, minimum=None, above=None):
    """A finite float >= minimum (or > above), or a UserError naming the flag."""
    require(math.isfinite(value), f"{flag} {value} is not a finite number (pass a real number)")
    if minimum is not None:
        require(value >= minimum, f"{flag} {value:g} is below {minimum:g} (pass a value of at least {minimum:g})")
    if above is not None:
        require(value > above, f"{flag} {value:g} must be greater than {above:g} (pass a positive value)")
    return value


def at_least(value, flag, minimum):
    require(value >= minimum, f"{flag} {value} must be at least {minimum} (pass {flag} {max(minimum, 1)} or more)")
    return value


@dataclass(frozen=True)
class DashboardSpec:
    """Where TensorBoard/wandb put a run (util/run_log.py) and how often pictures are drawn."""
    project: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: Tuple[str, ...] = ()
    images_every: int = 0


def resolve_dashboard(args):
    """DashboardSpec from add_logging_arguments' flags (cli.py)."""
    names = {flag: getattr(args, flag.lstrip("-").replace("-", "_"), None)
             for flag in ("--wandb_project", "--wandb_entity", "--wandb_group")}
    for flag, value in names.items():
        require(value is None or (value.strip() and not re.search(r"[/\\#?%:]", value)),
                f"--{flag.lstrip('-')} {value!r} is not a wandb name (pass letters, digits, '-', '_' or '.')")
    tags = tuple(t.strip() for t in (getattr(args, "wandb_tags", "") or "").split(",") if t.strip())
    for tag in tags:
        require(len(tag) <= 64, f"--wandb_tags {tag!r} is longer than wandb's 64 characters (shorten it)")
    every = getattr(args, "log_images_every", 0) or 0
    at_least(every, "--log_images_every", 0)
    return DashboardSpec(project=names["--wandb_project"], entity=names["--wandb_entity"],
                         group=names["--wandb_group"], tags=tags, images_every=every)


def resolve_device(text):
    """A device string torch understands and this machine has. Under a launcher every process takes
    cuda:LOCAL_RANK (util.dist.process_device), so an explicit index is refused there."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"--device {text!r} is not a device (use cpu, cuda or cuda:N)") from None
    _, world, local_rank = launch_env()
    if device.type == "cuda" and world > 1:
        require(device.index is None, f"--device {text} names one GPU for all {world} processes (pass --device "
                                      "cuda: each process then takes cuda:LOCAL_RANK; CUDA_VISIBLE_DEVICES picks the "
                                      "GPUs)")
    if device.type == "cuda":
        require(torch.cuda.is_available(), f"--device {text} but no CUDA device is available (use --device cpu)")
        count = torch.cuda.device_count()
        local_world = max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), local_rank + 1) if world > 1 else 1
        require(local_world <= count, f"{local_world} processes on this machine need one GPU each but it has {count} "
                                      f"(start at most {count} per machine, e.g. torchrun --nproc_per_node {count})")
        if device.index is not None:
            require(device.index < count, f"--device {text} but this machine has {count} CUDA device(s) "
                                          f"(use cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise UserError(f"--device {text!r} is not supported (use cpu, cuda or cuda:N)")
    return str(device)


def check_amp(amp, device):
    require(not (amp == "float16" and not is_cuda(device)),
            "--amp float16 needs a CUDA device (use --amp bfloat16 or none on CPU)")
    return amp


@dataclass(frozen=True)
class EncoderSpec:
    """Which frozen encoder, read how, and which of its tokens the heads see."""
    model: str
    finetune: str = ""
    checkpoint_key: Optional[str] = None
    simmim: bool = False
    trust_checkpoint: bool = False
    no_cls_token: bool = False
    input_size: int = 224
    return_block: Optional[int] = None
    final_norm: bool = False

    def build_kwargs(self):
        """Keyword arguments of models_vit.build_encoder for this spec."""
        kwargs = dict(simmim=self.simmim, input_size=self.input_size, no_cls_token=self.no_cls_token,
                      final_norm=self.final_norm, trust_checkpoint=self.trust_checkpoint)
        if self.checkpoint_key is not None:
            kwargs["checkpoint_key"] = self.checkpoint_key
        return kwargs


def model_architecture(model):
    """models_vit.architecture for a --model value: sizes known without reading weights or downloading."""
    try:
        return architecture(model)
    except ValueError as err:
        raise UserError(f"{err} (pick a preset or a timm ViT-family architecture as --model)") from None


def resolve_encoder(args, *, with_block=True):
    """EncoderSpec from the encoder flags both entry points share; sizes checked against the architecture."""
    require(args.input_size >= 1, f"--input_size {args.input_size} must be positive (e.g. --input_size 224)")
    arch = model_architecture(args.model)
    patch, depth = arch["patch_size"], arch["depth"]
    require(args.input_size % patch == 0, f"--input_size {args.input_size} is not divisible by the patch size "
                                          f"{patch} of {args.model} (use a multiple of {patch})")
    block = getattr(args, "return_block", None) if with_block else None
    if block is not None:
        require(-depth <= block < depth, f"--return_block {block} does not exist in the {depth}-block {args.model} "
                                         f"(use 0..{depth - 1}, or -1 for the last block)")
    return EncoderSpec(model=args.model, finetune=args.finetune, checkpoint_key=args.checkpoint_key or None,
                       simmim=args.simmim, trust_checkpoint=args.trust_checkpoint,
                       no_cls_token=args.no_cls_token, input_size=args.input_size,
                       return_block=block, final_norm=bool(getattr(args, "final_norm", False)) and with_block)


@dataclass(frozen=True)
class ProbeSpec:
    """One probe of a run: a head trained at one peak lr. `name` is what logs, results and checkpoints show."""
    name: str
    head: str
    lr: float
    lr_label: str


@dataclass(frozen=True)
class KnnSpec:
    ks: Tuple[int, ...]
    temperatures: Tuple[float, ...]


@dataclass(frozen=True)
class LinprobeConfig:
    encoder: EncoderSpec
    probes: Tuple[ProbeSpec, ...]
    head_options: HeadOptions
    oracle: Optional[EncoderSpec]
    nb_classes: Optional[int]
    data_path: str
    download: bool
    augment: bool
    skip_bad_images: bool
    batch_size: int
    accum_iter: int
    world_size: int
    optimizer: str
    weight_decay: float
    schedule: WarmupCosine
    seed: int
    device: str
    amp: str
    output_dir: str
    resume: str = ""
    start_epoch: int = 0
    eval_only: bool = False
    cache_eval_gib: float = 0.0
    cache_train_gib: float = 0.0
    decoder: str = "pil"
    compile: bool = False
    knn: Optional[KnnSpec] = None
    train_subset: Optional[TrainSubset] = None
    num_workers: int = 8
    pin_mem: bool = True
    affinity_hack: bool = False
    wandb: bool = False
    run_name: Optional[str] = None
    dashboard: DashboardSpec = field(default_factory=DashboardSpec)
    version: int = field(default=CONFIG_VERSION)

    @property
    def effective_batch(self):
        return self.batch_size * self.accum_iter * self.world_size

    @property
    def epochs(self):
        return self.schedule.epochs

    @property
    def heads(self):
        return list(dict.fromkeys(p.head for p in self.probes))

    @property
    def needs_attention(self):
        return any(HEADS[h].needs_attention for h in self.heads)

    @property
    def needs_blocks(self):
        """How many last blocks' [cls] tokens the heads read (0: none)."""
        return max(HEADS[h].needs_blocks for h in self.heads)

    def to_dict(self):
        """A plain, versioned dict (what checkpoints store)."""
        return asdict(self)


def _probe_specs(heads, lrs, labels):
    single = len(heads) == 1 and len(lrs) == 1
    return tuple(ProbeSpec(head if single else f"{head}_{label}", head, lr, label)
                 for head in heads for lr, label in zip(lrs, labels))


def _head_options(args, encoder, heads):
    options = HeadOptions.from_args(args)
    for flag in ("abmilp_depth", "ep_queries", "ep_d_out", "map_heads", "esimpool_heads", "aim_heads", "jepa_heads"):
        at_least(getattr(options, flag), f"--{flag}", 1)
    arch = model_architecture(encoder.model)
    width = arch["embed_dim"]
    for head in heads:
        spec = HEADS[head]
        if spec.width_divisor is not None:
            divisor, what = spec.width_divisor(options)
            remedy = (f"use a divisor of {width}, e.g. {_divisor_near(width, divisor)}" if what.startswith("--")
                      else f"use another head, or an encoder whose width {divisor} divides")
            require(width % divisor == 0, f"--cls_features {head}: {what} must divide the width {width} "
                                          f"of {encoder.model} ({remedy})")
        if spec.needs_blocks:
            block = arch["depth"] - 1 if encoder.return_block is None else encoder.return_block % arch["depth"]
            require(spec.needs_blocks <= block + 1,
                    f"--cls_features {head} reads the [cls] of the last {spec.needs_blocks} blocks but {encoder.model} "
                    f"has {block + 1} up to the probed block {block} (use dinov2_n1 heads, or a --return_block of "
                    f"at least {spec.needs_blocks - 1})")
    return options


def _divisor_near(width, value):
    return min((d for d in range(1, width + 1) if width % d == 0), key=lambda d: abs(d - value))


SUBSET_FLAGS = ("--train_per_class", "--train_fraction", "--train_list")


def resolve_train_subset(args):
    """The TrainSubset of --train_per_class / --train_fraction / --train_list (at most one) and --subset_seed;
    None trains on the whole train split."""
    given = [flag for flag in SUBSET_FLAGS if getattr(args, flag[2:]) is not None]
    require(len(given) <= 1, f"{' and '.join(given)} cannot be combined: each chooses the training images (pass "
                             f"only one of {', '.join(SUBSET_FLAGS)})")
    seed = args.subset_seed
    if seed is not None:
        require(0 <= seed <= MAX_SEED, f"--subset_seed {seed} is out of range (use 0..{MAX_SEED})")
        require(given and given[0] != "--train_list", f"--subset_seed {seed} has no subset to draw (add "
                "--train_per_class K or --train_fraction P; a --train_list is used as listed)")
    if not given:
        return None
    seed = 0 if seed is None else seed
    if args.train_per_class is not None:
        return TrainSubset(PER_CLASS, at_least(args.train_per_class, "--train_per_class", 1), seed)
    if args.train_fraction is not None:
        fraction = finite(args.train_fraction, "--train_fraction", above=0)
        require(fraction <= 1, f"--train_fraction {fraction:g} is above 1 (pass a fraction in (0, 1], e.g. 0.01 "
                               "for 1%)")
        return TrainSubset(FRACTION, fraction, seed)
    path = os.path.abspath(os.path.expanduser(args.train_list))
    require(os.path.isfile(path), f"--train_list {args.train_list} is not a file (pass a text file with one "
                                  "image path per line, relative to the train folder)")
    return TrainSubset(LIST, path, None)


def resolve_linprobe(args, world_size=1):
    """The run's LinprobeConfig from main_linprobe's parsed arguments, or a UserError naming the first bad flag."""
    device = resolve_device(args.device)
    at_least(args.batch_size, "--batch_size", 1)
    at_least(args.accum_iter, "--accum_iter", 1)
    at_least(args.num_workers, "--num_workers", 0)
    require(args.epochs >= (0 if args.knn else 1),
            f"--epochs {args.epochs} must be at least 1 (pass a positive --epochs; 0 only with --knn)")
    at_least(args.warmup_epochs, "--warmup_epochs", 0)
    require(0 <= args.start_epoch and (args.start_epoch < args.epochs or args.eval or args.epochs == 0),
            f"--start_epoch {args.start_epoch} leaves nothing to train in {args.epochs} epochs "
            f"(use 0..{max(args.epochs - 1, 0)}, or raise --epochs)")
    require(0 <= args.seed <= MAX_SEED, f"--seed {args.seed} is out of range (use 0..{MAX_SEED})")
    finite(args.weight_decay, "--weight_decay", minimum=0)
    finite(args.cache_eval_features, "--cache_eval_features", minimum=0)
    finite(args.cache_train_features, "--cache_train_features", minimum=0)
    require(not args.cache_train_features or args.no_augment,
            f"--cache_train_features {args.cache_train_features:g} needs --no_augment (augmented crops differ every "
            "epoch, so there are no tokens to keep: add --no_augment, or leave --cache_train_features out)")
    require(args.decoder != "gpu" or is_cuda(device),
            f"--decoder gpu decodes on a CUDA device but --device is {device} (use --decoder fast on the CPU)")
    if args.nb_classes is not None:
        at_least(args.nb_classes, "--nb_classes", 1)

    encoder = resolve_encoder(args)
    try:
        heads = [resolve_head(name).name for name in args.cls_features.split(",") if name.strip()]
    except ValueError as err:
        raise UserError(f"{err} (pass --cls_features one or more heads of README's table, comma-separated)") from None
    require(heads, "--cls_features is empty (name at least one head, e.g. --cls_features cls)")
    with user_errors({NoClsToken: CLS_REMEDY}):
        require_cls_token(heads, not encoder.no_cls_token, "an encoder built with --no_cls_token")
    oracle = None
    if any(HEADS[h].needs_oracle for h in heads):
        require(args.oracle, "--cls_features oracle needs --oracle (a checkpoint path or timm name, e.g. a DINO "
                             "ViT-B/16)")
        oracle = EncoderSpec(model=args.oracle_model or args.model, finetune=args.oracle,
                             input_size=encoder.input_size, trust_checkpoint=args.trust_checkpoint)

    if args.lr is not None:
        lrs = [finite(v, "--lr", above=0) for v in number_list(args.lr, float, "--lr")]
        labels = [f"lr{v:g}" for v in lrs]
    else:
        blrs = [finite(v, "--blr", above=0) for v in number_list(args.blr, float, "--blr")]
        lrs = [scaled_lr(b, args.batch_size, args.accum_iter, world_size) for b in blrs]
        labels = [f"blr{v:g}" for v in blrs]
    finite(args.min_lr, "--min_lr", minimum=0)
    require(args.min_lr <= min(lrs), f"--min_lr {args.min_lr:g} exceeds the peak lr {min(lrs):.4g} "
                                     "(pass a --min_lr below every probe's lr, e.g. 0)")
    knn = None
    if args.knn:
        ks = tuple(at_least(k, "--knn_k", 1) for k in number_list(args.knn_k, int, "--knn_k"))
        temps = tuple(finite(t, "--knn_temperature", above=0)
                      for t in number_list(args.knn_temperature, float, "--knn_temperature"))
        knn = KnnSpec(ks, temps)

    train_subset = resolve_train_subset(args)
    output_dir = args.output_dir.rstrip("/") + args.suffix if args.suffix else args.output_dir
    return LinprobeConfig(
        encoder=encoder, probes=_probe_specs(heads, lrs, labels), head_options=_head_options(args, encoder, heads),
        oracle=oracle, nb_classes=args.nb_classes, data_path=str(args.data_path), download=args.download,
        augment=not args.no_augment, skip_bad_images=args.skip_bad_images, batch_size=args.batch_size,
        accum_iter=args.accum_iter, world_size=world_size, optimizer=args.optimizer, weight_decay=args.weight_decay,
        schedule=WarmupCosine(args.epochs, args.warmup_epochs, args.min_lr), seed=args.seed, device=device,
        amp=check_amp(args.amp, device), output_dir=os.path.expanduser(output_dir), resume=args.resume,
        start_epoch=args.start_epoch, eval_only=args.eval,
        cache_eval_gib=args.cache_eval_features, cache_train_gib=args.cache_train_features, decoder=args.decoder,
        compile=args.compile, knn=knn, train_subset=train_subset,
        num_workers=args.num_workers, pin_mem=args.pin_mem and is_cuda(device),
        affinity_hack=args.dataloader_affinity_hack, wandb=args.wandb, run_name=args.run_name,
        dashboard=resolve_dashboard(args))


@dataclass(frozen=True)
class StatsConfig:
    """The resolved configuration of main_attention_stats.py (measuring mode)."""
    encoder: EncoderSpec
    data_path: str
    max_images: Optional[int]
    batch_size: int
    device: str
    amp: str
    seed: int
    num_workers: int
    output_dir: str
    draw_2d_embeddings: bool
    skip_bad_images: bool
    tensorboard: bool
    wandb: bool
    run_name: Optional[str]
    dashboard: DashboardSpec = field(default_factory=DashboardSpec)

    def to_dict(self):
        return asdict(self)


def resolve_stats(args):
    """StatsConfig from main_attention_stats's parsed arguments, or a UserError naming the first bad flag."""
    device = resolve_device(args.device)
    at_least(args.batch_size, "--batch_size", 1)
    at_least(args.num_workers, "--num_workers", 0)
    if args.max_images is not None:
        at_least(args.max_images, "--max_images", 1)
    require(0 <= args.seed <= MAX_SEED, f"--seed {args.seed} is out of range (use 0..{MAX_SEED})")
    return StatsConfig(encoder=resolve_encoder(args, with_block=False), data_path=str(args.data_path),
                       max_images=args.max_images, batch_size=args.batch_size, device=device,
                       amp=check_amp(args.amp, device), seed=args.seed, num_workers=args.num_workers,
                       output_dir=os.path.expanduser(args.output_dir), draw_2d_embeddings=args.draw_2d_embeddings,
                       skip_bad_images=args.skip_bad_images, tensorboard=args.tensorboard, wandb=args.wandb,
                       run_name=args.run_name, dashboard=resolve_dashboard(args))


# ------------------------------------------------------------------------------------------------ pretraining

# Each method's published recipe (MAE: main_pretrain.py; MoCo v3: main_moco.py for ViTs); flags override them.
PRETRAIN_RECIPES = {
    "mae": dict(blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), crop_min=0.2),
    "mocov3": dict(blr=1.5e-4, weight_decay=0.1, betas=(0.9, 0.999), crop_min=0.08),
}
# What main_pretrain.py writes into its --output_dir: a --release_path there would overwrite the training state.
PRETRAIN_CHECKPOINT = re.compile(r"checkpoint-(last|\d+)\.pth")


@dataclass(frozen=True)
class PretrainConfig:
    """The resolved configuration of main_pretrain.py: its flags with the method's recipe filled in, validated.

    `lr` is --lr as given (None: from --blr), `peak_lr` the lr the schedule peaks at; `release_path` is absolute.
    """
    method: str
    model: str
    input_size: int
    embed_dim: Optional[int]
    depth: Optional[int]
    num_heads: Optional[int]
    batch_size: int
    epochs: int
    warmup_epochs: int
    blr: float
    lr: Optional[float]
    peak_lr: float
    min_lr: float
    weight_decay: float
    betas: Tuple[float, float]
    crop_min: float
    max_images: Optional[int]
    seed: int
    mask_ratio: float
    norm_pix_loss: bool
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    moco_dim: int
    moco_mlp_dim: int
    moco_t: float
    moco_m: float
    data_path: str
    num_workers: int
    device: str
    output_dir: str
    resume: str
    release_path: str
    release_fp16: bool
    save_every: int
    wandb: bool
    run_name: Optional[str]
    dashboard: DashboardSpec = field(default_factory=DashboardSpec)

    @property
    def schedule(self) -> WarmupCosine:
        return WarmupCosine(self.epochs, self.warmup_epochs, self.min_lr)

    @property
    def arch_overrides(self) -> dict:
        """--embed_dim/--depth/--num_heads as given: the sizes that replace the preset's."""
        sizes = dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads)
        return {k: v for k, v in sizes.items() if v is not None}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExportConfig:
    """main_pretrain.py --export: the training checkpoint to read and where its release file goes."""
    export: str
    release_path: str
    release_fp16: bool


def _pretrain_architecture(model, overrides, input_size):
    """The preset's sizes with the overrides applied, checked the way MAE and MoCo v3 build their ViTs."""
    require(model in MODELS, f"unknown model '{model}' for pretraining (choose one of {', '.join(MODELS)})")
    for name, value in overrides.items():
        at_least(value, f"--{name}", 1)
    arch = architecture(model, **overrides)
    width, heads, patch = arch["embed_dim"], arch["num_heads"], arch["patch_size"]
    require(width % heads == 0 and width % 4 == 0, f"width {width} must be divisible by 4 (sin-cos positions) and by "
                                                   f"the {heads} heads (change --embed_dim or --num_heads)")
    require(input_size >= 1 and input_size % patch == 0, f"--input_size {input_size} is not divisible by the patch "
                                                         f"size {patch} (use a multiple of {patch})")
    return arch


def _mae_flags(args, patches):
    ratio = finite(args.mask_ratio, "--mask_ratio")
    require(0 < ratio < 1, f"--mask_ratio {ratio:g} must be between 0 and 1 (MAE uses 0.75)")
    keep = int(round(patches * (1 - ratio)))
    require(0 < keep < patches, f"--mask_ratio {ratio:g} keeps {keep} of the {patches} patches of an image (MAE "
                                "needs at least one kept and one masked patch; pass e.g. --mask_ratio 0.75)")
    at_least(args.decoder_dim, "--decoder_dim", 1)
    at_least(args.decoder_depth, "--decoder_depth", 0)
    at_least(args.decoder_heads, "--decoder_heads", 1)
    dim, heads = args.decoder_dim, args.decoder_heads
    require(dim % heads == 0 and dim % 4 == 0, f"--decoder_dim {dim} must be divisible by 4 (sin-cos positions) and "
                                               f"by --decoder_heads {heads} (e.g. --decoder_dim 64 --decoder_heads 4)")


def _moco_flags(args):
    at_least(args.batch_size, "--batch_size", 2)  # the projector's BatchNorm and InfoNCE's negatives need two
    at_least(args.moco_dim, "--moco_dim", 1)
    at_least(args.moco_mlp_dim, "--moco_mlp_dim", 1)
    finite(args.moco_t, "--moco_t", above=0)
    momentum = finite(args.moco_m, "--moco_m", minimum=0)
    require(momentum < 1, f"--moco_m {momentum:g} must be below 1 (the momentum rises from it to 1; MoCo v3 uses "
                          "0.99)")


def _release_path(text, *, run_folder, own_files):
    """--release_path, absolute, if a file can be written there and it is neither one of `own_files` nor a training
    checkpoint in `run_folder`; checked before training, not after the last epoch."""
    path = os.path.abspath(os.path.expanduser(text))
    require(not os.path.isdir(path), f"--release_path {text} is a folder (pass a file path, e.g. "
                                     f"--release_path {os.path.join(text, 'release.pth')})")
    real = os.path.realpath(path)
    ours = real in {os.path.realpath(f) for f in own_files if f} or (
        os.path.dirname(real) == os.path.realpath(run_folder) and PRETRAIN_CHECKPOINT.fullmatch(os.path.basename(real)))
    require(not ours, f"--release_path {text} is a training checkpoint of this run and would be overwritten (pass "
                      "another --release_path, e.g. release.pth in the output folder)")
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    require(os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK),
            f"--release_path {text} cannot be written: {folder} is not a writable folder (pass another "
            "--release_path)")
    return path


def resolve_export(args):
    """ExportConfig from main_pretrain's --export, --release_path and --release_fp16, or a UserError."""
    require(os.path.isfile(os.path.expanduser(args.export)), f"--export {args.export} is not a file (pass the "
            "checkpoint-last.pth or checkpoint-<epoch>.pth of a main_pretrain.py run)")
    require(args.release_path, "--export needs --release_path (where to write the release-layout file)")
    export = os.path.abspath(os.path.expanduser(args.export))
    return ExportConfig(export=export,
                        release_path=_release_path(args.release_path, run_folder=os.path.dirname(export),
                                                   own_files=[export]),
                        release_fp16=args.release_fp16)


def resolve_pretrain(args):
    """PretrainConfig from main_pretrain's parsed arguments, or a UserError naming the first bad flag."""
    require(args.method is not None, "--method is required (pass --method mae or --method mocov3)")
    device = resolve_device(args.device)
    at_least(args.batch_size, "--batch_size", 1)
    at_least(args.epochs, "--epochs", 1)
    require(0 <= args.warmup_epochs <= args.epochs,
            f"--warmup_epochs {args.warmup_epochs} must be between 0 and --epochs {args.epochs} (pass "
            f"--warmup_epochs 0..{args.epochs})")
    at_least(args.num_workers, "--num_workers", 0)
    at_least(args.save_every, "--save_every", 0)
    require(0 <= args.seed <= MAX_SEED, f"--seed {args.seed} is out of range (use 0..{MAX_SEED})")
    require(str(args.data_path).partition(":")[0] not in NAMED_SETS,
            f"--data_path {args.data_path}: main_pretrain.py reads digits_clutter, digits or an ImageFolder root "
            "(pass one of those)")
    if args.max_images is not None:
        require(args.max_images >= 2, f"--max_images {args.max_images} must be at least 2 (or leave it out)")
    overrides = {k: getattr(args, k) for k in ("embed_dim", "depth", "num_heads") if getattr(args, k) is not None}
    arch = _pretrain_architecture(args.model, overrides, args.input_size)

    recipe = PRETRAIN_RECIPES[args.method]
    blr = finite(recipe["blr"] if args.blr is None else args.blr, "--blr", above=0)
    peak_lr = finite(scaled_lr(blr, args.batch_size) if args.lr is None else args.lr,
                     "--lr" if args.lr is not None else "the lr from --blr", above=0)
    finite(args.min_lr, "--min_lr", minimum=0)
    require(args.min_lr <= peak_lr, f"--min_lr {args.min_lr:g} exceeds the peak lr {peak_lr:.4g} (pass a --min_lr "
                                    "below the lr, e.g. 0)")
    weight_decay = finite(recipe["weight_decay"] if args.weight_decay is None else args.weight_decay,
                          "--weight_decay", minimum=0)
    crop_min = finite(recipe["crop_min"] if args.crop_min is None else args.crop_min, "--crop_min", above=0)
    require(crop_min <= 1, f"--crop_min {crop_min:g} must be in (0, 1] (the smallest crop's share of the image)")
    if args.method == "mae":
        _mae_flags(args, (args.input_size // arch["patch_size"]) ** 2)
    else:
        _moco_flags(args)

    output_dir = os.path.expanduser(args.output_dir)
    resume = os.path.expanduser(args.resume) if args.resume else ""
    require(not resume or os.path.isfile(resume), f"--resume {args.resume} is not a file (pass the "
                                                  "checkpoint-last.pth of a main_pretrain.py run)")
    release_path = _release_path(args.release_path or os.path.join(output_dir, "release.pth"),
                                 run_folder=output_dir, own_files=[resume])
    return PretrainConfig(
        method=args.method, model=args.model, input_size=args.input_size, embed_dim=args.embed_dim,
        depth=args.depth, num_heads=args.num_heads, batch_size=args.batch_size, epochs=args.epochs,
        warmup_epochs=args.warmup_epochs, blr=blr, lr=args.lr, peak_lr=peak_lr, min_lr=args.min_lr,
        weight_decay=weight_decay, betas=recipe["betas"], crop_min=crop_min, max_images=args.max_images,
        seed=args.seed, mask_ratio=args.mask_ratio, norm_pix_loss=args.norm_pix_loss, decoder_dim=args.decoder_dim,
        decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads, moco_dim=args.moco_dim,
        moco_mlp_dim=args.moco_mlp_dim, moco_t=args.moco_t, moco_m=args.moco_m, data_path=str(args.data_path),
        num_workers=args.num_workers, device=device, output_dir=output_dir, resume=resume,
        release_path=release_path, release_fp16=args.release_fp16, save_every=args.save_every, wandb=args.wandb,
        run_name=args.run_name, dashboard=resolve_dashboard(args))
