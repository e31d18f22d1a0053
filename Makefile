# Two commands for a fresh machine:  `make quickstart` (the main job) and `make test` (the test suite).
# Both create .venv on first use. The CPU torch wheel is pinned only when no torch is installed yet, so a
# GPU user who installed their own CUDA build keeps it (pyproject asks only for torch>=2.4).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.dev-installed-stamp
TORCH_CPU_PIN ?= torch==2.13.0
OUT ?= outputs/quickstart

.PHONY: install quickstart test lint browser clean

# The quickstart needs only the package; the test suite adds the dev extras (pytest, ruff, and gradio, ray, peft,
# playwright for the optional features' tests), which would add ~30 s to a fresh machine's quickstart.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_CPU_PIN)
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(DEV_STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/dora quickstart --out $(OUT)

# The web-demo test drives a real headless Chromium; install Debian's when we can (root + apt), else that
# one test skips with its reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
		echo "chromium not installed: the browser test will skip"; }

# ruff is pinned to one minor release in pyproject: its formatter's style changes between minors.
test: $(DEV_STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
