# Two commands: `make demo` (fresh machine -> .venv -> install -> the distillation demo)
# and `make test` (reinstall into .venv -> the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of this torch version is kept on these machines' disk; any other version
# downloads a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
DEPS_STAMP := $(VENV)/.deps-$(TORCH_VERSION)
PYTEST_ARGS ?=

.PHONY: demo test test-fast install deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(DEPS_STAMP): pyproject.toml | $(PY)
	$(PIP) install -q torch==$(TORCH_VERSION) setuptools wheel
	$(PIP) install -q ".[test]"
	touch $@

deps: $(DEPS_STAMP)

# Tests run against the installed files (an editable install cannot overlay verl's package), so
# every test run reinstalls; flock keeps parallel invocations from interleaving pip.
install: $(DEPS_STAMP)
	flock $(VENV)/.install.lock $(PIP) install -q --no-deps --force-reinstall --no-build-isolation .

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Skips the end-to-end runs through Ray (they still run in CI).
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/distillation/run_demo.sh

clean:
	rm -rf build *.egg-info
