# Two entry points for a fresh machine (see README):
#   make book   create .venv, build the website (every chapter executed) into _build/html
#   make test   create .venv, run the unit tests, build the book, test the site in Chromium
# Both create .venv from the pinned requirements.txt the first time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# This project's machines keep a CPU build of torch in /opt/wheels; elsewhere pip uses PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
JOBS ?= 2

.PHONY: book test unit site-test browser bench bench-grading bench-cluster bench-generation bench-gpu release clean venv lab

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(FIND_LINKS) -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo "The site is in _build/html (open _build/html/index.html)."

# Opens the exercise notebooks in JupyterLab (Ctrl-C stops it); `attnlib grade notebooks/` grades them all.
# As root (a container), Jupyter needs --allow-root.
lab: $(STAMP)
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

unit: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile tests --ignore=tests/site

# Debian's Chromium for the site test (Playwright drives it; it never downloads a browser),
# and axe-core (npm, pinned in tests/site/package-lock.json) for its accessibility checks.
AXE := tests/site/node_modules/axe-core/axe.min.js

browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }
	@command -v npm >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q npm; }

$(AXE): tests/site/package.json tests/site/package-lock.json
	cd tests/site && npm ci --no-audit --no-fund --loglevel=error
	touch $(AXE)

site-test: $(STAMP) browser $(AXE)
	$(BIN)/python -m pytest tests/site

test: unit book site-test

# Rewrites solutions/ (nbgrader sources) from tools/build_exercises.py, then releases notebooks/
# with `nbgrader generate_assignment`. Commit both; a test fails if they drift from this command.
release: $(STAMP)
	$(BIN)/python tools/build_exercises.py --release

bench: $(STAMP)
	$(BIN)/python benchmarks/attention_bench.py

# Grades a synthetic class of 200 submissions: submissions per minute, overhead per notebook.
bench-grading: $(STAMP)
	$(BIN)/python benchmarks/grading_bench.py

# The same class through a Dask cluster started here vs the local pool: throughput, Dask's cost.
bench-cluster: $(STAMP)
	$(BIN)/python benchmarks/cluster_bench.py

# Greedy generation with attnlib.TinyGPT, with and without the KV cache (chapter 12): tokens/s.
bench-generation: $(STAMP)
	$(BIN)/python benchmarks/generation_bench.py

# Forward and forward+backward TFLOP/s of attnlib.triton_flash against PyTorch's flash SDPA
# (issue 14); needs a CUDA GPU (without one it says so and fails; --dry-run checks the plumbing on
# the CPU). On a lent GPU machine: bash benchmarks/run_gpu_bench.sh OUT_DIR BUDGET_S.
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu_flash_bench.py

clean:
	rm -rf _build $(VENV)
