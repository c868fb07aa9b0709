# `make demo` runs the main job on synthetic data in about a minute, `make test` every test (scripts/test-deps.sh first
# installs what the suite needs), `make test-fast` the unit tests (no data, no services, under a minute); all set up
# .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test-deps test test-fast demo lint bench-search bench-epoch docker-test slurm-test k8s-test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# PostgreSQL, Chromium, SLURM + munge and python3-venv, installed when missing (as root or with sudo); says what it
# cannot do (the real CIFAR-10 arrays) and exits 1 then. .ci/run runs it through `make test`.
test-deps:
	bash scripts/test-deps.sh

lint: install
	$(VENV)/bin/ruff check allconv_cli tests scripts benchmarks

test: test-deps install lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m unit

# The demo: a study that visibly learns, on synthetic data (no download), in about a minute on 2 CPU cores, then the
# report. The space is the shipped `bn-dropout` grid (the 2020 reproduction's BatchNorm x dropout ablation, 4 trials);
# the sizes are what learns in that minute: Strided-CNN-A, the cheapest network per image, on 800 images for 3
# epochs at batch 32 (75 steps), 200 validation and 200 test images, per-channel standardisation (fitting GCN + ZCA
# would take longer than a trial). No option the space samples (bn, dropout_input), so nothing is ignored.
# tests/test_demo.py runs this same search (it reads DEMO_SEARCH from here) and checks that its best trial reaches
# 60% validation accuracy.
DEMO_SEARCH := --model A --branch strided --dataset fake --subset 800 --val-size 200 --test-size 200 \
	--preprocess standardize --epochs 3 --batch-size 32 --space bn-dropout --trials 4
demo: install
	$(VENV)/bin/allconv search $(DEMO_SEARCH)
	$(VENV)/bin/allconv report

# Issue 4's real-data figure: 6 trials x 2 epochs on a 2,000-image subset of real CIFAR-10, on this machine's CPU,
# in a fresh folder (its own optuna.db / mlflow.db). Prints the study and its wall time.
DATA_DIR ?= ../shared/data/cifar10
BENCH_DIR ?= /tmp/allconv-bench-search
bench-search: install
	rm -rf $(BENCH_DIR) && mkdir -p $(BENCH_DIR)
	cd $(BENCH_DIR) && $(abspath $(VENV))/bin/allconv search --model A --branch strided --device cpu \
		--data-dir $(abspath $(DATA_DIR)) --subset 2000 --val-size 1000 --test-size 2000 --epochs 2 --trials 6

# Issue 18's epoch-overhead figure: per epoch the training step, the evaluation pass and the whole epoch cycle of a
# tracked run (fake data, --subset 1000 --val-size 100, 8 epochs, this machine's CPU), against a local SQLite MLflow
# store and an `mlflow server`. The target: median(cycle - training step) <= 20 ms, evaluation pass aside.
bench-epoch: install
	$(PY) benchmarks/epoch_overhead.py

# The Dockerfile and docker-compose.yml built and run for real (scripts/docker-test.sh; needs no .venv): skipped with
# the reason where no Docker engine can run.
docker-test:
	bash scripts/docker-test.sh

# deploy/slurm run for real (issue 19): a single-node SLURM cluster on this machine from Debian's slurm-wlm and munge
# packages (tests/slurm_cluster.py), the prepare job then the worker array against PostgreSQL and an MLflow server, one
# array task cancelled mid-trial. Part of `make test` too; this target prints its figures (start-up, trials, wall time).
slurm-test: install
	$(PY) -m pytest -q -rP tests/test_slurm.py

# deploy/k8s validated offline and strictly against the Kubernetes schema tests/test_k8s.py pins (kubernetes-validate
# ships the schemas), its wiring, and the worker command compared with docker-compose.yml and deploy/slurm; no cluster.
k8s-test: install
	$(PY) -m pytest -q tests/test_k8s.py
