"""The README's "claims in miniature" table from a benchmarks/claims_in_miniature.sh output folder.

    python benchmarks/claims_table.py output_dir/claims-<time>

Probing: best val acc1 per head over the lr sweep (with its lr and epoch); k-NN: k=10, T=0.07, [cls] and mean.
Attention: last-block [cls]->[cls] attention and entropy of the [cls] attention over patches (uniform = ln N).
"""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect_results import best_per_head  # noqa: E402

ENCODERS = ("random", "mae", "mocov3")
HEADS = ("cls", "pos", "abmilp")


def probing_rows(folder):
    rows = json.loads((folder / "results.json").read_text())
    best, _notes = best_per_head(rows)
    knn = {row["head"].removeprefix("knn-"): row["best_acc1"] for row in rows
           if row["probe"].startswith("knn_") and row["probe"].endswith("_k10_T0.07")}
    return best, knn


def attention(folder):
    stats = json.loads((folder / "attention_stats.json").read_text())
    last = stats["blocks"][-1]
    patches = stats["metadata"]["grid"][0] * stats["metadata"]["grid"][1]
    return last, patches


def main(out):
    out = Path(out)
    lines = ["| encoder | [cls] | mean (pos) | AbMILP | k-NN [cls] | k-NN mean |", "|---|---|---|---|---|---|"]
    for name in ENCODERS:
        folder = out / "linprobe" / name
        if not (folder / "results.json").is_file():
            continue
        best, knn = probing_rows(folder)
        cells = [f"{best[h]['acc1']:.1f} (lr {best[h]['lr']:.3g}, ep {best[h]['epoch']})" if h in best
                 else "-" for h in HEADS]
        cells += [f"{knn[k]:.1f}" if k in knn else "-" for k in ("cls", "mean")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| encoder | last block [cls]->[cls] attention | [cls]->patches entropy (nats; uniform = ln N) |"
              " [cls] attention on patches, mean per patch |", "|---|---|---|---|"]
    for name in ENCODERS:
        folder = out / "attention" / name
        if not (folder / "attention_stats.json").is_file():
            continue
        last, patches = attention(folder)
        lines.append(f"| {name} | {last['cls_cls_attention']:.3f} | {last['cls_pos_entropy']:.3f} "
                     f"(ln {patches} = {math.log(patches):.3f}) | {last['cls_pos_attention']:.4f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
