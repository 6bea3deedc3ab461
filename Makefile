# Quickstart: `make train`, `make test`. Everything installs into .venv/ in this folder.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# torch/torchvision pinned to the releases this machine carries on local disk.
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: setup train test test-cluster lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	@# One resolve for all extras the tests use: Ray's cloudpickle<3 pin then also picks a joblib that agrees.
	$(PIP) install -q -e '.[test,sweep,ray,export,fast]'
	$(PY) -c "import hydra_plugins.hydra_joblib_launcher, hydra_plugins.hydra_submitit_launcher, hydra_plugins.hydra_optuna_sweeper, hydra_plugins.hydra_ray_launcher.ray_launcher, ray, torch, torchvision, numba, onnx, onnxruntime"
	@# Offline Fashion-MNIST from Debian (skipped quietly without apt-get or root).
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || true; \
	fi
	@touch $(STAMP)

train: setup
	$(PY) scripts/train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

# ruff (settings in pyproject.toml): errors, warnings, import order, common bug patterns.
lint: setup
	.venv/bin/ruff check cnnpipe scripts tests

# As root: the README's SLURM and Ray commands on a one-node SLURM cluster (tests/cluster/slurm.sh installs Debian's
# slurm-wlm and munge if missing) and a Ray head, both on 127.0.0.1 only, stopped afterwards. `make test` skips them.
test-cluster: setup
	$(PY) -m pytest -q tests/cluster $(ARGS)

# The benchmark unsets the BLAS core-pinning variables (they halve OpenBLAS's GEMM speed on this machine).
BENCH_ARGS ?= --out docs/bench --readme README.md
bench: setup
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) scripts/bench.py $(BENCH_ARGS) $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
