# The two commands a newcomer needs: `make serve` (serve the default model) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip --disable-pip-version-check
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_TRIM_THRESHOLD_ ?= 100000000000

.PHONY: install install-serve system-deps test lint serve model bench clean

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

# Rebuild the default served model from the shared CIFAR-10 data: frozen EfficientNet-Lite0 features (cached),
# SCAN heads + self-labelling (the best method measured here, see README), then export with parity checks.
DEFAULT_MODEL := model_store/cifar10-lite0
model: install
	$(BIN)/deepclust train -c configs/cifar10_lite0_scan.yaml --out-dir runs
	$(BIN)/deepclust export runs/cifar10-lite0-scan -o $(DEFAULT_MODEL) --rebuild-command "make model"

clean:
	rm -rf $(VENV) .pytest_cache
