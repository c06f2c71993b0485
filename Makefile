# Every target installs what it needs into .venv first (idempotent: re-runs only when requirements.txt changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export MPLBACKEND := Agg

.PHONY: venv lint test demo bench clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(PY) -m ruff check .

test: venv lint
	$(PY) -m pytest -q tests

# Linear probing of a random-initialised ViT-Tiny on scikit-learn's real handwritten digits (no download).
# blr 200: MAE's LARS moves each weight by 0.001*|w| per unit of lr and step, so a dozen epochs on 1,437
# images need a far larger base lr than ImageNet's 0.1 (see README). A fresh output dir each run, so an old
# demo is never resumed or overwritten by accident.
demo: venv
	$(PY) main_linprobe.py --data_path digits --model vit_tiny_patch16 --input_size 64 \
		--cls_features cls,abmilp --blr 200 --epochs 12 --warmup_epochs 2 --batch_size 64 \
		--num_workers 0 --output_dir output_dir/demo-$$(date +%Y%m%d-%H%M%S)

bench: venv
	$(PY) benchmarks/bench_linprobe.py

clean:
	rm -rf output_dir .pytest_cache
