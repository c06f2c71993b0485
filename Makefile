# Every target installs what it needs into .venv first (idempotent: re-runs only when requirements.txt changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export MPLBACKEND := Agg

.PHONY: venv lint test demo bench bench-loader pretrain pretrain-mae pretrain-mocov3 claims dashboards clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(PY) -m ruff check .

test: venv lint
	$(PY) -m pytest -q tests

# Linear probing of the shipped MAE encoder (checkpoints/mae_mini_clutter.pth, made by `make pretrain`) on the
# generated digits_clutter benchmark: [cls], mean-pooled and AbMILP probes side by side from one frozen forward.
# The first run generates the dataset into ~/.cache/beyond-cls (a few seconds). A fresh output dir each run, so an
# old demo is never resumed or overwritten by accident.
demo: venv
	$(PY) main_linprobe.py --data_path digits_clutter --model vit_mini_patch8 --input_size 64 \
		--finetune checkpoints/mae_mini_clutter.pth --cls_features cls,pos,abmilp --blr 50 --epochs 8 \
		--warmup_epochs 1 --batch_size 128 --num_workers 0 --output_dir output_dir/demo-$$(date +%Y%m%d-%H%M%S)

# The two shipped encoders, one command each (README, "The paper's claims in miniature"). Each resumes from its
# output_dir/pretrain-* folder if one is there; `make clean` first to reproduce them from scratch. The thread counts
# are the ones the shipped files were made with (another count sums floats in another order, so the files would
# differ in their last bits): one each, so `make -j2 pretrain` trains both at once on two cores (MAE about 10
# minutes, MoCo v3 about 14).
pretrain: pretrain-mae pretrain-mocov3

pretrain-mae: venv
	OMP_NUM_THREADS=1 $(PY) main_pretrain.py --method mae --data_path digits_clutter --model vit_mini_patch8 --input_size 64 \
		--epochs 60 --warmup_epochs 5 --batch_size 64 --blr 2e-3 --seed 0 \
		--output_dir output_dir/pretrain-mae --release_path checkpoints/mae_mini_clutter.pth

pretrain-mocov3: venv
	OMP_NUM_THREADS=1 $(PY) main_pretrain.py --method mocov3 --data_path digits_clutter --model vit_mini_patch8 --input_size 64 \
		--epochs 25 --warmup_epochs 3 --batch_size 64 --blr 4e-3 --crop_min 0.2 --seed 0 \
		--output_dir output_dir/pretrain-mocov3 --release_path checkpoints/mocov3_mini_clutter.pth

# Probing table and attention comparison of the shipped encoders vs a random one (README); about 10 minutes on one core.
claims: venv
	PY=$(PY) bash benchmarks/claims_in_miniature.sh

# README's dashboard pictures (docs/dashboard_*.png) from the logs of a demo run, offline (a few minutes).
dashboards: venv
	$(PY) benchmarks/dashboard_pngs.py

bench: venv
	$(PY) benchmarks/bench_linprobe.py

# The input pipeline per CPU core (--decoder fast vs the paper's PIL pipeline) and 10 epochs of the --no_augment
# token cache over one uncached epoch (CPU ViT-Ti); a few minutes on one core (BENCHMARKS.md, Input pipeline).
bench-loader: venv
	$(PY) benchmarks/bench_loader.py

clean:
	rm -rf output_dir .pytest_cache
