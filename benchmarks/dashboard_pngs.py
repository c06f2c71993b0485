"""README's dashboard pictures (docs/dashboard_*.png), drawn from what a demo run logged.

    python benchmarks/dashboard_pngs.py [OUT_DIR]      # or: make dashboards

Runs, offline and on the CPU (a few minutes): main_linprobe.py on digits_clutter with the shipped MAE encoder
(cls, pos, abmilp x 2 lrs, k-NN, wandb offline, attention pictures every 2 epochs) and main_pretrain.py (MAE,
2 epochs, reconstructions). Then reads the logs back the way TensorBoard and wandb would: TensorBoard's
EventAccumulator for the event files, the offline wandb run's records (tests/helpers.py reader), and draws
  docs/dashboard_tb_scalars.png   TensorBoard's Custom Scalars page: per head, loss per iteration and val acc1
  docs/dashboard_tb_images.png    TensorBoard's Images page: attention of the probes, MAE reconstructions
  docs/dashboard_wandb.png        wandb's run page: run id/group/job type/tags, summary, results table, config
"""
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import read_wandb_offline, wandb_history, wandb_record  # noqa: E402

DOCS = ROOT / "docs"
HEADS, BLRS = ("cls", "pos", "abmilp"), ("20", "50")


def run(script, *args, out):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(out), MPLBACKEND="Agg",
               OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)


def demo_runs(out):
    probe = out / "linprobe"
    run("main_linprobe.py", "--data_path", "digits_clutter", "--model", "vit_mini_patch8", "--input_size", "64",
        "--finetune", ROOT / "checkpoints" / "mae_mini_clutter.pth", "--cls_features", ",".join(HEADS),
        "--blr", ",".join(BLRS), "--epochs", "4", "--warmup_epochs", "1", "--batch_size", "128", "--num_workers", "0",
        "--device", "cpu", "--knn", "--knn_k", "10,20", "--wandb", "--wandb_tags", "demo,mae",
        "--log_images_every", "2", "--output_dir", probe, out=out)
    pretrain = out / "pretrain"
    run("main_pretrain.py", "--method", "mae", "--data_path", "digits_clutter", "--model", "vit_mini_patch8",
        "--input_size", "64", "--epochs", "2", "--warmup_epochs", "0", "--batch_size", "64", "--blr", "2e-3",
        "--max_images", "512", "--num_workers", "0", "--device", "cpu", "--log_images_every", "1",
        "--output_dir", pretrain, out=out)
    return probe, pretrain


def events(folder):
    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_scalars(acc, path):
    fig, axes = plt.subplots(2, len(HEADS), figsize=(10, 5), dpi=80, sharex="row")
    for col, head in enumerate(HEADS):
        for blr in BLRS:
            name = f"{head}_blr{blr}"
            loss = acc.Scalars(f"train/loss/{name}")
            axes[0, col].plot([e.step for e in loss], [e.value for e in loss], label=f"blr {blr}", lw=1)
            acc1 = acc.Scalars(f"test_acc1/{name}")
            axes[1, col].plot([e.step for e in acc1], [e.value for e in acc1], marker="o", label=f"blr {blr}")
        axes[0, col].set_title(f"train/loss/{head}*  (per iteration)", fontsize=9)
        axes[1, col].set_title(f"test_acc1/{head}*  (per epoch)", fontsize=9)
        for ax in axes[:, col]:
            ax.set_xlabel("epoch_1000x", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ax.tick_params(labelsize=7)
    fig.suptitle("TensorBoard, Custom Scalars: one chart per head, one line per lr (read with EventAccumulator)",
                 fontsize=10)
    fig.tight_layout()
    save(fig, path)


def tb_images(probe_acc, pretrain_acc, path):
    attention = probe_acc.Images("attention/probes")[-1]
    reconstruction = pretrain_acc.Images("pictures/reconstruction")[-1]
    pictures = [(f"attention/probes, step {attention.step}", attention),
                (f"pictures/reconstruction (masked | reconstructed | original), step {reconstruction.step}",
                 reconstruction)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 6), dpi=80, gridspec_kw={"width_ratios": [1.4, 1]})
    for ax, (title, image) in zip(axes, pictures):
        ax.imshow(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("TensorBoard, Images (read with EventAccumulator)", fontsize=10)
    fig.tight_layout()
    save(fig, path)


def wandb_page(folder, path):
    records = read_wandb_offline(folder)
    info = wandb_record(records, "run")[-1].run
    summary = {}
    for record in wandb_record(records, "summary"):
        summary.update({item.key: json.loads(item.value_json) for item in record.summary.update if item.key})
    config = {item.key: json.loads(item.value_json) for item in info.config.update}
    steps = [step for step, _ in wandb_history(records)]
    results = json.loads((folder / "results.json").read_text())

    fig = plt.figure(figsize=(10, 7), dpi=80)
    fig.suptitle("wandb run (offline records read back)", fontsize=11)
    header = (f"run {info.run_id}   project {info.project}   group {info.run_group}   job type {info.job_type}   "
              f"tags {', '.join(info.tags)}\nhistory: {len(steps)} rows, steps {steps[0]}..{steps[-1]} (global "
              "iteration; x axes: epoch for per-iteration keys, epoch_index for per-epoch keys)")
    fig.text(0.02, 0.92, header, fontsize=8, va="top", family="monospace")
    ax = fig.add_axes([0.02, 0.42, 0.96, 0.42])
    ax.axis("off")
    rows = [[r["probe"], r["head"], "-" if r["lr"] is None else f"{r['lr']:.4g}", f"{r['best_acc1']:.2f}",
             "-" if r["best_epoch"] is None else str(r["best_epoch"])] for r in results]
    table = ax.table(cellText=rows, colLabels=["probe", "head", "lr", "best acc1", "epoch"], loc="upper left",
                     cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    ax.set_title("Table 'results' (results.json, k-NN rows included)", fontsize=9, loc="left")
    best = {k: v for k, v in summary.items() if k.startswith(("best_acc1/", "knn_acc1/"))}
    shown = ["data_path", "encoder.finetune", "run.identity.nb_classes", "run.train_images", "run.val_images",
             "run.effective_batch", "run.world_size", "versions.torch", "versions.timm", "schedule.epochs"]
    left = "summary:\n" + "\n".join(f"  {k} = {v:.2f}" for k, v in list(best.items())[:9])
    right = "config (excerpt):\n" + "\n".join(f"  {k} = {config.get(k)}" for k in shown)
    fig.text(0.02, 0.38, left, fontsize=8, va="top", family="monospace")
    fig.text(0.50, 0.38, right, fontsize=8, va="top", family="monospace")
    save(fig, path)


def save(fig, path):
    fig.savefig(path)
    plt.close(fig)
    # a palette PNG keeps the README's pictures small
    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="dashboards-"))
    probe, pretrain = demo_runs(out)
    probe_acc, pretrain_acc = events(probe), events(pretrain)
    DOCS.mkdir(exist_ok=True)
    tb_scalars(probe_acc, DOCS / "dashboard_tb_scalars.png")
    tb_images(probe_acc, pretrain_acc, DOCS / "dashboard_tb_images.png")
    wandb_page(probe, DOCS / "dashboard_wandb.png")


if __name__ == "__main__":
    main()
