# The two commands a newcomer needs: `make serve` (serve the default model) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip --disable-pip-version-check
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 100000000000

.PHONY: install install-serve system-deps test lint serve model model-fast model-accurate bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps make repeated installs no-ops until pyproject.toml changes.
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[serve]'
	touch $@

$(VENV)/.all-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e '.[train,serve,dev]'
	touch $@

install-serve: $(VENV)/.serve-installed
install: $(VENV)/.all-installed

# Real servers the tests start: Prometheus (+promtool), Pushgateway, Chromium, kubectl.
system-deps:
	@./.ci/system-deps

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install system-deps
	$(BIN)/ruff check .
	$(BIN)/pytest -q

serve: install-serve
	$(BIN)/deepclust serve

# Rebuild the store's models from the shared CIFAR-10 data (frozen ImageNet EfficientNet-Lite features, cached), each
# exported with parity checks and its INT8/FP16 variants, then time each one's service on this machine:
# `deepclust serve` serves the most accurate model whose service reaches 100 img/s (model_store/throughput.json).
#   fast:     SCAN heads + self-labelling on EfficientNet-Lite0                  (model_store/cifar10-lite0)
#   accurate: TURTLE on EfficientNet-Lite0 and -Lite2 together, both in the graph (model_store/cifar10-lite0-lite2)
model: model-fast model-accurate
	$(BIN)/python benchmarks/store.py

model-fast: install
	$(BIN)/deepclust train -c configs/cifar10_lite0_scan.yaml --out-dir runs
	$(BIN)/deepclust export runs/cifar10-lite0-scan -o model_store/cifar10-lite0 --rebuild-command "make model-fast"

model-accurate: install
	$(BIN)/deepclust train -c configs/cifar10_spaces_turtle.yaml --out-dir runs
	$(BIN)/deepclust export runs/cifar10-spaces-turtle -o model_store/cifar10-lite0-lite2 \
		--rebuild-command "make model-accurate"

clean:
	rm -rf $(VENV) .pytest_cache
