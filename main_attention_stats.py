"""Per-block attention statistics of a frozen ViT (gmum/beyond_cls's diagnosis plus naver-ai/cl-vs-mim's
attention distance, NMI and Fourier analysis), streamed over a folder of images, with plots.

    python main_attention_stats.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth --output_dir OUT
    python main_attention_stats.py --compare OUT_MAE OUT_DINO --output_dir OUT_COMPARE   # overlay runs

Writes attention_stats.csv / .json, plot_<metric>.png, cls_attention_overlays.png and, with
--draw_2d_embeddings, tsne_images.png and tsne_tokens.png. Metric definitions: util/attention_metrics.py.
"""
import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models_vit import MODELS, NonFiniteWeights, architecture, build_encoder, capture_attention
from util.attention_metrics import AttentionStatsAccumulator, metric_names
from util.amp import AMP_DTYPES, autocast
from util.checkpoint import check_output_dir
from util.data import build_image_set, build_loader, find_user_error
from util.errors import UserError, exit_on_user_error, user_errors
from util import plots

CSV_NAME, JSON_NAME = "attention_stats.csv", "attention_stats.json"
OVERLAY_NAME, TSNE_IMAGES_NAME, TSNE_TOKENS_NAME = "cls_attention_overlays.png", "tsne_images.png", "tsne_tokens.png"
NUM_OVERLAYS = 6
MAX_TSNE_IMAGES, TOKENS_PER_IMAGE, MAX_TSNE_TOKENS = 3000, 8, 3000  # bounds memory of --draw_2d_embeddings


def get_args_parser():
    p = argparse.ArgumentParser("attention statistics of a frozen ViT", add_help=True)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--model", default="vit_base_patch16",
                   help=f"a preset ({', '.join(MODELS)}) or a timm ViT/BEiT architecture name")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--simmim", action="store_true", help="optional: insist that --finetune is a SimMIM/BEiT file")
    p.add_argument("--finetune", default="", help="checkpoint file of any supported release, or a timm "
                   "pretrained name (default: random init)")
    p.add_argument("--checkpoint_key", default="", help="sub-model or entry to read (default: the release's own)")
    p.add_argument("--no_cls_token", action="store_true", help="random encoder without [cls] (a checkpoint "
                   "without one is recognised): patch metrics only")
    p.add_argument("--data_path", default="samples",
                   help="ImageFolder, flat folder of images, or 'samples' (scikit-image's bundled photos)")
    p.add_argument("--max_images", type=int, default=None, help="use at most this many images (evenly spaced)")
    p.add_argument("--skip_bad_images", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--output_dir", default="output_dir/attention_stats")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--amp", choices=list(AMP_DTYPES), default="none")
    p.add_argument("--draw_2d_embeddings", action="store_true", help="image- and token-level t-SNE plots")
    p.add_argument("--compare", nargs="+", metavar="DIR", default=None,
                   help="only overlay the attention_stats.csv of these run folders, one figure per metric")
    p.add_argument("--tensorboard", action="store_true", help="also log the per-block values to TensorBoard")
    p.add_argument("--wandb", action="store_true", help="log to wandb (also on when WANDB_PROJECT is set)")
    p.add_argument("--run_name", default=None, help="wandb run name (default: the output folder's name)")
    return p


# ------------------------------------------------------------------------------------------------ checks

def check_args(args):
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size} must be at least 1 (pass a positive batch size)")
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max_images {args.max_images} must be at least 1 (pass a positive number)")
    if args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers} must be 0 or more (pass 0 to load images in this process)")
    with user_errors({ValueError: "pick a preset or a timm ViT/BEiT architecture as --model"}):
        patch = architecture(args.model)["patch_size"]
    if args.input_size < 1 or args.input_size % patch:
        raise UserError(f"--input_size {args.input_size} is not a positive multiple of the patch size {patch} "
                        f"(use a multiple of {patch}, e.g. {patch * (224 // patch)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but no CUDA device is available (use --device cpu)")
    if args.amp == "float16" and not args.device.startswith("cuda"):
        raise UserError("--amp float16 needs a CUDA device (use --amp bfloat16 or none on CPU)")
    check_output_dir(args.output_dir)


# ------------------------------------------------------------------------------------------------ measuring

class EmbeddingSamples:
    """Bounded image-level features ([cls], or mean patch token without it) and random patch tokens for t-SNE."""

    def __init__(self, seed):
        self.images, self.image_labels, self.tokens, self.token_labels = [], [], [], []
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, tokens, labels, num_prefix, has_cls):
        tokens, labels = tokens.float().cpu(), labels.cpu()
        if sum(map(len, self.images)) < MAX_TSNE_IMAGES:
            self.images.append(tokens[:, 0] if has_cls else tokens[:, num_prefix:].mean(1))
            self.image_labels.append(labels)
        if sum(map(len, self.tokens)) < MAX_TSNE_TOKENS:
            patches = tokens[:, num_prefix:]
            pick = torch.rand(patches.shape[:2], generator=self.generator).argsort(1)[:, :TOKENS_PER_IMAGE]
            picked = torch.gather(patches, 1, pick[..., None].expand(-1, -1, patches.shape[-1]))
            self.tokens.append(picked.flatten(0, 1))
            self.token_labels.append(labels.repeat_interleave(pick.shape[1]))

    def arrays(self, kind):
        features, labels = (self.images, self.image_labels) if kind == "images" else (self.tokens, self.token_labels)
        limit = MAX_TSNE_IMAGES if kind == "images" else MAX_TSNE_TOKENS
        return torch.cat(features)[:limit].numpy(), torch.cat(labels)[:limit].numpy()


def measure(encoder, loader, device, amp, embeddings=None):
    """Streams the loader through the encoder: (accumulator, overlay images, their [cls] maps or None)."""
    stats = AttentionStatsAccumulator()
    prefix, grid, patch = encoder.num_prefix_tokens, encoder.grid_size, encoder.patch_size
    has_cls = bool(encoder.has_class_token)  # token 0; registers (if any) sit between it and the patches
    overlay_images, overlay_maps = [], []
    bar = tqdm(total=len(loader.dataset), unit="img", desc="attention stats", dynamic_ncols=True)
    with bar, capture_attention(encoder) as cap, torch.no_grad():  # the bar ends its line before any error
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            with autocast(device, amp):
                tokens = encoder.forward_tokens(images)
            stats.update(cap.records, prefix, grid, patch, has_cls)
            missing = NUM_OVERLAYS - sum(map(len, overlay_images))
            if missing > 0 and has_cls:
                last = cap.records[-1]["attn"][:missing]  # last block, head-averaged [cls] -> patch attention
                overlay_images.append(images[:missing].cpu())
                overlay_maps.append(last[:, :, 0, prefix:].mean(1).reshape(-1, *grid).cpu())
            if embeddings is not None:
                embeddings.add(tokens, labels, prefix, has_cls)
            bar.update(len(images))
    if not has_cls:
        return stats, None, None
    return stats, torch.cat(overlay_images), torch.cat(overlay_maps)


def run_loader(encoder, loader, device, amp, embeddings):
    try:
        return measure(encoder, loader, device, amp, embeddings)
    except UserError:
        raise
    except Exception as err:  # a DataLoader worker re-raises a bad image as a RuntimeError with its traceback
        user_error = find_user_error(err)
        if user_error is None:
            raise
        raise user_error from None


# ------------------------------------------------------------------------------------------------ outputs

def write_tables(output_dir, results, metrics, metadata):
    with open(output_dir / CSV_NAME, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["block", *metrics])
        for block, row in results.items():
            writer.writerow([block, *(f"{row[m]:.8g}" for m in metrics)])
    blocks = [{"block": block, **row} for block, row in results.items()]
    with open(output_dir / JSON_NAME, "w") as f:
        json.dump({"metadata": metadata, "metrics": list(metrics), "blocks": blocks}, f, indent=1)


def draw_tsne(output_dir, embeddings, class_names, seed, has_cls):
    from sklearn.manifold import TSNE

    written = []
    for kind, name in (("images", TSNE_IMAGES_NAME), ("tokens", TSNE_TOKENS_NAME)):
        features, labels = embeddings.arrays(kind)
        if len(features) < 4:
            print(f"warning: {len(features)} {kind} are too few for t-SNE; {name} not drawn", file=sys.stderr)
            continue
        perplexity = float(min(30, (len(features) - 1) / 3))  # sklearn needs perplexity < samples
        points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
        level = ("image ([cls])" if has_cls else "image (mean patch token)") if kind == "images" else "patch token"
        plots.plot_embedding_2d(points, labels, class_names, output_dir / name, f"t-SNE of {level} features")
        written.append(output_dir / name)
    return written


def compare_runs(run_dirs, output_dir):
    """One compare_<metric>.png per metric found in any run's CSV; a line per run."""
    runs = {}
    for run_dir in run_dirs:
        csv_path = Path(run_dir) / CSV_NAME
        if not csv_path.is_file():
            raise UserError(f"{csv_path} does not exist (pass folders written by main_attention_stats.py)")
        label = Path(run_dir).resolve().name
        runs[label if label not in runs else str(run_dir)] = plots.read_stats_csv(csv_path)
    check_output_dir(output_dir)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = list(dict.fromkeys(m for names, _ in runs.values() for m in names))
    for metric in metrics:
        lines = {label: values[metric] for label, (_, values) in runs.items() if metric in values}
        plots.plot_metric_vs_depth(lines, metric, output_dir / f"compare_{metric}.png")
    print(f"wrote {len(metrics)} comparison plots of {len(runs)} runs to {output_dir}")


def log_to_dashboards(args, results, metrics, pngs):
    if not (args.tensorboard or args.wandb or os.environ.get("WANDB_PROJECT")):
        return
    from util.run_log import RunLog

    log = RunLog(args.output_dir, args, tensorboard=args.tensorboard)
    for block, row in results.items():
        log.scalars({f"attention_stats/{m}": row[m] for m in metrics}, step=block)
    for png in pngs:
        log.image(f"attention_stats/{png.stem}", str(png))
    log.close()


# ------------------------------------------------------------------------------------------------ main

def main(args):
    if args.compare:
        return compare_runs(args.compare, args.output_dir)
    check_args(args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dataset = build_image_set(args.data_path, args.input_size, max_images=args.max_images,
                              skip_bad_images=args.skip_bad_images)
    if len(dataset) == 0:
        raise UserError(f"no images found in {args.data_path} (pass --data_path a folder of images or samples)")
    with user_errors({FileNotFoundError: "check the --finetune path",
                      NonFiniteWeights: "use a checkpoint saved before the run diverged",
                      ValueError: "pick the --model that matches the checkpoint, or set --checkpoint_key"}):
        encoder = build_encoder(args.model, args.finetune, simmim=args.simmim, checkpoint_key=args.checkpoint_key,
                                input_size=args.input_size, no_cls_token=args.no_cls_token).to(args.device)
    loader = build_loader(dataset, args.batch_size, train=False, num_workers=args.num_workers,
                          pin_mem=args.device.startswith("cuda"))
    embeddings = EmbeddingSamples(args.seed) if args.draw_2d_embeddings else None

    start = time.time()
    stats, overlay_images, overlay_maps = run_loader(encoder, loader, args.device, args.amp, embeddings)
    results = stats.result()
    seconds = time.time() - start
    bad = getattr(dataset, "bad_images", 0)
    if bad:
        print(f"warning: skipped {bad} unreadable image(s)", file=sys.stderr)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)  # only our own files are (over)written below
    has_cls = bool(encoder.has_class_token)
    metrics = metric_names(has_cls)
    metadata = dict(model=args.model, checkpoint=args.finetune or "random init", simmim=args.simmim,
                    checkpoint_key=args.checkpoint_key, data_path=str(args.data_path), images=stats.images,
                    input_size=args.input_size, patch_size=encoder.patch_size, grid=list(encoder.grid_size),
                    num_prefix_tokens=encoder.num_prefix_tokens, has_cls_token=has_cls,
                    num_reg_tokens=encoder.num_reg_tokens, depth=encoder.depth,
                    num_heads=encoder.blocks[0].attn.num_heads, amp=args.amp, device=args.device,
                    seconds=round(seconds, 2))
    write_tables(output_dir, results, metrics, metadata)
    pngs = []
    for metric in metrics:
        pngs.append(output_dir / f"plot_{metric}.png")
        plots.plot_metric_vs_depth({args.model: [row[metric] for row in results.values()]}, metric, pngs[-1])
    if overlay_images is not None:
        pngs.append(output_dir / OVERLAY_NAME)
        plots.plot_attention_overlays(overlay_images, overlay_maps, pngs[-1],
                                      "[cls] attention of the last block, mean over heads")
    if embeddings is not None:
        pngs += draw_tsne(output_dir, embeddings, dataset.classes, args.seed, has_cls)
    log_to_dashboards(args, results, metrics, pngs)
    print(f"{stats.images} images in {seconds:.1f}s ({stats.images / max(seconds, 1e-9):.1f} img/s); "
          f"wrote {CSV_NAME}, {JSON_NAME} and {len(pngs)} plots to {output_dir}")


if __name__ == "__main__":
    with exit_on_user_error():
        main(get_args_parser().parse_args())
