"""Per-block attention statistics of a frozen ViT (gmum/beyond_cls's diagnosis plus naver-ai/cl-vs-mim's
attention distance, NMI and Fourier analysis), streamed over a folder of images, with plots.

    python main_attention_stats.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth --output_dir OUT
    python main_attention_stats.py --compare OUT_MAE OUT_DINO --output_dir OUT_COMPARE   # overlay runs

Writes attention_stats.csv / .json, plot_<metric>.png, cls_attention_overlays.png and, with
--draw_2d_embeddings, tsne_images.png and tsne_tokens.png, and lists them with their checksums in
attention_stats_outputs.json: a later run in the folder removes those (unless changed since), never anything else.
Metric definitions: util/attention_metrics.py.
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

from cli import (
    ENCODER_REMEDIES,
    add_encoder_arguments,
    add_logging_arguments,
    add_runtime_arguments,
    bad_images_reported,
    take_output_dir,
)
from cli import run as run_cli
from config import resolve_stats
from models_vit import build_encoder, capture_attention
from util import plots
from util.amp import autocast
from util.attention_metrics import AttentionStatsAccumulator, fourier_grid_problem, metric_names
from util.checkpoint import write_json_atomic
from util.data import build_image_set, build_loader, data_source
from util.dist import is_cuda
from util.errors import UserError, user_errors
from util.images import BadImageError
from util.run_state import file_sha256

CSV_NAME, JSON_NAME = "attention_stats.csv", "attention_stats.json"
MANIFEST_NAME = "attention_stats_outputs.json"  # {mode: {file name: sha256}}: what each mode last wrote here
MEASURE, COMPARE = "measure", "compare"
OVERLAY_NAME, TSNE_IMAGES_NAME, TSNE_TOKENS_NAME = "cls_attention_overlays.png", "tsne_images.png", "tsne_tokens.png"
NUM_OVERLAYS = 6
MAX_TSNE_IMAGES, TOKENS_PER_IMAGE, MAX_TSNE_TOKENS = 3000, 8, 3000  # bounds memory of --draw_2d_embeddings


def get_args_parser():
    p = argparse.ArgumentParser("attention statistics of a frozen ViT", add_help=True)
    p.add_argument("--batch_size", type=int, default=64)
    add_encoder_arguments(p)
    add_runtime_arguments(p, amp_default="none")
    p.add_argument("--data_path", default="samples",
                   help="ImageFolder, flat folder of images, or 'samples' (scikit-image's bundled photos)")
    p.add_argument("--max_images", type=int, default=None, help="use at most this many images (evenly spaced)")
    p.add_argument("--skip_bad_images", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--output_dir", default="output_dir/attention_stats")
    p.set_defaults(num_workers=min(4, os.cpu_count() or 1))
    p.add_argument("--draw_2d_embeddings", action="store_true", help="image- and token-level t-SNE plots")
    p.add_argument("--compare", nargs="+", metavar="DIR", default=None,
                   help="only overlay the attention_stats.csv of these run folders, one figure per metric")
    p.add_argument("--tensorboard", action="store_true", help="also log the per-block values to TensorBoard")
    add_logging_arguments(p)
    return p


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
    with bad_images_reported(IMAGE_REMEDIES[BadImageError]):
        return measure(encoder, loader, device, amp, embeddings)


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


def read_manifest(output_dir):
    """{mode: {file name: sha256}} of the files earlier runs of this script wrote to output_dir ({} if none did)."""
    try:
        manifest = json.loads((Path(output_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def remove_stale_outputs(output_dir, mode):
    """The files the manifest says an earlier run in `mode` wrote here, so a reused folder holds only this run's
    results, not old plots beside new tables. Only those, and only while unchanged since (a file a user edited or
    replaced stays, with a note); never by a name pattern, which would take a user's plot_my_figure.png."""
    for name, digest in (read_manifest(output_dir).get(mode) or {}).items():
        path = Path(output_dir) / str(name)
        if Path(str(name)).name != name or not path.is_file():  # a plain file of this folder, nothing else
            continue
        if file_sha256(path) != digest:
            print(f"note: kept {path}: it changed since an earlier run wrote it", file=sys.stderr)
            continue
        path.unlink()


def record_outputs(output_dir, mode, paths):
    """The manifest entry of `mode`: the files this run wrote, with their checksums (other modes' stay)."""
    manifest = read_manifest(output_dir)
    manifest[mode] = {Path(p).name: file_sha256(p) for p in paths if Path(p).is_file()}
    write_json_atomic(Path(output_dir) / MANIFEST_NAME, manifest)


def read_runs(run_dirs):
    """{label: (metric names, values)} of each folder's attention_stats.csv."""
    runs = {}
    for run_dir in run_dirs:
        csv_path = Path(run_dir) / CSV_NAME
        if not csv_path.is_file():
            raise UserError(f"{csv_path} does not exist (pass folders written by main_attention_stats.py)")
        label = Path(run_dir).resolve().name
        with user_errors({ValueError: "pass folders whose attention_stats.csv main_attention_stats.py wrote"}):
            runs[label if label not in runs else str(run_dir)] = plots.read_stats_csv(csv_path)
    return runs


def compare_runs(runs, output_dir):
    """One compare_<metric>.png per metric found in any run's CSV; a line per run."""
    remove_stale_outputs(output_dir, COMPARE)
    metrics = list(dict.fromkeys(m for names, _ in runs.values() for m in names))
    for metric in metrics:
        lines = {label: values[metric] for label, (_, values) in runs.items() if metric in values}
        plots.plot_metric_vs_depth(lines, metric, output_dir / f"compare_{metric}.png")
    record_outputs(output_dir, COMPARE, [output_dir / f"compare_{metric}.png" for metric in metrics])
    print(f"wrote {len(metrics)} comparison plots of {len(runs)} runs to {output_dir}")


def log_to_dashboards(config, results, metrics, pngs, metadata=None):
    """Per-block values (x: the block), the table of attention_stats.csv and every figure, to TensorBoard
    (--tensorboard) and wandb."""
    from util.run_log import RunLog, wandb_requested

    if not (config.tensorboard or wandb_requested(config.wandb)):
        return

    log = RunLog(config.output_dir, settings=config.to_dict(), info=metadata, wandb=config.wandb,
                 run_name=config.run_name, tensorboard=config.tensorboard, job_type="attention_stats",
                 dashboard=config.dashboard)
    for block, row in results.items():
        log.scalars({f"attention_stats/{m}": row[m] for m in metrics}, step=block)
    log.table("attention_stats/table", [{"block": block, **{m: row[m] for m in metrics}}
                                        for block, row in results.items()])
    for png in pngs:
        log.image(f"attention_stats/{png.stem}", str(png))
    log.close()


# ------------------------------------------------------------------------------------------------ main

IMAGE_REMEDIES = {FileNotFoundError: "pass --data_path a folder of images, an ImageFolder, or samples",
                  BadImageError: "remove or replace the file, or pass --skip_bad_images",
                  ValueError: "pass --data_path a folder of images, an ImageFolder, or samples"}


def main(args):
    """One run writes a folder at a time: the folder is locked as main_linprobe.py and main_pretrain.py lock theirs."""
    runs = read_runs(args.compare) if args.compare else None
    config = None if args.compare else resolve_stats(args)
    output_dir = Path(args.output_dir).expanduser()
    lock = take_output_dir(output_dir)
    try:
        return compare_runs(runs, output_dir) if runs else attention_stats(config, output_dir)
    finally:
        lock.release()


def attention_stats(config, output_dir):
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    with user_errors(IMAGE_REMEDIES):
        dataset = build_image_set(config.data_path, config.encoder.input_size, max_images=config.max_images,
                                  skip_bad_images=config.skip_bad_images)
    if len(dataset) == 0:
        raise UserError(f"no images found in {config.data_path} (pass --data_path a folder of images or samples)")
    with user_errors(ENCODER_REMEDIES):
        encoder = build_encoder(config.encoder.model, config.encoder.finetune,
                                **config.encoder.build_kwargs()).to(config.device)
    loader = build_loader(dataset, config.batch_size, train=False, num_workers=config.num_workers,
                          pin_mem=is_cuda(config.device))
    embeddings = EmbeddingSamples(config.seed) if config.draw_2d_embeddings else None

    start = time.time()
    stats, overlay_images, overlay_maps = run_loader(encoder, loader, config.device, config.amp, embeddings)
    results = stats.result()
    seconds = time.time() - start
    bad = getattr(dataset, "bad_images", 0)
    if bad:
        print(f"warning: skipped {bad} unreadable image(s)", file=sys.stderr)

    remove_stale_outputs(output_dir, MEASURE)  # only now: a failed run leaves the earlier results in place
    has_cls = bool(encoder.has_class_token)
    metrics = metric_names(has_cls, encoder.grid_size)
    if fourier_grid_problem(encoder.grid_size):
        print(f"note: no fourier_delta_log_amplitude: {fourier_grid_problem(encoder.grid_size)}", file=sys.stderr)
    enc = config.encoder
    metadata = dict(model=enc.model, checkpoint=enc.finetune or "random init", simmim=enc.simmim,
                    checkpoint_key=enc.checkpoint_key, data_path=config.data_path, images=stats.images,
                    input_size=enc.input_size, patch_size=encoder.patch_size, grid=list(encoder.grid_size),
                    num_prefix_tokens=encoder.num_prefix_tokens, has_cls_token=has_cls,
                    num_reg_tokens=encoder.num_reg_tokens, depth=encoder.depth,
                    num_heads=encoder.blocks[-1].attn.num_heads, amp=config.amp, device=config.device,
                    seconds=round(seconds, 2))
    write_tables(output_dir, results, metrics, metadata)
    pngs = []
    for metric in metrics:
        pngs.append(output_dir / f"plot_{metric}.png")
        plots.plot_metric_vs_depth({enc.model: [row[metric] for row in results.values()]}, metric, pngs[-1])
    if overlay_images is not None:
        pngs.append(output_dir / OVERLAY_NAME)
        plots.plot_attention_overlays(overlay_images, overlay_maps, pngs[-1],
                                      "[cls] attention of the last block, mean over heads")
    if embeddings is not None:
        pngs += draw_tsne(output_dir, embeddings, dataset.classes, config.seed, has_cls)
    record_outputs(output_dir, MEASURE, [output_dir / CSV_NAME, output_dir / JSON_NAME, *pngs])
    log_to_dashboards(config, results, metrics, pngs, metadata)
    print(f"{stats.images} images of {data_source(config.data_path)} in {seconds:.1f}s "
          f"({stats.images / max(seconds, 1e-9):.1f} img/s); "
          f"wrote {CSV_NAME}, {JSON_NAME} and {len(pngs)} plots to {output_dir}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
