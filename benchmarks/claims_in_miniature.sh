#!/usr/bin/env bash
# The README's "paper's claims in miniature", rerunnable in one command (make claims):
# probe the shipped MAE and MoCo v3 encoders and a random-initialised one on digits_clutter (cls, pos, abmilp over
# an lr sweep, plus k-NN), measure their attention statistics, overlay them, and print the README's tables.
# Overrides: PY, OUT, EPOCHS, BLRS, MAE, MOCO (checkpoint paths), DOCS (where the comparison PNGs are copied).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-output_dir/claims-$(date +%Y%m%d-%H%M%S)}
EPOCHS=${EPOCHS:-30}
BLRS=${BLRS:-5,20,100,400}
MAE=${MAE:-checkpoints/mae_mini_clutter.pth}
MOCO=${MOCO:-checkpoints/mocov3_mini_clutter.pth}
DOCS=${DOCS:-docs}
ARCH=(--data_path digits_clutter --model vit_mini_patch8 --input_size 64 --num_workers 0 --device cpu)
if [ -e "$OUT" ]; then echo "error: $OUT exists (remove it, or set OUT to a new folder)" >&2; exit 2; fi
for name in random mae mocov3; do
  case $name in
    random) weights=() ;;
    mae) weights=(--finetune "$MAE") ;;
    mocov3) weights=(--finetune "$MOCO") ;;
  esac
  "$PY" main_linprobe.py "${ARCH[@]}" "${weights[@]}" --cls_features cls,pos,abmilp --blr "$BLRS" \
    --epochs "$EPOCHS" --warmup_epochs 2 --batch_size 128 --knn --knn_k 10,20 --output_dir "$OUT/linprobe/$name"
  "$PY" main_attention_stats.py "${ARCH[@]}" "${weights[@]}" --output_dir "$OUT/attention/$name"
done
"$PY" main_attention_stats.py --compare "$OUT/attention/random" "$OUT/attention/mae" "$OUT/attention/mocov3" \
  --output_dir "$OUT/attention/compare"
mkdir -p "$DOCS"
for metric in cls_cls_attention cls_pos_entropy; do
  cp "$OUT/attention/compare/compare_$metric.png" "$DOCS/claims_$metric.png"
done
"$PY" benchmarks/claims_table.py "$OUT" | tee "$OUT/table.md"
